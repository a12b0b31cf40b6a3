"""Find the block stack and its prunable layers in any ``transformers`` model.

No per-family driver: the block stack is the ``nn.ModuleList`` of identical modules that
holds the most parameters among those whose members contain prunable layers
(``model.layers`` in Llama, ``transformer.h`` in GPT-2, ``encoder.layer`` in BERT,
``model.decoder.layers`` in OPT). Lists nested inside a block (mixture-of-experts) hold
fewer parameters than the stack around them and are never chosen.

Prunable layers are ``nn.Linear`` (``weight: (d_out, d_in)``) and GPT-2's ``Conv1D``, whose
weight is stored transposed, ``(d_in, d_out)``. :class:`PrunableLayer` hides that
difference: the driver always sees ``W: (d_out, d_in)`` and inputs ``X: (..., d_in)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModel

logger = logging.getLogger(__name__)

try:  # GPT-2 and a few others use Conv1D: a Linear with its weight transposed
    from transformers.pytorch_utils import Conv1D as _Conv1D
except ImportError:  # pragma: no cover - transformers always has it today
    _Conv1D = None

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,) + ((_Conv1D,) if _Conv1D else ())


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, PRUNABLE_TYPES)


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable layer, named by its full module name in the model."""

    name: str
    module: nn.Module

    @property
    def transposed(self) -> bool:
        """True when the weight is stored ``(d_in, d_out)`` (``Conv1D``)."""
        return not isinstance(self.module, nn.Linear)

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` whatever the storage."""
        rows, cols = self.module.weight.shape
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def d_in(self) -> int:
        return self.shape[1]

    def weight_matrix(self) -> torch.Tensor:
        """The weight as ``(d_out, d_in)``; a view of the parameter, not a copy."""
        weight = self.module.weight.detach()
        return weight.T if self.transposed else weight

    @torch.no_grad()
    def set_weight_(self, weight: torch.Tensor) -> None:
        """In place: copy ``weight: (d_out, d_in)`` into the parameter (its identity, dtype
        and device are kept, so tied or hooked parameters stay valid)."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"layer {self.name}: new weight has shape {tuple(weight.shape)}, "
                             f"expected {self.shape}")
        self.module.weight.copy_(weight.T if self.transposed else weight)


@dataclass(frozen=True)
class BlockStack:
    """The repeated blocks of a model: ``modules[i]`` is called ``f"{name}.{i}"``."""

    name: str
    modules: nn.ModuleList

    def __len__(self) -> int:
        return len(self.modules)

    def block_name(self, index: int) -> str:
        return f"{self.name}.{index}" if self.name else str(index)


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_block_stack(model: nn.Module) -> BlockStack:
    """The model's block stack (see the module docstring for how it is recognised)."""
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(block) for block in module}
        if len(kinds) != 1 or is_prunable(module[0]):
            continue
        if not all(any(is_prunable(m) for m in block.modules()) for block in module):
            continue
        candidates.append((_parameter_count(module), name, module))
    if not candidates:
        raise UnsupportedModel(
            f"{type(model).__name__}: found no block stack (an nn.ModuleList of identical "
            "blocks holding nn.Linear or Conv1D layers); this model cannot be pruned layer-wise")
    candidates.sort(key=lambda c: c[0], reverse=True)
    size, name, module = candidates[0]
    for other_size, other_name, _ in candidates[1:]:
        if not other_name.startswith(name + ".") and other_size >= size // 2:
            logger.warning("model has a second block stack %s; only %s is pruned",
                           other_name, name)
    return BlockStack(name=name, modules=module)


def find_layers(block: nn.Module, prefix: str) -> list[PrunableLayer]:
    """The prunable layers inside ``block``, in module order, named ``prefix.<path>``."""
    return [PrunableLayer(name=f"{prefix}.{path}" if prefix else path, module=module)
            for path, module in block.named_modules() if path and is_prunable(module)]


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s first parameter (or buffer) lives; CPU when it has none."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


__all__ = ["BlockStack", "PRUNABLE_TYPES", "PrunableLayer", "find_block_stack", "find_layers",
           "is_prunable", "module_device"]
