"""Optimal Brain Surgeon solvers: exact greedy per row, and blockwise for scale.

Shapes: ``W: (d_out, d_in)``; ``H, H^-1, U: (d_in, d_in)`` with ``H^-1 = U^T U``, ``U``
upper triangular; a block ``F`` of columns, ``R`` the columns after it.

* :func:`obs_exact` (ExactOBS, Frantar et al. 2022, Alg. 1): each row removes, one at a
  time, the weight of least OBS saliency ``w_q^2 / (2 [H^-1]_qq)``, compensates the rest
  of the row with ``-(w_q / [H^-1]_qq) H^-1 e_q`` and downdates its own ``H^-1``.
  ``O(d_out d_in^3)``.
* :func:`obs_blockwise`: columns in blocks of ``block_size``. Inside block ``F``, with
  earlier columns frozen and later ones free, the inverse Hessian of the block's columns is
  ``[H_{>=F}^-1]_FF = U_FF^T U_FF`` (``U`` restricted to ``>= F`` is the Cholesky factor of
  that trailing inverse, and ``U_RF = 0``), so every row runs exact greedy OBS on that
  ``B x B`` tile. With ``D`` the block's total change, the optimal change of ``R`` is
  ``D U_FF^-1 U_FR`` whatever the order inside the block. ``O(d_out d_in B^2)``.
  With ``block_size >= d_in`` it is :func:`obs_exact`. Derivations: docs/ALGORITHMS.md.

Allocation: ``row`` gives every row the same count; ``layer`` lets rows differ, choosing
the counts from each row's greedy loss trace (the smallest increments over the layer, or
over the block for the blockwise solver, as SparseGPT's per-block threshold does).
``row_groups``: the rows are several layers stacked on one Hessian (q/k/v, gate/up), solved
in one pass; layer allocation then counts and allocates within each group, so every layer
keeps its own sparsity.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from obs_compress_kernels import greedy_obs
from obs_compress_kernels._backend import resolve_backend
from obs_compress_kernels.greedy_obs import TORCH_CHUNK_ELEMENTS

from ..math.inverse import PreparedCurvature
from ..math.masks import Pattern, allocate_by_increments, split_count

# With layer allocation a row may take at most this multiple of the average count (per
# block for obs_blockwise): the greedy loss trace is only computed that far.
ROW_COUNT_CAP = 1.5
# Elements of the batched (rows, B, B) systems of remove_set held at once.
SOLVE_CHUNK_ELEMENTS = 1 << 24
# Layer allocation on the torch backend keeps the trace's weights after every step (rows x
# (cap + 1) x B) when they fit in this many elements, and takes each row's weights at its
# count from there: the same result as remove_set's batched solve, without it (remove_set
# was a quarter of obs_blockwise's CPU time at B = 32).
STEP_WEIGHTS_ELEMENTS = 1 << 26


# (chunk, B, B) arrays remove_set holds at once: the mask product, the masked system, the
# identity part, their sum and its factor.
REMOVE_SET_ARRAYS = 5


def greedy_work_bytes(rows: int, width: int, element_size: int = 4) -> int:
    """Upper bound on the bytes :func:`_greedy_block` holds for a ``(rows, width)`` block
    beyond its input and result (the memory plan's figure): the greedy trace's order (int64)
    and step losses for up to ``width`` steps a row, the torch path's private inverses
    (``TORCH_CHUNK_ELEMENTS``, at least one row's ``B x B``), and the larger of the two ways
    to the weights at each row's count: the kept step weights (when they fit in
    ``STEP_WEIGHTS_ELEMENTS``) or :func:`remove_set`'s batched systems."""
    square = width * width
    trace = rows * width * (8 + element_size)
    inverses = min(rows * square, max(square, TORCH_CHUNK_ELEMENTS)) * element_size
    step_weights = rows * (width + 1) * width
    kept = step_weights if step_weights <= STEP_WEIGHTS_ELEMENTS else 0
    systems = REMOVE_SET_ARRAYS * min(rows * square, max(square, SOLVE_CHUNK_ELEMENTS))
    return trace + inverses + max(kept, systems) * element_size


def _prefix_mask(order: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
    """Mask of the first ``counts[r]`` columns in each row's removal ``order``."""
    taken = torch.arange(order.shape[1], device=order.device)[None, :] < counts[:, None]
    mask = torch.zeros(order.shape[0], width + 1, dtype=torch.bool, device=order.device)
    # Steps not taken scatter into a spare last column that is dropped.
    mask.scatter_(1, torch.where(taken, order, width), True)
    return mask[:, :width]


def remove_set(weight: torch.Tensor, hessian_inverse: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """OBS removal of a whole set per row at once (Hassibi & Stork 1992, eq. 5 for a set).

    For row ``r`` with pruned set ``S``: ``dw = -w_S ([H^-1]_SS)^-1 [H^-1]_S,:``, the minimum
    of ``dw^T H dw`` with ``w_S + dw_S = 0``; identical to removing ``S`` one weight at a
    time with compensation. Batched with the kept coordinates replaced by the identity.
    """
    rows, width = weight.shape
    result = torch.empty_like(weight)
    eye = torch.eye(width, dtype=weight.dtype, device=weight.device)
    chunk = max(1, SOLVE_CHUNK_ELEMENTS // (width * width))
    for start in range(0, rows, chunk):
        w = weight[start:start + chunk]
        pruned = mask[start:start + chunk].to(weight.dtype)
        system = (hessian_inverse * (pruned[:, :, None] * pruned[:, None, :])
                  + eye * (1 - pruned)[:, None, :])
        factor = torch.linalg.cholesky(system)
        solved = torch.cholesky_solve((w * pruned)[:, :, None], factor).squeeze(-1)
        result[start:start + chunk] = w - solved @ hessian_inverse
    return result.masked_fill(mask, 0)


def _group_totals(width: int, start: int, end: int, sparsity: float,
                  groups: Sequence[int]) -> list[int]:
    """Each row group's share of its own layer's count in columns ``[start, end)``."""
    return [split_count(width, start, end, sparsity, size) for size in groups]


def _greedy_block(weight, hessian_inverse, free, *, totals, groups, rows_count, pattern,
                  allocation, backend, row_weights=None):
    """Greedy OBS on one block for every row; returns (weight, mask, per-row loss).

    ``groups``: sizes of the row groups (layers stacked on one Hessian), ``totals`` the
    count each must prune here under layer allocation (:func:`_group_totals`).
    ``row_weights``: ``(rows,)`` factors on each row's loss when layer allocation spreads the
    count over the rows (the Kronecker row factor ``1 / [G^-1]_ii``); None: all 1.
    """
    rows, width = weight.shape
    if pattern.is_nm:
        steps = width // pattern.m * pattern.pruned_per_group
        counts = torch.full((rows,), steps, dtype=torch.long, device=weight.device)
        result = greedy_obs(weight, hessian_inverse, counts, steps, group_size=pattern.m,
                            group_prune=pattern.pruned_per_group, free_columns=free,
                            backend=backend)
    elif allocation == "row":
        counts = torch.full((rows,), rows_count, dtype=torch.long, device=weight.device)
        result = greedy_obs(weight, hessian_inverse, counts, rows_count, free_columns=free,
                            backend=backend)
    else:
        if sum(totals) == 0:
            counts = torch.zeros(rows, dtype=torch.long, device=weight.device)
            return weight.clone(), torch.zeros_like(weight, dtype=torch.bool), counts.to(weight.dtype)
        cap = min(width, max(1, max(math.ceil(ROW_COUNT_CAP * total / size)
                                    for total, size in zip(totals, groups))))
        full = torch.full((rows,), cap, dtype=torch.long, device=weight.device)
        keep_steps = (resolve_backend(backend, weight) == "torch"
                      and rows * (cap + 1) * width <= STEP_WEIGHTS_ELEMENTS)
        trace = greedy_obs(weight, hessian_inverse, full, cap, free_columns=free, backend=backend,
                           keep_step_weights=keep_steps)
        step_loss = (trace.step_loss if row_weights is None
                     else trace.step_loss * row_weights.to(trace.step_loss)[:, None])
        counts = torch.cat([allocate_by_increments(group_loss, total) for group_loss, total
                            in zip(step_loss.split(groups), totals)])
        mask = _prefix_mask(trace.order, counts, width)
        steps = torch.arange(cap, device=weight.device)
        loss = (trace.step_loss * (steps[None, :] < counts[:, None])).sum(dim=1)
        if keep_steps:  # greedy OBS after k steps is the OBS removal of its first k weights
            chosen = trace.step_weights.gather(1, counts.view(rows, 1, 1).expand(rows, 1, width))
            return chosen.squeeze(1).masked_fill(mask, 0), mask, loss
        return remove_set(weight, hessian_inverse, mask), mask, loss
    return result.weight, result.mask, result.step_loss.sum(dim=1)


def obs_exact(weight: torch.Tensor, curvature: PreparedCurvature, *, sparsity: float,
              pattern: Pattern, allocation: str, backend: str = "auto",
              row_groups: Sequence[int] | None = None, row_weights: torch.Tensor | None = None):
    rows, width = weight.shape
    groups = row_groups or [rows]
    return _greedy_block(weight, curvature.hessian_inverse, curvature.dead_inputs,
                         totals=_group_totals(width, 0, width, sparsity, groups),
                         groups=groups, rows_count=split_count(width, 0, width, sparsity),
                         pattern=pattern, allocation=allocation, backend=backend,
                         row_weights=row_weights)


def obs_blockwise(weight: torch.Tensor, curvature: PreparedCurvature, *, sparsity: float,
                  pattern: Pattern, allocation: str, block_size: int, backend: str = "auto",
                  row_groups: Sequence[int] | None = None, row_weights: torch.Tensor | None = None):
    rows, width = weight.shape
    groups = row_groups or [rows]
    upper = curvature.upper_factor
    dead = curvature.dead_inputs
    result = weight.clone()
    mask = torch.zeros_like(weight, dtype=torch.bool)
    loss = torch.zeros(rows, dtype=weight.dtype, device=weight.device)
    for col_start in range(0, width, block_size):
        col_end = min(col_start + block_size, width)
        block_upper = upper[col_start:col_end, col_start:col_end]
        block_inverse = block_upper.T @ block_upper  # conditional inverse U_FF^T U_FF
        before = result[:, col_start:col_end]
        after, block_mask, block_loss = _greedy_block(
            before, block_inverse, dead[col_start:col_end],
            totals=_group_totals(width, col_start, col_end, sparsity, groups), groups=groups,
            rows_count=split_count(width, col_start, col_end, sparsity),
            pattern=pattern, allocation=allocation, backend=backend, row_weights=row_weights)
        if col_end < width:
            # W_R += D U_FF^-1 U_FR: the optimal response of the free columns to D.
            propagate = torch.linalg.solve_triangular(block_upper, upper[col_start:col_end, col_end:],
                                                      upper=True)
            result[:, col_end:].addmm_(after - before, propagate)
        result[:, col_start:col_end] = after
        mask[:, col_start:col_end] = block_mask
        loss += block_loss
    return result, mask, loss
