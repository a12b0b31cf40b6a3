"""Encode and decode of the compressed weight formats (issue 12): pure functions on tensors.

A 2-D weight ``W`` of shape ``(rows, cols)`` named ``NAME`` is stored as tensors whose names
are ``NAME`` plus a fixed suffix (:func:`stored_names`):

``bitmask``
    ``NAME.bitmask``  uint8 ``(rows, ceil(cols / 8))``: the mask of kept (nonzero) entries,
                      packed by ``obs_compress_kernels.bitmask.pack_bitmask_torch``
                      (byte ``j`` of a row holds columns ``8 j .. 8 j + 7``, little bit order).
    ``NAME.values``   ``W.dtype`` ``(popcount,)``: the kept values in row-major order.
``nm`` (at most ``n`` kept of every ``m`` consecutive entries along the input dim ``cols``)
    ``NAME.values``     ``W.dtype`` ``(rows, cols / m * n)``: per group the ``n`` selected
                        entries, kept entries first in column order, then (where a group kept
                        fewer than ``n``) its first pruned entries, whose value is zero.
    ``NAME.positions``  uint8 ``(rows, ceil(cols / m * n * b / 8))``, ``b = ceil(log2 m)``:
                        each selected entry's index within its group as ``b`` bits (least
                        significant first), all of a row's bits in a row packed with the same
                        bitmask packing as above (2:4: 4 bits per group; 4:8: 12 bits).
    ``NAME.pattern``    int64 ``(2,)``: ``n, m``; or ``(3,)``: ``n, m, 0`` when the groups run
                        along the ROWS of the stored tensor (``axis=0``: GPT-2's ``Conv1D``
                        stores its weight ``(d_in, d_out)``, so its input dim is the rows);
                        then ``values``/``positions`` are those of the transpose
                        ``(cols, rows)`` and decoding transposes back.
both
    ``NAME.shape``  int64 ``(2,)``: ``rows, cols``.
    ``NAME.crc32``  int64 ``(1,)``: ``zlib.crc32`` of the bytes of the index tensor
                    (``bitmask`` or ``positions``) followed by the bytes of ``values``.

Decoding checks every shape, count and dtype (and, given ``file_size``, that the stored bytes
fit in the file) before it allocates the dense weight, and refuses a checksum mismatch with
:class:`~obs_compress.errors.CheckpointFormatError`. Decode(encode(W)) is bit-identical to
``W`` except that a pruned ``-0.0`` comes back as ``+0.0`` (zeros are what is dropped).
"""

from __future__ import annotations

import math
import zlib
from typing import Mapping

import torch
from obs_compress_kernels.bitmask import pack_bitmask_torch, unpack_bitmask

from obs_compress.errors import CheckpointFormatError

FORMATS = ("dense", "bitmask", "nm")

# The ``config.json`` section of a compressed folder, shared by the writer and the loader:
# {"quant_method": "obs_sparse", "format": "bitmask"|"nm", "pattern": "2:4"|None,
#  "global_sparsity": float, "targets": [stored weight names encoded], "tool_version": str}
QUANTIZATION_CONFIG_KEY = "quantization_config"
QUANT_METHOD_KEY = "quant_method"
QUANT_METHOD = "obs_sparse"
FORMAT_KEY = "format"
PATTERN_KEY = "pattern"
GLOBAL_SPARSITY_KEY = "global_sparsity"
TARGETS_KEY = "targets"
TOOL_VERSION_KEY = "tool_version"

# Suffixes of the stored tensors of each format; a fixed table, never a string sent to code.
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "dense": ("",),
    "bitmask": ("bitmask", "values", "shape", "crc32"),
    "nm": ("values", "positions", "pattern", "shape", "crc32"),
}

ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_format(format: str) -> str:
    """``format`` if it is one of :data:`FORMATS`, else a typed error naming the allowed ones."""
    if format not in FORMATS:
        raise CheckpointFormatError(
            f"unknown weight format {format!r}: the allowed formats are {', '.join(FORMATS)}"
        )
    return format


def stored_names(name: str, format: str) -> dict[str, str]:
    """Suffix -> full stored tensor name of weight ``name`` in ``format`` (dense: ``{'': name}``)."""
    return {s: (f"{name}.{s}" if s else name) for s in _SUFFIXES[check_format(format)]}


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy when it is contiguous (zlib reads the buffer)."""
    return memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _crc(index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.tensor([zlib.crc32(_bytes(values), zlib.crc32(_bytes(index)))], dtype=torch.int64)


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise CheckpointFormatError(f"a compressed weight must be 2-D, got shape {tuple(weight.shape)}")
    if weight.dtype not in ALLOWED_DTYPES:
        raise CheckpointFormatError(f"weight dtype {weight.dtype} is not one of {ALLOWED_DTYPES}")


def encode_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``bitmask`` tensors of a 2-D weight, keyed by suffix (see the module docstring)."""
    _check_weight(weight)
    weight = weight.detach().cpu().contiguous()
    kept = weight != 0
    packed = pack_bitmask_torch(kept)
    values = weight[kept].contiguous()
    return {
        "bitmask": packed,
        "values": values,
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "crc32": _crc(packed, values),
    }


