"""Kronecker-factored curvature and group (structured) OBS, as pure tensor functions.

Shapes: ``W: (d_out, d_in)``; ``A = E[x x^T]: (d_in, d_in)`` over the layer's inputs;
``G = E[g g^T]: (d_out, d_out)`` over gradients of the loss w.r.t. the layer's outputs;
the curvature of ``vec(W)`` (row-major) is ``F ~= G (x) A`` (K-FAC, Martens & Grosse 2015;
LLM Surgeon, van der Ouderaa et al. 2024, sec. 3). Since ``(G (x) A)^-1 = G^-1 (x) A^-1``,
``[F^-1]_{(i,j),(i,j)} = [G^-1]_ii [A^-1]_jj`` and the OBS saliency (Hassibi & Stork 1992,
eq. 5) of one weight is ``w_ij^2 / (2 [G^-1]_ii [A^-1]_jj)``.

Group OBS (Hassibi & Stork eq. 5 for a set ``Q``; Kurtic et al. 2022): removing the input
columns ``Q`` of ``W`` under a layer-wise curvature ``H: (d_in, d_in)`` shared by every row
gives ``dW = -W[:, Q] ([H^-1]_QQ)^-1 [H^-1]_{Q,:}`` and the predicted loss
``1/2 tr(W_Q ([H^-1]_QQ)^-1 W_Q^T)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def group_obs_columns(weight: torch.Tensor, hessian_inverse: torch.Tensor,
                      columns: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the input ``columns`` of ``weight`` with the group OBS update.

    ``weight``: ``(d_out, d_in)``; ``hessian_inverse``: ``(d_in, d_in)``. Returns the new
    weight (those columns exactly zero) and the predicted loss, a 0-d tensor.
    """
    index = torch.as_tensor(columns, dtype=torch.long, device=weight.device)
    if index.ndim != 1 or index.numel() == 0 or index.unique().numel() != index.numel():
        raise InvalidArgument("columns must be a non-empty list of distinct column indices")
    if int(index.min()) < 0 or int(index.max()) >= weight.shape[1]:
        raise InvalidArgument(f"columns must lie in [0, {weight.shape[1]}), got {index.tolist()}")
    removed = weight[:, index]                                   # (d_out, |Q|)
    block = hessian_inverse[index][:, index]                     # (|Q|, |Q|)
    # solve instead of inverting: coefficients = W_Q ([H^-1]_QQ)^-1
    coefficients = torch.linalg.solve(block, removed.T).T        # (d_out, |Q|); block is symmetric
    new_weight = weight - coefficients @ hessian_inverse[index]
    new_weight[:, index] = 0
    loss = 0.5 * (coefficients * removed).sum()
    return new_weight, loss


def group_saliency_columns(weight: torch.Tensor, hessian_inverse: torch.Tensor,
                           groups: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Predicted loss of removing each group of input columns alone, shape ``(len(groups),)``.

    ``groups=None`` means every column alone (MLP channels), computed in one vectorised
    step as ``sum_i w_ij^2 / (2 [H^-1]_jj)``.
    """
    if groups is None:
        return (weight * weight).sum(dim=0) / (2 * torch.diagonal(hessian_inverse))
    losses = [group_obs_columns(weight, hessian_inverse, group)[1] for group in groups]
    return torch.stack(losses)
