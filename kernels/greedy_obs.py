"""Row-batched exact greedy OBS on a block of columns.

Shapes: ``weight: (rows, B)``, ``hessian_inverse: (B, B)`` shared by every row (each row
works on its own copy), ``prune_counts: (rows,)``. For ``obs_exact`` the block is the
whole row and ``hessian_inverse`` is ``H^-1``; for ``obs_blockwise`` it is the block's
conditional inverse ``U_FF^T U_FF``.

Each row repeats, while it has prunes left (ExactOBS, Frantar et al. 2022, Alg. 1):

1. saliency ``s_j = w_j^2 / (2 [H^-1]_jj)`` over weights still present (0 for free
   columns; for N:M, +inf in groups that already hold ``M - N`` zeros);
2. ``q = argmin s`` (lowest index on ties); record ``q`` and ``s_q`` (the loss increase);
3. compensate ``w <- w - (w_q / [H^-1]_qq) H^-1 e_q`` and set ``w_q = 0`` exactly;
4. downdate ``H^-1 <- H^-1 - H^-1 e_q e_q^T H^-1 / [H^-1]_qq`` (Hassibi & Stork 1992,
   eq. 5 and the inverse of the Hessian with row and column q removed).

``greedy_obs`` dispatches: ``backend="auto"`` runs Triton for CUDA tensors and
``greedy_obs_torch`` otherwise; ``backend="triton"`` on CPU runs the Triton interpreter
and needs ``TRITON_INTERPRET=1`` set before this module is imported (tests only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._backend import resolve_backend


@dataclass(frozen=True)
class GreedyObsResult:
    weight: torch.Tensor  # (rows, B), pruned entries exactly 0
    mask: torch.Tensor  # (rows, B) bool, True where pruned
    order: torch.Tensor  # (rows, max_steps) int64, pruned column per step, -1 if none
    step_loss: torch.Tensor  # (rows, max_steps), loss increase per step, 0 if none


def _check_arguments(weight, hessian_inverse, prune_counts, max_steps, group_size, group_prune,
                     free_columns):
    rows, width = weight.shape
    if hessian_inverse.shape != (width, width):
        raise ValueError(f"hessian_inverse must be ({width}, {width}), got {tuple(hessian_inverse.shape)}")
    if prune_counts.shape != (rows,):
        raise ValueError(f"prune_counts must be ({rows},), got {tuple(prune_counts.shape)}")
    if not 0 <= max_steps <= width:
        raise ValueError(f"max_steps must be in [0, {width}], got {max_steps}")
    if group_size:
        if width % group_size or not 0 < group_prune < group_size:
            raise ValueError(f"group_size {group_size} must divide the width {width} and "
                             f"0 < group_prune ({group_prune}) < group_size")
    if free_columns is not None and free_columns.shape != (width,):
        raise ValueError(f"free_columns must be ({width},), got {tuple(free_columns.shape)}")


def greedy_obs_torch(weight: torch.Tensor, hessian_inverse: torch.Tensor,
                     prune_counts: torch.Tensor, max_steps: int, *, group_size: int = 0,
                     group_prune: int = 0, free_columns: torch.Tensor | None = None,
                     row_chunk: int = 128) -> GreedyObsResult:
    """Reference implementation, vectorised over rows (also the CPU path).

    Rows go in chunks of ``row_chunk`` so that a chunk's private inverses
    (``row_chunk x B x B``) stay in cache.
    """
    _check_arguments(weight, hessian_inverse, prune_counts, max_steps, group_size, group_prune,
                     free_columns)
    rows, width = weight.shape
    device, dtype = weight.device, weight.dtype
    out_weight = weight.clone()
    out_mask = torch.zeros(rows, width, dtype=torch.bool, device=device)
    order = torch.full((rows, max_steps), -1, dtype=torch.long, device=device)
    step_loss = torch.zeros(rows, max_steps, dtype=dtype, device=device)
    counts = prune_counts.to(device=device, dtype=torch.long).clamp(max=max_steps)
    inverse = hessian_inverse.to(dtype)
    free = free_columns.to(device) if free_columns is not None else None
    infinity = torch.tensor(float("inf"), dtype=dtype, device=device)

    for start in range(0, rows, row_chunk):
        stop = min(start + row_chunk, rows)
        chunk_counts = counts[start:stop]
        steps = int(chunk_counts.max().item()) if stop > start else 0
        if steps == 0:
            continue
        w = out_weight[start:stop]  # view: updated in place
        pruned = out_mask[start:stop]
        b = stop - start
        row_index = torch.arange(b, device=device)
        chunk_inverse = inverse.expand(b, width, width).clone()
        for step in range(steps):
            active = step < chunk_counts  # (b,)
            diagonal = torch.diagonal(chunk_inverse, dim1=1, dim2=2)
            saliency = w * w / (2 * diagonal)
            if free is not None:
                saliency = torch.where(free, torch.zeros_like(saliency), saliency)
            blocked = pruned
            if group_size:
                full = pruned.view(b, -1, group_size).sum(-1) >= group_prune
                blocked = blocked | full.repeat_interleave(group_size, dim=1)
            saliency = torch.where(blocked, infinity, saliency)
            chosen = torch.argmin(saliency, dim=1)  # first index on ties
            loss = saliency[row_index, chosen]
            pivot = diagonal[row_index, chosen]
            column = chunk_inverse[row_index, :, chosen]  # (b, B) = H^-1 e_q
            active_f = active.to(dtype)
            coefficient = w[row_index, chosen] / pivot * active_f
            w.sub_(coefficient[:, None] * column)
            # Rank-1 downdate, skipped (scaled by 0) for rows that are done.
            scaled = column * (active_f / pivot)[:, None]
            chunk_inverse.baddbmm_(column[:, :, None], scaled[:, None, :], alpha=-1)
            active_rows = row_index[active]
            w[active_rows, chosen[active]] = 0
            pruned[active_rows, chosen[active]] = True
            order[start + active_rows, step] = chosen[active]
            step_loss[start + active_rows, step] = loss[active]
    return GreedyObsResult(out_weight, out_mask, order, step_loss)


def greedy_obs(weight: torch.Tensor, hessian_inverse: torch.Tensor, prune_counts: torch.Tensor,
               max_steps: int, *, group_size: int = 0, group_prune: int = 0,
               free_columns: torch.Tensor | None = None, backend: str = "auto") -> GreedyObsResult:
    """Exact greedy OBS for every row of a block; see the module docstring."""
    if resolve_backend(backend, weight) == "triton":
        from .greedy_obs_triton import greedy_obs_triton

        _check_arguments(weight, hessian_inverse, prune_counts, max_steps, group_size,
                         group_prune, free_columns)
        return greedy_obs_triton(weight, hessian_inverse, prune_counts, max_steps,
                                 group_size=group_size, group_prune=group_prune,
                                 free_columns=free_columns)
    return greedy_obs_torch(weight, hessian_inverse, prune_counts, max_steps,
                            group_size=group_size, group_prune=group_prune,
                            free_columns=free_columns)
