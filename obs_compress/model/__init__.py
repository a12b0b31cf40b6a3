"""Model plumbing: transformers and torch.nn, never the math.

* :mod:`.blocks`: find the block stack and the prunable Linear/Conv1D layers of any model.
* :mod:`.capture`: capture block 0's inputs (with the keyword arguments the block needs).
* :mod:`.hooks`: forward hooks feeding Hessian accumulators; onload/offload of one module.
* :mod:`.loading`: load a checkpoint safely (no pickle, no remote code unless asked).
"""

from .blocks import BlockStack, PrunableLayer, find_block_stack, find_layers, is_prunable
from .capture import BlockCall, capture_block_inputs
from .hooks import accumulate_inputs, input_hooks, on_device, outside_on_device
from .loading import LoadedModel, load_model

__all__ = ["BlockCall", "BlockStack", "LoadedModel", "PrunableLayer", "accumulate_inputs",
           "capture_block_inputs", "find_block_stack", "find_layers", "input_hooks",
           "is_prunable", "load_model", "on_device", "outside_on_device"]
