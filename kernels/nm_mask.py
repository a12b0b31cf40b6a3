"""N:M selection from scores: prune the ``M - N`` lowest scores of every ``M`` consecutive.

Shapes: ``scores: (rows, cols)`` with ``M`` dividing ``cols``; the mask is ``(rows, cols)``
bool, True where pruned. NVIDIA's convention (at most ``N`` nonzeros in every group of
``M``): every group holds exactly ``M - N`` pruned entries. Ties go to the lowest index, so
the Triton kernel and the torch reference agree bit for bit (``torch.topk`` leaves the tie
order unspecified).

The kernel ranks each score inside its group by ``M`` comparisons (``rank_j = #{k : s_k <
s_j or (s_k == s_j and k < j)}``) and prunes ranks below ``M - N``: no sort, one pass.
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path works without triton
    triton = None


def _check_arguments(scores: torch.Tensor, n: int, m: int) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be (rows, cols), got shape {tuple(scores.shape)}")
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M (N kept of every M), got N={n}, M={m}")
    if scores.shape[1] % m:
        raise ValueError(f"M={m} must divide the number of columns {scores.shape[1]}")


def nm_mask_torch(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Reference (also the CPU path): a stable sort inside every group."""
    _check_arguments(scores, n, m)
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    lowest = torch.sort(groups, dim=2, stable=True).indices[:, :, :m - n]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(2, lowest, True).reshape(rows, cols)


if triton is not None:

    @triton.jit
    def _nm_mask_kernel(scores_ptr, mask_ptr, rows, cols, scores_stride, prune,
                        M: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (R,)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (C,)
        ok = (row < rows)[:, None] & (col < cols)[None, :]
        row_pointer = scores_ptr + row[:, None].to(tl.int64) * scores_stride
        score = tl.load(row_pointer + col[None, :], mask=ok, other=0.0)
        group_start = (col // M) * M
        position = col - group_start
        rank = tl.zeros((ROWS, BLOCK), tl.int32)
        for k in tl.static_range(M):
            other = tl.load(row_pointer + (group_start + k)[None, :], mask=ok, other=0.0)
            before = (other < score) | ((other == score) & (k < position)[None, :])
            rank += before.to(tl.int32)
        tl.store(mask_ptr + row[:, None].to(tl.int64) * cols + col[None, :],
                 (rank < prune).to(tl.int8), mask=ok)


def nm_mask(scores: torch.Tensor, n: int, m: int, *, backend: str = "auto") -> torch.Tensor:
    """Bool mask, True on the ``m - n`` lowest scores of every group of ``m`` columns."""
    _check_arguments(scores, n, m)
    if resolve_backend(backend, scores) != "triton":
        return nm_mask_torch(scores, n, m)
    rows, cols = scores.shape
    scores = scores if scores.stride(1) == 1 else scores.contiguous()
    mask = torch.empty((rows, cols), dtype=torch.int8, device=scores.device)
    if rows and cols:
        block = min(1024, triton.next_power_of_2(cols))
        rows_per_program = max(1, min(16, 4096 // block))
        grid = (triton.cdiv(rows, rows_per_program), triton.cdiv(cols, block))
        _nm_mask_kernel[grid](scores, mask, rows, cols, scores.stride(0), m - n,
                              M=m, ROWS=rows_per_program, BLOCK=block)
    return mask.view(torch.bool)