def _position_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def encode_nm(weight: torch.Tensor, n: int, m: int, *, axis: int = 1) -> dict[str, torch.Tensor]:
    """The ``nm`` tensors of a 2-D weight pruned to at most ``n`` of every ``m`` along its
    columns (``axis=1``) or rows (``axis=0``), keyed by suffix; refuses a weight that breaks
    the pattern, naming the first group."""
    _check_weight(weight)
    if axis not in (0, 1):
        raise CheckpointFormatError(f"N:M groups run along axis 0 or 1, got {axis}")
    if axis == 0:
        encoded = encode_nm(weight.T, n, m)
        encoded["pattern"] = torch.tensor([n, m, 0], dtype=torch.int64)
        encoded["shape"] = torch.tensor(list(weight.shape), dtype=torch.int64)  # as stored
        return encoded
    if not (0 < n <= m <= 256):
        raise CheckpointFormatError(f"N:M pattern {n}:{m} needs 0 < n <= m <= 256")
    rows, cols = weight.shape
    if cols % m:
        raise CheckpointFormatError(f"{cols} columns are not a multiple of the group size {m}")
    weight = weight.detach().cpu().contiguous()
    groups = weight.reshape(rows, cols // m, m)
    pruned = groups == 0
    counts = (~pruned).sum(-1)
    bad = (counts > n).nonzero()
    if len(bad):
        r, g = (int(v) for v in bad[0])
        raise CheckpointFormatError(
            f"weight breaks the {n}:{m} pattern: row {r}, group {g} (columns {g * m}..{g * m + m - 1})"
            f" keeps {int(counts[r, g])} entries"
        )
    # Kept entries first, in column order (stable sort on the pruned flag), then pruned ones.
    order = torch.sort(pruned.to(torch.uint8), dim=-1, stable=True).indices[..., :n]
    values = torch.gather(groups, -1, order).reshape(rows, -1).contiguous()
    b = _position_bits(m)
    bits = (order.reshape(rows, -1, 1) >> torch.arange(b)) & 1
    positions = pack_bitmask_torch(bits.reshape(rows, -1).bool())
    return {
        "values": values,
        "positions": positions,
        "pattern": torch.tensor([n, m], dtype=torch.int64),
        "shape": torch.tensor([rows, cols], dtype=torch.int64),
        "crc32": _crc(positions, values),
    }


def _get(stored: Mapping[str, object], format: str, name: str) -> None:
    missing = [s for s in _SUFFIXES[format] if s not in stored]
    if missing:
        raise CheckpointFormatError(f"{name}: {format} tensors {', '.join(missing)} are missing")


def _shape(shape: torch.Tensor, name: str) -> tuple[int, int]:
    if shape.dtype != torch.int64 or shape.shape != (2,):
        raise CheckpointFormatError(f"{name}.shape must be int64 of 2 entries, got {shape.dtype} {tuple(shape.shape)}")
    rows, cols = (int(v) for v in shape)
    if rows <= 0 or cols <= 0:
        raise CheckpointFormatError(f"{name}.shape {rows}x{cols} is not positive")
    return rows, cols


def _pattern(pattern: torch.Tensor, name: str) -> tuple[int, int, int]:
    """``(n, m, axis)`` of an ``nm`` weight's ``pattern`` tensor."""
    if pattern.dtype != torch.int64 or pattern.shape not in ((2,), (3,)):
        raise CheckpointFormatError(f"{name}.pattern must be int64 of 2 or 3 entries")
    if pattern.shape == (3,) and int(pattern[2]) != 0:
        raise CheckpointFormatError(f"{name}.pattern's third entry (the axis) must be 0")
    n, m = (int(v) for v in pattern[:2])
    if not 0 < n <= m <= 256:
        raise CheckpointFormatError(f"{name}: pattern {n}:{m} needs 0 < n <= m <= 256")
    return n, m, 0 if pattern.shape == (3,) else 1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


StoredLayout = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]  # suffix -> (dtype, shape)


