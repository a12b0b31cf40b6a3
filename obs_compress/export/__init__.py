"""Export: safetensors writing of a Hugging Face folder (sharded, atomic), loading back,
and inspection of any checkpoint's sparsity.

* :mod:`.safetensors_writer`: shards written as tensors arrive (block by block if need be).
* :mod:`.checkpoint`: :func:`save_pretrained` (temp folder, then rename), the ``sparsity``
  section of ``config.json``, tokenizer/recipe/report beside the weights.
* :mod:`.inspection`: per-layer sparsity and N:M check straight from the safetensors files.
"""

from .checkpoint import (atomic_output_dir, check_output_dir, checkpoint_tensors,
                         load_pretrained, read_sparsity_section, save_pretrained)
from .inspection import CheckpointSparsity, TensorSparsity, inspect_checkpoint
from .safetensors_writer import ShardedSafetensorsWriter

__all__ = ["CheckpointSparsity", "ShardedSafetensorsWriter", "TensorSparsity",
           "atomic_output_dir", "check_output_dir", "checkpoint_tensors", "inspect_checkpoint",
           "load_pretrained", "read_sparsity_section", "save_pretrained"]
