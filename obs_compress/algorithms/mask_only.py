"""Mask-only baselines: magnitude and Optimal Brain Damage (no weight update).

Shapes: ``W: (d_out, d_in)``, ``diag(H): (d_in,)``.

* magnitude: prune the smallest ``|w|`` (Han et al. 2015).
* OBD (LeCun et al. 1990, eq. 6): prune the smallest ``w^2 H_qq / 2``; inputs that were
  zero on every calibration token score 0 and go first.
"""

from __future__ import annotations

import torch

from obs_compress_kernels import nm_mask

from ..math.masks import Pattern, mask_lowest
from ..math.saliency import magnitude_saliency, obd_saliency


def _mask(scores: torch.Tensor, sparsity: float, pattern: Pattern, allocation: str):
    if pattern.is_nm:  # ties go to the lowest index, on CPU (torch) and GPU (Triton) alike
        return nm_mask(scores, pattern.n, pattern.m)
    return mask_lowest(scores, sparsity, allocation)


def magnitude(weight: torch.Tensor, *, sparsity: float, pattern: Pattern, allocation: str):
    return _mask(magnitude_saliency(weight), sparsity, pattern, allocation)


def obd(weight: torch.Tensor, hessian_diagonal: torch.Tensor, *, sparsity: float,
        pattern: Pattern, allocation: str, row_weights: torch.Tensor | None = None):
    """``row_weights``: ``(d_out,)`` factors on each row's saliencies (the Kronecker row
    factor), which move only a layer allocation's spread over the rows."""
    scores = obd_saliency(weight, hessian_diagonal)
    if row_weights is not None:
        scores = scores * row_weights.to(scores)[:, None]
    return _mask(scores, sparsity, pattern, allocation)
