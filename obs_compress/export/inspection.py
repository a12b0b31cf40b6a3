"""Per-layer sparsity and N:M check of any safetensors checkpoint, straight from its files.

Nothing is instantiated and nothing is unpickled: each ``*.safetensors`` file of the folder
is opened with ``safetensors.safe_open`` and every 2-D floating ``*.weight`` tensor is
measured. The N:M check runs only where it applies: for the N:M pattern the checkpoint
says it was pruned with (``config.json``'s ``sparsity`` section: its ``patterns`` map of
pattern to layer count, else its ``pattern``), or the one asked for; an unstructured
checkpoint, or one without the section, gets no N:M check. It looks at groups of M
consecutive entries along the input axis (the last one of an ``nn.Linear`` weight ``(d_out,
d_in)``); when that fails it also tries axis 0, where ``Conv1D`` (GPT-2) keeps its inputs,
and says so.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from ..errors import InvalidArgument, ModelLoadError
from ..math.masks import Pattern, parse_pattern
from . import formats
from .checkpoint import read_sparsity_section
from .convert import read_file_tensors


@dataclass
class TensorSparsity:
    name: str
    shape: tuple[int, ...]
    zeros: int
    nm_axis: int | None  # the axis along which the N:M pattern holds; None: it does not, or
    # no pattern was checked
    target: bool  # listed among the pruned targets in config.json
    format: str = "dense"  # how it is stored (docs/FORMAT.md)
    stored_bytes: int = 0  # bytes of its stored tensors in the file
    dense_bytes: int = 0  # bytes it takes dense

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class CheckpointSparsity:
    folder: Path
    pattern: Pattern | None  # the N:M pattern checked; None: none applies (see the module)
    section: Mapping[str, Any] | None  # config.json's "sparsity" section, if any
    tensors: list[TensorSparsity] = field(default_factory=list)
    # What config.json records about the N:M patterns: pattern -> number of layers (None
    # where only the recipe's pattern is recorded); the ones not checked are named.
    recorded: Mapping[str, int | None] = field(default_factory=dict)
    format: str = "dense"  # the folder's weight format (config.json's quantization_config)
    stored_bytes: int = 0  # every tensor of the safetensors files
    dense_bytes: int = 0  # the same tensors dense

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
        nm_header = f"  {str(self.pattern) + ' holds':>12}" if self.pattern is not None else ""
        header = (f"{'tensor':<{width}}  {'shape':>11}  {'sparsity':>8}{nm_header}  "
                  f"{'stored':>8}  {'x dense':>7}  target")
        lines = [header, "-" * len(header)]
        for t in self.tensors:
            shape = "x".join(str(s) for s in t.shape)
            nm = ""
            if self.pattern is not None:
                held = "no" if t.nm_axis is None else ("yes" if t.nm_axis == len(t.shape) - 1
                                                       else f"yes (axis {t.nm_axis})")
                nm = f"  {held:>12}"
            ratio = t.stored_bytes / t.dense_bytes if t.dense_bytes else 1.0
            lines.append(f"{t.name:<{width}}  {shape:>11}  {t.sparsity:>8.4f}{nm}  "
                         f"{_size(t.stored_bytes):>8}  {ratio:>7.3f}  "
                         f"{'yes' if t.target else ''}")
        lines.append("-" * len(header))
        summary = (f"{len(self.targets)} target tensors: global sparsity "
                   f"{self.global_sparsity:.4f}")
        if self.pattern is not None:
            held = sum(t.nm_axis is not None for t in self.targets)
            summary += f"; {self.pattern} holds in {held} of them"
            count = self.recorded.get(str(self.pattern))
            if count is not None and count != len(self.targets):
                summary += f" (config.json: {count} layers pruned {self.pattern})"
        lines.append(summary)
        others = [f"{name} ({count} layers)" if count is not None else name
                  for name, count in self.recorded.items() if name != str(self.pattern)]
        if others:
            lines.append(f"also recorded, not checked: {', '.join(others)} "
                         "(--pattern N:M checks another)")
        pruned_stored = sum(t.stored_bytes for t in self.targets)
        pruned_dense = sum(t.dense_bytes for t in self.targets)
        lines.append(
            f"format {self.format}: target weights stored {_size(pruned_stored)} of "
            f"{_size(pruned_dense)} dense ({pruned_stored / max(pruned_dense, 1):.3f}x); all "
            f"tensors {_size(self.stored_bytes)} of {_size(self.dense_bytes)} "
            f"({self.stored_bytes / max(self.dense_bytes, 1):.3f}x)")
        if self.section:
            lines.append(f"config.json sparsity: method={self.section.get('method')} "
                         f"pattern={self.section.get('pattern')} "
                         f"global_sparsity={self.section.get('global_sparsity')}")
        return "\n".join(lines)


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f}{unit}"
    return f"{nbytes}B"


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


def recorded_nm_patterns(section: Mapping[str, Any] | None) -> dict[str, int | None]:
    """The N:M patterns a ``sparsity`` section says the checkpoint was pruned with: pattern
    -> number of layers (from ``patterns``), most layers first; ``{pattern: None}`` when only
    the recipe's ``pattern`` is recorded; empty for an unstructured checkpoint. Entries that
    are no pattern at all are skipped: this reads any checkpoint's config."""
    section = section if isinstance(section, Mapping) else {}
    counts = section.get("patterns")
    if not isinstance(counts, Mapping) or not counts:
        counts = {section.get("pattern"): None}
    found: dict[str, int | None] = {}
    for text, count in counts.items():
        try:
            parsed = parse_pattern(text)
        except InvalidArgument:
            continue
        if parsed.is_nm:
            found[str(parsed)] = count if isinstance(count, int) else None
    return dict(sorted(found.items(), key=lambda item: -(item[1] or 0)))


