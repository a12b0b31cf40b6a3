"""Saliencies: the predicted loss increase of removing each weight alone.

Shapes: ``W: (d_out, d_in)``; ``diag(H)`` and ``diag(H^-1)``: ``(d_in,)``. Lower is safer
to prune. With ``E = ||(W' - W) X^T||^2 / n`` and ``H = 2 X^T X / n``:

* magnitude: ``w^2`` (the loss when ``H = 2 I``, up to scale);
* Optimal Brain Damage (LeCun et al. 1990, eq. 6): ``w^2 H_qq / 2`` (diagonal ``H``,
  no compensation);
* Optimal Brain Surgeon (Hassibi & Stork 1992, eq. 5): ``w^2 / (2 [H^-1]_qq)`` (the rest
  of the row compensates optimally).
"""

from __future__ import annotations

import torch


def magnitude_saliency(weight: torch.Tensor) -> torch.Tensor:
    return weight * weight


def obd_saliency(weight: torch.Tensor, hessian_diagonal: torch.Tensor) -> torch.Tensor:
    return weight * weight * hessian_diagonal / 2


def obs_saliency(weight: torch.Tensor, hessian_inverse_diagonal: torch.Tensor) -> torch.Tensor:
    return weight * weight / (2 * hessian_inverse_diagonal)
