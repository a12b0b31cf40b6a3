"""Kronecker-factored curvature, as pure tensor functions.

Shapes: ``W: (d_out, d_in)``; ``A = E[x x^T]: (d_in, d_in)`` over the layer's inputs;
``G = E[g g^T]: (d_out, d_out)`` over gradients of the loss w.r.t. the layer's outputs;
the curvature of ``vec(W)`` (row-major) is ``F ~= G (x) A`` (K-FAC, Martens & Grosse 2015;
LLM Surgeon, van der Ouderaa et al. 2024, sec. 3). Since ``(G (x) A)^-1 = G^-1 (x) A^-1``,
``[F^-1]_{(i,j),(i,j)} = [G^-1]_ii [A^-1]_jj`` and the OBS saliency (Hassibi & Stork 1992,
eq. 5) of one weight is ``w_ij^2 / (2 [G^-1]_ii [A^-1]_jj)``.

Removing whole groups of columns (structured OBS) is :mod:`obs_compress.math.structured`.
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidArgument, NonFiniteError


def damp_factor(factor: torch.Tensor, dampening_frac: float) -> torch.Tensor:
    """Return ``factor + dampening_frac * mean(diag(factor)) * I`` (a new tensor).

    ``factor``: ``(d, d)``, a Kronecker factor ``A`` or ``G``.
    """
    if not (isinstance(dampening_frac, (int, float)) and math.isfinite(dampening_frac)
            and dampening_frac >= 0):
        raise InvalidArgument(
            f"dampening_frac must be a finite number >= 0, got {dampening_frac!r}")
    if factor.ndim != 2 or factor.shape[0] != factor.shape[1]:
        raise InvalidArgument(
            f"a Kronecker factor must be square (d, d), got shape {tuple(factor.shape)}")
    if not torch.isfinite(factor).all():
        raise NonFiniteError("the Kronecker factor holds NaN or infinity")
    diagonal = torch.diagonal(factor)
    damped = factor.clone()
    damped.diagonal().add_(dampening_frac * diagonal.mean())
    return damped


def kronecker_row_weights(g_factor: torch.Tensor, dampening_frac: float) -> torch.Tensor:
    """The row factors ``1 / [G^-1]_ii`` of the damped output factor ``G``, scaled to mean 1:
    ``(d_out,)``. With them a row's layer-wise OBS loss becomes its loss under ``G (x) A``
    when each row is compensated within itself (exact for a diagonal ``G``, where
    ``1 / [G^-1]_ii = G_ii``; for a full ``G`` the Kronecker saliency's row factor, LLM
    Surgeon eq. 5). ``G = I`` gives all ones."""
    from ..errors import HessianNotPositiveDefinite

    damped = damp_factor(g_factor.double(), dampening_frac)
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        raise HessianNotPositiveDefinite(
            f"the output factor G (d_out {damped.shape[0]}) is not positive definite with "
            f"dampening_frac_g {dampening_frac:g}; raise curvature.dampening_frac_g")
    weights = 1.0 / torch.diagonal(torch.cholesky_inverse(factor))
    return (weights / weights.mean()).to(g_factor.dtype)


def kronecker_inverse_diagonal(g_inverse: torch.Tensor, a_inverse: torch.Tensor) -> torch.Tensor:
    """``[G^-1]_ii [A^-1]_jj`` as a ``(d_out, d_in)`` matrix: the diagonal of ``G^-1 (x) A^-1``."""
    return torch.outer(torch.diagonal(g_inverse), torch.diagonal(a_inverse))


def kronecker_saliency(weight: torch.Tensor, g_inverse: torch.Tensor,
                       a_inverse: torch.Tensor) -> torch.Tensor:
    """OBS saliency under ``F = G (x) A``: ``w_ij^2 / (2 [G^-1]_ii [A^-1]_jj)``, shape of W."""
    return weight * weight / (2 * kronecker_inverse_diagonal(g_inverse, a_inverse))
