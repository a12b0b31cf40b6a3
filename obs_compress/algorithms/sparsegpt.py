"""SparseGPT-style one-shot-threshold solver: the peer baseline (Frantar & Alistarh 2023).

Not one of obs_compress's methods: kept so that tests and benchmarks compare against the
field's standard on the same Hessian. Shapes: ``W: (d_out, d_in)``, ``U: (d_in, d_in)``
upper with ``H^-1 = U^T U``.

Per block of ``block_size`` columns the mask is chosen once, before any update inside the
block: the lowest ``w^2 / U_jj^2`` over the whole block (all rows, so rows differ), or the
``M - N`` lowest of every group for N:M (chosen when the group's first column is reached).
Then the columns are quantised to 0 one by one, left to right, each pruned weight's error
``w_j / U_jj`` spread over the remaining columns of the block with ``U_j,:``, and the
block's accumulated error over the later columns with one matrix multiply (Alg. 1).
"""

from __future__ import annotations

import torch

from ..math.inverse import PreparedCurvature
from ..math.masks import Pattern, split_count


def sparsegpt(weight: torch.Tensor, curvature: PreparedCurvature, *, sparsity: float,
              pattern: Pattern, block_size: int = 128):
    rows, width = weight.shape
    upper = curvature.upper_factor
    result = weight.clone()
    mask = torch.zeros_like(weight, dtype=torch.bool)
    loss = torch.zeros(rows, dtype=weight.dtype, device=weight.device)
    for col_start in range(0, width, block_size):
        col_end = min(col_start + block_size, width)
        block = result[:, col_start:col_end].clone()
        block_upper = upper[col_start:col_end, col_start:col_end]
        diagonal = torch.diagonal(block_upper)
        block_error = torch.zeros_like(block)
        block_mask = torch.zeros_like(block, dtype=torch.bool)
        if not pattern.is_nm:
            scores = block * block / diagonal ** 2
            count = split_count(width, col_start, col_end, sparsity, rows)
            if count:
                index = torch.topk(scores.flatten(), count, largest=False).indices
                block_mask.view(-1)[index] = True
        for j in range(col_end - col_start):
            if pattern.is_nm and j % pattern.m == 0:
                group = block[:, j:j + pattern.m]
                scores = group * group / diagonal[j:j + pattern.m] ** 2
                index = torch.topk(scores, pattern.pruned_per_group, dim=1, largest=False).indices
                block_mask[:, j:j + pattern.m].scatter_(1, index, True)
            column = block[:, j]
            pruned_value = torch.where(block_mask[:, j], column, torch.zeros_like(column))
            error = pruned_value / diagonal[j]
            loss += error * error / 2
            block[:, j:] -= error[:, None] * block_upper[j, j:][None, :]
            block[:, j] = torch.where(block_mask[:, j], torch.zeros_like(column), block[:, j])
            block_error[:, j] = error
        result[:, col_start:col_end] = block
        result[:, col_end:] -= block_error @ upper[col_start:col_end, col_end:]
        mask[:, col_start:col_end] = block_mask
    return result, mask, loss
