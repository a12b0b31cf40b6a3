"""Bool mask -> packed bitmask, for compressed sparse export.

Shapes: ``mask: (rows, cols)`` bool; packed: ``(rows, ceil(cols / 8))`` uint8. Bit ``i`` of
byte ``j`` in a row holds column ``8 j + i`` (little bit order, as
``numpy.packbits(mask, axis=1, bitorder="little")`` and the ``sparse-bitmask`` format of
compressed-tensors); the pad bits of a row's last byte are 0. Which mask to pack (pruned or
kept entries) is the caller's choice: set bits are the True entries.
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path works without triton
    triton = None


def _check_mask(mask: torch.Tensor) -> None:
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (rows, cols) bool tensor, got {mask.dtype} "
                         f"of shape {tuple(mask.shape)}")


def pack_bitmask_torch(mask: torch.Tensor) -> torch.Tensor:
    """Reference (also the CPU path)."""
    _check_mask(mask)
    rows, cols = mask.shape
    padded = torch.zeros((rows, -(-cols // 8) * 8), dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask
    weights = 1 << torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (padded.view(rows, -1, 8) * weights).sum(dim=2, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask`: ``(rows, ceil(cols / 8))`` uint8 to ``(rows, cols)``."""
    if packed.ndim != 2 or packed.dtype != torch.uint8 or packed.shape[1] != -(-cols // 8):
        raise ValueError(f"packed must be (rows, {-(-cols // 8)}) uint8 for {cols} columns, got "
                         f"{packed.dtype} of shape {tuple(packed.shape)}")
    bits = torch.arange(8, dtype=torch.uint8, device=packed.device)
    unpacked = (packed[:, :, None] >> bits) & 1
    return unpacked.reshape(packed.shape[0], -1)[:, :cols].bool()


if triton is not None:

    @triton.jit
    def _pack_bitmask_kernel(mask_ptr, packed_ptr, rows, cols, mask_stride, packed_cols,
                             ROWS: tl.constexpr, BYTES: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (R,)
        byte = tl.program_id(1) * BYTES + tl.arange(0, BYTES)  # (Y,)
        row_ok = (row < rows)[:, None]
        row_pointer = mask_ptr + row[:, None].to(tl.int64) * mask_stride
        packed = tl.zeros((ROWS, BYTES), tl.int32)
        for bit in tl.static_range(8):
            col = byte * 8 + bit
            ok = row_ok & (col < cols)[None, :]
            value = tl.load(row_pointer + col[None, :], mask=ok, other=0)
            packed = packed | ((value != 0).to(tl.int32) << bit)
        tl.store(packed_ptr + row[:, None].to(tl.int64) * packed_cols + byte[None, :],
                 packed.to(tl.uint8), mask=row_ok & (byte < packed_cols)[None, :])


def pack_bitmask(mask: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Packs a bool ``(rows, cols)`` mask into ``(rows, ceil(cols / 8))`` uint8 (little bit
    order: bit ``i`` of byte ``j`` is column ``8 j + i``)."""
    _check_mask(mask)
    if resolve_backend(backend, mask) != "triton":
        return pack_bitmask_torch(mask)
    rows, cols = mask.shape
    packed_cols = -(-cols // 8)
    packed = torch.empty((rows, packed_cols), dtype=torch.uint8, device=mask.device)
    if rows and cols:
        source = (mask if mask.stride(1) == 1 else mask.contiguous()).view(torch.uint8)
        block = min(256, triton.next_power_of_2(packed_cols))
        rows_per_program = max(1, min(16, 1024 // block))
        grid = (triton.cdiv(rows, rows_per_program), triton.cdiv(packed_cols, block))
        _pack_bitmask_kernel[grid](source, packed, rows, cols, source.stride(0), packed_cols,
                                   ROWS=rows_per_program, BYTES=block)
    return packed
