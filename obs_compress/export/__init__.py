"""Export: a Hugging Face folder written atomically, loading back, and inspection of any
checkpoint's sparsity.

* :mod:`.checkpoint`: :func:`save_pretrained` (transformers' ``save_pretrained`` into a
  temporary folder, then rename), the ``sparsity`` section of ``config.json``, the
  tokenizer, recipe and report beside the weights.
* :mod:`.inspection`: per-layer sparsity and N:M check straight from the safetensors files.
"""

from .checkpoint import (atomic_output_dir, check_output_dir, load_pretrained,
                         read_sparsity_section, save_pretrained)
from .inspection import CheckpointSparsity, TensorSparsity, inspect_checkpoint

__all__ = ["CheckpointSparsity", "TensorSparsity", "atomic_output_dir", "check_output_dir",
           "inspect_checkpoint", "load_pretrained", "read_sparsity_section", "save_pretrained"]