def check_layout(format: str, name: str, layout: StoredLayout, shape: torch.Tensor,
                 pattern: torch.Tensor | None = None) -> tuple[int, int]:
    """Check the dtype and shape of every stored tensor of weight ``name`` (``layout``: from
    a file's header, or of the tensors themselves) against its ``shape`` tensor (and, for
    ``nm``, its ``pattern`` tensor), before any data is read. Returns the dense
    ``(rows, cols)``; refuses with :class:`CheckpointFormatError` naming the tensor."""
    _get(layout, check_format(format), name)

    def expect(suffix: str, dtype: torch.dtype, dims: tuple[int, ...]) -> None:
        got_dtype, got_dims = layout[suffix]
        if got_dtype != dtype or tuple(got_dims) != dims:
            raise CheckpointFormatError(
                f"{name}.{suffix} is {_dtype_name(got_dtype)} {tuple(got_dims)}, the shape "
                f"{rows}x{cols} needs {_dtype_name(dtype)} {dims}")

    rows, cols = _shape(shape, name)
    values_dtype, values_dims = layout["values"]
    if values_dtype not in ALLOWED_DTYPES:
        raise CheckpointFormatError(f"{name}.values has dtype {values_dtype}, not one of {ALLOWED_DTYPES}")
    expect("shape", torch.int64, (2,))
    expect("crc32", torch.int64, (1,))
    if format == "bitmask":
        expect("bitmask", torch.uint8, (rows, (cols + 7) // 8))
        if len(values_dims) != 1 or values_dims[0] > rows * cols:
            raise CheckpointFormatError(f"{name}.values is {tuple(values_dims)}, the shape "
                                        f"{rows}x{cols} holds at most {rows * cols} entries in 1-D")
        return rows, cols
    if pattern is None:
        raise CheckpointFormatError(f"{name}: nm tensors pattern are missing")
    n, m, axis = _pattern(pattern, name)
    expect("pattern", torch.int64, (2,) if axis == 1 else (3,))
    grouped_rows, grouped_cols = (rows, cols) if axis == 1 else (cols, rows)
    if grouped_cols % m:
        raise CheckpointFormatError(f"{name}: pattern {n}:{m} does not fit {grouped_cols} columns")
    per_row = grouped_cols // m * n
    expect("values", values_dtype, (grouped_rows, per_row))
    expect("positions", torch.uint8, (grouped_rows, (per_row * _position_bits(m) + 7) // 8))
    return rows, cols


def _layout_of(stored: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {suffix: (t.dtype, tuple(t.shape)) for suffix, t in stored.items()}


def _check_file_size(name: str, file_size: int | None, *tensors: torch.Tensor) -> None:
    if file_size is None:
        return
    stored = sum(t.numel() * t.element_size() for t in tensors)
    if stored > file_size:
        raise CheckpointFormatError(
            f"{name}: the stored tensors claim {stored} bytes, more than the file's {file_size}"
            " (truncated or corrupt file)"
        )


def _check_crc(stored: Mapping[str, torch.Tensor], index: torch.Tensor, values: torch.Tensor, name: str) -> None:
    if int(stored["crc32"].reshape(())) != int(_crc(index, values)[0]):
        raise CheckpointFormatError(f"{name}: checksum mismatch (crc32 of the stored bytes differs)")


def decode_bitmask(stored: Mapping[str, torch.Tensor], *, name: str, file_size: int | None = None) -> torch.Tensor:
    """The dense weight from its ``bitmask`` tensors (keyed by suffix), every count checked first."""
    _get(stored, "bitmask", name)
    rows, cols = check_layout("bitmask", name, _layout_of(stored), stored["shape"])
    packed, values = stored["bitmask"], stored["values"]
    _check_file_size(name, file_size, packed, values)
    # Bits past the last column (only the last byte of a row has any) must be clear, else
    # the popcount lies about the kept count.
    if cols % 8 and bool((packed[:, -1] >> (cols % 8)).any()):
        raise CheckpointFormatError(f"{name}.bitmask has bits set past column {cols}")
    mask = unpack_bitmask(packed, cols)
    kept = int(mask.sum())
    if kept != values.numel():
        raise CheckpointFormatError(
            f"{name}: the mask keeps {kept} entries but {name}.values holds {values.numel()}"
        )
    _check_crc(stored, packed, values, name)
    return torch.zeros(rows, cols, dtype=values.dtype).masked_scatter_(mask, values)


def decode_nm(stored: Mapping[str, torch.Tensor], *, name: str, file_size: int | None = None) -> torch.Tensor:
    """The dense weight from its ``nm`` tensors (keyed by suffix), every count checked first."""
    _get(stored, "nm", name)
    check_layout("nm", name, _layout_of(stored), stored["shape"], stored["pattern"])
    n, m, axis = _pattern(stored["pattern"], name)
    values, positions = stored["values"], stored["positions"]
    _check_file_size(name, file_size, positions, values)
    rows, per_row = values.shape
    cols = per_row // n * m
    b = _position_bits(m)
    _check_crc(stored, positions, values, name)
    # b <= 8 bits per position: assembled in uint8, widened once for the scatter
    bits = unpack_bitmask(positions, per_row * b).reshape(rows, -1, b).to(torch.uint8)
    index = (bits << torch.arange(b, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    index = index.reshape(rows, cols // m, n).long()
    if bool((index >= m).any()):
        raise CheckpointFormatError(f"{name}.positions holds an index >= the group size {m}")
    if n > 1:  # each position of a group taken once: n distinct ones fill n slots
        taken = torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, index, True)
        if int(taken.sum()) != index.numel():
            raise CheckpointFormatError(f"{name}.positions repeats a position within a group")
    dense = torch.zeros(rows, cols // m, m, dtype=values.dtype)
    dense.scatter_(-1, index, values.reshape(rows, cols // m, n))
    dense = dense.reshape(rows, cols)
    return dense.T.contiguous() if axis == 0 else dense