def inspect_checkpoint(folder: str | os.PathLike, *,
                       pattern: str | None = None) -> CheckpointSparsity:
    """Measure every 2-D weight of the checkpoint in ``folder`` (see the module docstring).

    ``pattern``: the N:M pattern to check; default the one ``config.json``'s sparsity
    section records (the one of most layers when it records several), none when it records
    no N:M pattern.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"checkpoint {str(path)!r}: no such folder")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"checkpoint {str(path)!r} holds no *.safetensors files")
    section = read_sparsity_section(path)
    recorded = recorded_nm_patterns(section)
    if pattern is None:
        checked = parse_pattern(next(iter(recorded))) if recorded else None
    else:
        checked = parse_pattern(pattern)
        if not checked.is_nm:
            raise ModelLoadError(f"pattern to check must be N:M (e.g. 2:4), got {pattern!r}")
    targets = {f"{name}.weight" for name in (section or {}).get("targets", [])}
    result = CheckpointSparsity(folder=path, pattern=checked, section=section,
                                recorded=recorded)
    config = json.loads((path / "config.json").read_text(encoding="utf-8")) \
        if (path / "config.json").is_file() else {}
    quantization = config.get(formats.QUANTIZATION_CONFIG_KEY) or {}
    if quantization.get(formats.QUANT_METHOD_KEY) == formats.QUANT_METHOD:
        result.format = formats.check_format(quantization.get(formats.FORMAT_KEY))
    for file in files:
        for name, tensor, format, stored in read_file_tensors(file):
            dense = tensor.numel() * tensor.element_size()
            result.stored_bytes += stored
            result.dense_bytes += dense
            if not name.endswith("weight") or tensor.ndim != 2 or not tensor.is_floating_point():
                continue
            axis = None if checked is None else next(
                (a for a in (1, 0) if nm_holds(tensor, checked, a)), None)
            result.tensors.append(TensorSparsity(
                name=name, shape=tuple(tensor.shape), zeros=int((tensor == 0).sum()),
                nm_axis=axis, target=name in targets, format=format, stored_bytes=stored,
                dense_bytes=dense))
    result.tensors.sort(key=lambda t: _natural_key(t.name))
    return result


__all__ = ["CheckpointSparsity", "TensorSparsity", "inspect_checkpoint", "nm_holds",
           "recorded_nm_patterns"]
