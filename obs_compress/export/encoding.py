"""Which weights of a checkpoint a compressed format encodes, and how (issue 12).

The codec (:mod:`.formats`) turns one 2-D tensor into its stored tensors; this module
decides, from the model's structure, the format and the pruned targets alone (never from the
weights' values, so the streaming and in-memory paths agree), which stored weight gets which
:class:`WeightEncoding`, and builds the ``quantization_config`` section of ``config.json``.

* Encoded: the ``weight`` of every pruned target layer (``nn.Linear`` ``(d_out, d_in)`` or
  GPT-2's ``Conv1D`` ``(d_in, d_out)``), as stored. ``bitmask`` keeps the stored orientation
  (row-major over the stored shape). ``nm`` groups run along the INPUT dim: the columns of a
  Linear weight (``axis=1``), the rows of a Conv1D weight (``axis=0``, recorded in the
  weight's ``pattern`` tensor). Everything else (embeddings, norms, biases, the head, layers
  left dense) is stored as it is.
* :func:`encode_weight` / :func:`decode_weight`: the codec with the tensor's name put into
  every refusal (a weight that breaks the N:M pattern is named).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from ..errors import CheckpointFormatError
from ..math.masks import Pattern
from . import formats


@dataclass(frozen=True)
class WeightEncoding:
    """How one stored weight is encoded: ``format`` ``bitmask`` or ``nm`` (``n`` of ``m``
    along ``axis`` of the stored tensor)."""

    format: str
    n: int = 0
    m: int = 0
    axis: int = 1


def encode_weight(name: str, tensor: torch.Tensor,
                  encoding: WeightEncoding | None) -> dict[str, torch.Tensor]:
    """The stored tensors of weight ``name`` (full stored names): ``{name: tensor}`` when it
    is not encoded."""
    if encoding is None or encoding.format == "dense":
        return {name: tensor}
    try:
        if encoding.format == "bitmask":
            parts = formats.encode_bitmask(tensor)
        else:
            formats.check_format(encoding.format)  # "nm" is the one format left
            parts = formats.encode_nm(tensor, encoding.n, encoding.m, axis=encoding.axis)
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{name}: {exc}") from None
    names = formats.stored_names(name, encoding.format)
    return {names[suffix]: value for suffix, value in parts.items()}


def stored_format(names: Iterable[str], weight: str) -> str | None:
    """The compressed format whose stored tensors of ``weight`` are among ``names`` (matched
    against the fixed suffix table), or None when ``weight`` is stored as it is."""
    present = set(names)
    for format in formats.FORMATS[1:]:
        if all(n in present for n in formats.stored_names(weight, format).values()):
            return format
    return None


def encoded_weights(names: Iterable[str]) -> dict[str, str]:
    """Weight name -> format for every compressed weight whose stored tensors are in
    ``names`` (a file's or a folder's tensor names)."""
    present = set(names)
    found = {}
    for name in present:
        if name.endswith(".shape"):
            weight = name[: -len(".shape")]
            format = stored_format(present, weight)
            if format is not None:
                found[weight] = format
    return found


def decode_weight(weight: str, format: str, stored: Mapping[str, torch.Tensor], *,
                  file_size: int | None = None) -> torch.Tensor:
    """The dense tensor of ``weight`` from its stored tensors (full stored names)."""
    names = formats.stored_names(weight, format)
    parts = {suffix: stored[name] for suffix, name in names.items() if name in stored}
    if format == "bitmask":
        return formats.decode_bitmask(parts, name=weight, file_size=file_size)
    if format == "nm":
        return formats.decode_nm(parts, name=weight, file_size=file_size)
    raise CheckpointFormatError(f"{weight}: format {format!r} is not a compressed format")


def plan_encodings(model: nn.Module, sources: Mapping[str, str], format: str,
                   target_layers: Iterable[str], pattern: Pattern | None) -> dict[str, WeightEncoding]:
    """Stored weight name -> encoding for the ``weight`` of each layer in ``target_layers``
    (module names). ``sources``: stored name -> state-dict name (the layout's). ``nm`` needs
    ``pattern`` N:M."""
    formats.check_format(format)
    if format == "dense":
        return {}
    if format == "nm" and (pattern is None or not pattern.is_nm):
        raise CheckpointFormatError(
            "format nm needs the N:M pattern the targets were pruned to (a recipe with "
            f"pattern N:M, or --pattern N:M), got {pattern or 'none'}")
    stored_of = {source: stored for stored, source in sources.items()}
    encodings = {}
    for layer in target_layers:
        module = model.get_submodule(layer)
        source = f"{layer}.weight"
        if source not in stored_of:
            raise CheckpointFormatError(f"target {layer} has no stored weight in the checkpoint")
        if module.weight.dim() != 2:
            raise CheckpointFormatError(f"target {source} is not 2-D: {tuple(module.weight.shape)}")
        axis = 1 if isinstance(module, nn.Linear) else 0  # Conv1D: (d_in, d_out)
        if format == "nm":
            encodings[stored_of[source]] = WeightEncoding("nm", pattern.n, pattern.m, axis)
        else:
            encodings[stored_of[source]] = WeightEncoding("bitmask")
    return encodings


def quantization_section(format: str, pattern: Pattern | None, global_sparsity: float,
                         targets: Iterable[str], tool_version: str) -> dict:
    """The ``quantization_config`` section of a compressed folder's ``config.json``."""
    return {
        formats.QUANT_METHOD_KEY: formats.QUANT_METHOD,
        formats.FORMAT_KEY: formats.check_format(format),
        formats.PATTERN_KEY: str(pattern) if format == "nm" and pattern is not None else None,
        formats.GLOBAL_SPARSITY_KEY: global_sparsity,
        formats.TARGETS_KEY: sorted(targets),
        formats.TOOL_VERSION_KEY: tool_version,
    }


__all__ = ["WeightEncoding", "decode_weight", "encode_weight", "encoded_weights",
           "plan_encodings", "quantization_section", "stored_format"]
