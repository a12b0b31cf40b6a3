"""Activations times a weight held as a bitmask and its kept values: the GPU decode kernel.

Shapes: ``x: (tokens, cols)``, the weight ``W: (rows, cols)`` (a Linear's ``(d_out, d_in)``),
``y = x @ W.T: (tokens, rows)``.

The weight is a :class:`BitmaskWeight`, the ``bitmask`` layout (``packed_mask: (rows,
ceil(cols / 8))`` uint8 in the bit order of :mod:`.bitmask`, ``values: (nnz,)`` the kept
entries in row order) plus one derived table: ``tile_offsets: (rows, n_tiles)`` int32, the
index in ``values`` of the first kept entry of each tile of :data:`TILE_COLS` columns of a
row. With it a program finds any tile's values without scanning the row before it, so the
kernel reads each weight byte once: ``nnz * itemsize + rows * cols / 8 + 4 * rows * n_tiles``
bytes against ``rows * cols * itemsize`` dense (at 50% in bf16: 0.5 + 0.0625 + 0.016 of
dense's 2 bytes per entry, ~0.58x; at 70%, ~0.38x). Decode (a few tokens) is bound by those
bytes, which is where the kernel can beat a dense GEMV; a large batch is bound by arithmetic,
where the dense GEMM wins and :func:`bitmask_matmul_torch` (densify, then one matmul) is the
path.

``_bitmask_matmul_kernel``: one program per ``ROWS`` rows and ``TOKENS`` tokens; for each
tile it expands the mask bits, ranks the kept ones (an exclusive cumulative sum, plus the
tile's offset) to gather their values, and accumulates ``W_tile @ x_tile.T`` in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._backend import resolve_backend
from .bitmask import pack_bitmask, unpack_bitmask

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path works without triton
    triton = None

TILE_COLS = 128  # columns per tile_offsets entry: a multiple of 8 (whole mask bytes) and a power of 2
_MAX_INT32 = 2**31 - 1


@dataclass(frozen=True)
class BitmaskWeight:
    """A ``(rows, cols)`` weight as packed mask + kept values in row order + tile offsets."""

    packed_mask: torch.Tensor  # (rows, ceil(cols / 8)) uint8, set bit = kept entry
    values: torch.Tensor  # (nnz,) the kept entries, row by row, columns ascending
    tile_offsets: torch.Tensor  # (rows, ceil(cols / TILE_COLS)) int32
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.packed_mask, self.values, self.tile_offsets))

    def to(self, device: torch.device | str) -> "BitmaskWeight":
        return BitmaskWeight(self.packed_mask.to(device), self.values.to(device),
                             self.tile_offsets.to(device), self.shape)


def bitmask_weight(weight: torch.Tensor, kept: torch.Tensor | None = None) -> BitmaskWeight:
    """``weight: (rows, cols)`` as a :class:`BitmaskWeight`; ``kept`` (bool, same shape) says
    which entries are stored (default: the nonzero ones). Entries outside ``kept`` must be 0
    (the product would not equal the dense weight's otherwise)."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be (rows, cols), got shape {tuple(weight.shape)}")
    if kept is None:
        kept = weight != 0
    elif kept.shape != weight.shape or kept.dtype != torch.bool:
        raise ValueError(f"kept must be a bool tensor of the weight's shape {tuple(weight.shape)}, "
                         f"got {kept.dtype} of shape {tuple(kept.shape)}")
    elif bool((weight[~kept] != 0).any()):
        raise ValueError("weight has nonzero entries outside kept: the sparse product would "
                         "differ from the dense one")
    rows, cols = weight.shape
    nnz = int(kept.sum())
    if nnz > _MAX_INT32:
        raise ValueError(f"{nnz} kept entries overflow the int32 tile offsets (at most {_MAX_INT32})")
    n_tiles = -(-cols // TILE_COLS)
    padded = torch.zeros((rows, n_tiles * TILE_COLS), dtype=torch.int32, device=weight.device)
    padded[:, :cols] = kept
    per_tile = padded.view(rows, n_tiles, TILE_COLS).sum(dim=2).flatten()
    # The offset of a tile = kept entries in all tiles before it, rows in order.
    tile_offsets = (torch.cumsum(per_tile, 0) - per_tile).view(rows, n_tiles).to(torch.int32)
    return BitmaskWeight(pack_bitmask(kept), weight[kept].contiguous(), tile_offsets,
                         (rows, cols))


def dense_weight(weight: BitmaskWeight) -> torch.Tensor:
    """The ``(rows, cols)`` dense weight, zeros where the mask is clear."""
    kept = unpack_bitmask(weight.packed_mask, weight.shape[1])
    dense = torch.zeros(weight.shape, dtype=weight.values.dtype, device=weight.values.device)
    dense[kept] = weight.values
    return dense


def _check_inputs(x: torch.Tensor, weight: BitmaskWeight) -> None:
    if x.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be (tokens, {weight.shape[1]}), got shape {tuple(x.shape)}")
    if x.dtype != weight.values.dtype or x.device != weight.values.device:
        raise ValueError(f"x is {x.dtype} on {x.device}, the weight {weight.values.dtype} on "
                         f"{weight.values.device}: they must match")


def bitmask_matmul_torch(x: torch.Tensor, weight: BitmaskWeight) -> torch.Tensor:
    """Reference (also the CPU and large-batch path): densify, then ``x @ W.T``."""
    _check_inputs(x, weight)
    return x @ dense_weight(weight).T


if triton is not None:

    @triton.jit
    def _bitmask_matmul_kernel(x_ptr, mask_ptr, values_ptr, offsets_ptr, out_ptr,
                               rows, cols, tokens, x_stride, mask_cols, n_tiles, out_stride,
                               ROWS: tl.constexpr, TOKENS: tl.constexpr, TILE: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (R,)
        token = tl.program_id(1) * TOKENS + tl.arange(0, TOKENS)  # (T,)
        row_ok = row < rows
        token_ok = token < tokens
        row64 = row.to(tl.int64)
        acc = tl.zeros((ROWS, TOKENS), tl.float32)
        for tile in range(0, n_tiles):
            col = tile * TILE + tl.arange(0, TILE)  # (K,)
            col_ok = col < cols
            ok = row_ok[:, None] & col_ok[None, :]  # (R, K)
            mask_byte = tl.load(mask_ptr + row64[:, None] * mask_cols + (col // 8)[None, :],
                                mask=ok, other=0).to(tl.int32)
            bit = (mask_byte >> (col % 8)[None, :]) & 1  # (R, K) 1 = kept
            rank = tl.cumsum(bit, axis=1) - bit  # kept entries before this column in the tile
            start = tl.load(offsets_ptr + row64 * n_tiles + tile, mask=row_ok, other=0)  # (R,)
            position = start.to(tl.int64)[:, None] + rank
            w = tl.load(values_ptr + position, mask=ok & (bit != 0), other=0.0).to(tl.float32)
            xt = tl.load(x_ptr + token.to(tl.int64)[None, :] * x_stride + col[:, None],
                         mask=col_ok[:, None] & token_ok[None, :], other=0.0).to(tl.float32)  # (K, T)
            acc += tl.sum(w[:, :, None] * xt[None, :, :], axis=1)
        out = out_ptr + token.to(tl.int64)[None, :] * out_stride + row64[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & token_ok[None, :])


def bitmask_matmul(x: torch.Tensor, weight: BitmaskWeight, *, backend: str = "auto") -> torch.Tensor:
    """``x @ W.T`` for ``x: (tokens, cols)`` and a :class:`BitmaskWeight` ``W: (rows, cols)``;
    ``(tokens, rows)`` in ``x``'s dtype, accumulated in fp32 by the Triton kernel."""
    _check_inputs(x, weight)
    if resolve_backend(backend, x) != "triton":
        return bitmask_matmul_torch(x, weight)
    rows, cols = weight.shape
    tokens = x.shape[0]
    out = torch.empty((tokens, rows), dtype=x.dtype, device=x.device)
    if rows and tokens:
        source = x if x.stride(1) == 1 else x.contiguous()
        block_tokens = min(8, triton.next_power_of_2(tokens))
        # Few rows per program: decode is bound by memory, and a 4096-row layer then gives
        # 512 programs, enough to keep every SM of a large GPU reading.
        rows_per_program = 8
        grid = (triton.cdiv(rows, rows_per_program), triton.cdiv(tokens, block_tokens))
        _bitmask_matmul_kernel[grid](source, weight.packed_mask, weight.values,
                                     weight.tile_offsets, out, rows, cols, tokens,
                                     source.stride(0), weight.packed_mask.shape[1],
                                     weight.tile_offsets.shape[1], out.stride(0),
                                     ROWS=rows_per_program, TOKENS=block_tokens, TILE=TILE_COLS)
    return out
