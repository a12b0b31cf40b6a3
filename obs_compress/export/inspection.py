"""Per-layer sparsity and N:M check of any safetensors checkpoint, straight from its files.

Nothing is instantiated and nothing is unpickled: each ``*.safetensors`` file of the folder
is opened with ``safetensors.safe_open`` and every 2-D floating ``*.weight`` tensor is
measured. The N:M check looks at groups of M consecutive entries along the input axis
(the last one of an ``nn.Linear`` weight ``(d_out, d_in)``); when that fails it also tries
axis 0, where ``Conv1D`` (GPT-2) keeps its inputs, and says so.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from ..errors import ModelLoadError
from ..math.masks import Pattern, parse_pattern
from .checkpoint import read_sparsity_section


@dataclass
class TensorSparsity:
    name: str
    shape: tuple[int, ...]
    zeros: int
    nm_axis: int | None  # the axis along which the N:M pattern holds, None when it does not
    target: bool  # listed among the pruned targets in config.json

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class CheckpointSparsity:
    folder: Path
    pattern: Pattern  # the N:M pattern checked
    section: Mapping[str, Any] | None  # config.json's "sparsity" section, if any
    tensors: list[TensorSparsity] = field(default_factory=list)

    @property
    def targets(self) -> list[TensorSparsity]:
        chosen = [t for t in self.tensors if t.target]
        return chosen or self.tensors

    @property
    def global_sparsity(self) -> float:
        """Zeros over all target tensors (all 2-D weights when no targets are recorded)."""
        total = sum(t.numel for t in self.targets)
        return sum(t.zeros for t in self.targets) / total if total else 0.0

    def table(self) -> str:
        width = max([len("tensor")] + [len(t.name) for t in self.tensors])
        header = (f"{'tensor':<{width}}  {'shape':>11}  {'sparsity':>8}  "
                  f"{str(self.pattern) + ' holds':>12}  target")
        lines = [header, "-" * len(header)]
        for t in self.tensors:
            shape = "x".join(str(s) for s in t.shape)
            nm = "no" if t.nm_axis is None else ("yes" if t.nm_axis == len(t.shape) - 1
                                                 else f"yes (axis {t.nm_axis})")
            lines.append(f"{t.name:<{width}}  {shape:>11}  {t.sparsity:>8.4f}  {nm:>12}  "
                         f"{'yes' if t.target else ''}")
        lines.append("-" * len(header))
        held = sum(t.nm_axis is not None for t in self.targets)
        lines.append(f"{len(self.targets)} target tensors: global sparsity "
                     f"{self.global_sparsity:.4f}; {self.pattern} holds in {held} of them")
        if self.section:
            lines.append(f"config.json sparsity: method={self.section.get('method')} "
                         f"pattern={self.section.get('pattern')} "
                         f"global_sparsity={self.section.get('global_sparsity')}")
        return "\n".join(lines)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def nm_holds(tensor: torch.Tensor, pattern: Pattern, axis: int) -> bool:
    """Whether every group of ``pattern.m`` consecutive entries along ``axis`` has at least
    ``m - n`` zeros."""
    width = tensor.shape[axis]
    if width % pattern.m:
        return False
    moved = tensor.movedim(axis, -1)
    groups = (moved == 0).reshape(-1, width // pattern.m, pattern.m)
    return bool((groups.sum(-1) >= pattern.pruned_per_group).all())


def inspect_checkpoint(folder: str | os.PathLike, *,
                       pattern: str | None = None) -> CheckpointSparsity:
    """Measure every 2-D weight of the checkpoint in ``folder`` (see the module docstring).

    ``pattern``: the N:M pattern to check; default the one in ``config.json``'s sparsity
    section when it is N:M, else 2:4.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"checkpoint {str(path)!r}: no such folder")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"checkpoint {str(path)!r} holds no *.safetensors files")
    section = read_sparsity_section(path)
    if pattern is None:
        recorded = (section or {}).get("pattern")
        parsed = parse_pattern(recorded) if recorded else Pattern()
        checked = parsed if parsed.is_nm else parse_pattern("2:4")
    else:
        checked = parse_pattern(pattern)
        if not checked.is_nm:
            raise ModelLoadError(f"pattern to check must be N:M (e.g. 2:4), got {pattern!r}")
    targets = {f"{name}.weight" for name in (section or {}).get("targets", [])}
    result = CheckpointSparsity(folder=path, pattern=checked, section=section)
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if not name.endswith("weight"):
                    continue
                tensor = handle.get_tensor(name)
                if tensor.ndim != 2 or not tensor.is_floating_point():
                    continue
                axis = next((a for a in (1, 0) if nm_holds(tensor, checked, a)), None)
                result.tensors.append(TensorSparsity(
                    name=name, shape=tuple(tensor.shape), zeros=int((tensor == 0).sum()),
                    nm_axis=axis, target=name in targets))
    result.tensors.sort(key=lambda t: _natural_key(t.name))
    return result


__all__ = ["CheckpointSparsity", "TensorSparsity", "inspect_checkpoint", "nm_holds"]
