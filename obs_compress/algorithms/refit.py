"""Exact refit of the kept weights for a fixed mask (ALPS-style final step).

Shapes: ``W: (d_out, d_in)``, ``mask: (d_out, d_in)`` bool (True where pruned),
``H: (d_in, d_in)``.

For one row with pruned set ``P`` and kept set ``K``, the quadratic
``(w' - w)^T H (w' - w) / 2`` with ``w'_P = 0`` is minimised by

    w'_K = w_K + H_KK^-1 H_KP w_P

(set the gradient on ``K`` to zero). Every row has its own ``K``, so the systems are
batched with the pruned coordinates replaced by the identity:
``A = diag(k) H diag(k) + diag(1 - k)`` with ``k`` the keep indicator. Solved directly
(batched Cholesky) when the width is small, else by preconditioned conjugate gradient
batched over rows and run to convergence (Meng et al. 2024, ALPS, sec. 3.3).

The preconditioner is ``[H^-1]_KK`` when the solver has ``H^-1`` at hand (it always has, after
OBS): ``[H^-1]_KK H_KK = I - [H^-1]_KP H_PK``, which is the identity when nothing is pruned
and stays far better conditioned than ``H_KK`` itself. On SmolLM2's Hessians it needs 14-26
iterations where Jacobi (``diag(H)``, the fallback) needs 45-203, for 1.5-4.4x less time
at one more product per iteration (the seven layers of block 0).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# Above this width conjugate gradient beats the batched Cholesky by several times on CPU.
DIRECT_MAX_WIDTH = 256
# Elements of the batched (rows, d_in, d_in) systems held at once by the direct path.
DIRECT_CHUNK_ELEMENTS = 1 << 25


# Elements of the change taken at a time by row_losses (its temporaries: about three such
# chunks, not three (d_out, d_in) matrices: 0.4 GB for a stacked gate/up of a 1.5B Llama).
LOSS_CHUNK_ELEMENTS = 1 << 22
# Elements of the weight solved at a time by conjugate gradient (16 MiB in fp32 per work matrix).
CG_CHUNK_ELEMENTS = 1 << 22
# Work matrices of CG_CHUNK_ELEMENTS conjugate gradient holds at its peak (with temporaries).
CG_WORK_MATRICES = 10


def row_losses(new: torch.Tensor, hessian: torch.Tensor,
               old: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row ``delta_r^T H delta_r / 2``: the increase of ``E`` caused by ``delta = new -
    old`` (``old`` None: ``new`` is the change itself), in ``H``'s dtype, a chunk of rows at
    a time."""
    rows = max(1, LOSS_CHUNK_ELEMENTS // max(1, new.shape[1]))
    losses = []
    for start in range(0, new.shape[0], rows):
        delta = new[start:start + rows].to(hessian.dtype)
        if old is not None:
            delta = delta - old[start:start + rows].to(hessian.dtype)
        losses.append(((delta @ hessian) * delta).sum(dim=1) / 2)
    return torch.cat(losses) if losses else new.new_zeros(0, dtype=hessian.dtype)


def _refit_direct(weight, mask, hessian):
    rows, width = weight.shape
    keep = (~mask).to(weight.dtype)
    right_hand = ((weight * mask) @ hessian) * keep  # (H_KP w_P) on K, 0 on P
    change = torch.zeros_like(weight)
    chunk = max(1, DIRECT_CHUNK_ELEMENTS // (width * width))
    eye = torch.eye(width, dtype=weight.dtype, device=weight.device)
    for start in range(0, rows, chunk):
        k = keep[start:start + chunk]
        system = hessian * (k[:, :, None] * k[:, None, :]) + eye * (1 - k)[:, None, :]
        factor, info = torch.linalg.cholesky_ex(system)
        if (info != 0).any():
            # Damped H restricted to K is positive definite in exact arithmetic; rounding in
            # fp32 can still break it, and a general solve is then the honest fallback.
            change[start:start + chunk] = torch.linalg.solve(
                system, right_hand[start:start + chunk, :, None]).squeeze(-1)
        else:
            change[start:start + chunk] = torch.cholesky_solve(
                right_hand[start:start + chunk, :, None], factor).squeeze(-1)
    return (weight + change) * keep


def _refit_conjugate_gradient(weight, mask, hessian, tolerance, max_iterations, initial=None,
                              hessian_inverse=None):
    # Rows are independent systems: a chunk of rows at a time (CG_CHUNK_ELEMENTS) bounds
    # the (rows, d_in) work matrices (by count, about 9 x 64 MiB for a 2048 x 8192 fp32
    # down_proj at once) and leaves each row's answer to the same tolerance.
    rows = max(1, CG_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    result = torch.empty_like(weight)
    for start in range(0, weight.shape[0], rows):
        part = slice(start, start + rows)
        result[part] = _conjugate_gradient_rows(
            weight[part], mask[part], hessian, tolerance, max_iterations,
            None if initial is None else initial[part], hessian_inverse)
    return result


def _conjugate_gradient_rows(weight, mask, hessian, tolerance, max_iterations, initial,
                             hessian_inverse):
    keep = (~mask).to(weight.dtype)
    right_hand = ((weight * mask) @ hessian) * keep
    if hessian_inverse is not None:
        def precondition(residual):
            return (residual @ hessian_inverse) * keep  # [H^-1]_KK r, 0 on P
    else:
        diagonal = torch.diagonal(hessian).clamp_min(torch.finfo(weight.dtype).tiny)

        def precondition(residual):
            return residual / diagonal
    if initial is None:
        solution = torch.zeros_like(weight)
        residual = right_hand.clone()
    else:
        # The unknown is the change of the kept weights; a solver's result is a close guess.
        solution = (initial - weight) * keep
        residual = right_hand - (solution @ hessian) * keep
    z = precondition(residual)
    direction = z.clone()
    rz = (residual * z).sum(1)
    norm_rhs = right_hand.norm(dim=1).clamp_min(torch.finfo(weight.dtype).tiny)
    iteration = 0
    for iteration in range(1, max_iterations + 1):
        product = (direction @ hessian) * keep  # A p on K; p is 0 on P
        curvature = (direction * product).sum(1)
        step = torch.where(curvature > 0, rz / curvature, torch.zeros_like(rz))
        solution.add_(step[:, None] * direction)
        residual.sub_(step[:, None] * product)
        if (residual.norm(dim=1) / norm_rhs).max().item() < tolerance:
            break
        z = precondition(residual)
        rz_next = (residual * z).sum(1)
        beta = torch.where(rz > 0, rz_next / rz, torch.zeros_like(rz))
        direction = z + beta[:, None] * direction
        rz = rz_next
    else:
        logger.warning("refit: conjugate gradient reached %d iterations with relative residual "
                       "%.2e (tolerance %.0e)", max_iterations,
                       (residual.norm(dim=1) / norm_rhs).max().item(), tolerance)
    logger.debug("refit: conjugate gradient converged in %d iterations", iteration)
    return (weight + solution) * keep


def refit_kept_weights(weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, *,
                       solver: str = "auto", tolerance: float | None = None,
                       max_iterations: int = 2000,
                       initial: torch.Tensor | None = None,
                       hessian_inverse: torch.Tensor | None = None) -> torch.Tensor:
    """The least-squares optimum of ``weight``'s kept entries for ``mask`` (pruned = 0).

    ``weight`` is the ORIGINAL dense weight (the target of the reconstruction), ``hessian``
    the (damped) ``H``. ``solver``: ``"direct"``, ``"cg"`` or ``"auto"`` (direct up to
    ``DIRECT_MAX_WIDTH`` inputs). ``initial``: a pruned weight to start conjugate gradient
    from (an OBS solver's result is already near the optimum, so fewer iterations run).
    ``hessian_inverse``: the inverse of ``hessian``, the conjugate gradient's preconditioner
    (Jacobi without it). The tolerance is on the residual relative to the right-hand side,
    whatever the start.
    """
    if solver == "auto":
        solver = "direct" if weight.shape[1] <= DIRECT_MAX_WIDTH else "cg"
    if solver == "direct":
        return _refit_direct(weight, mask, hessian)
    if solver == "cg":
        if tolerance is None:
            tolerance = 1e-10 if weight.dtype == torch.float64 else 1e-3
        return _refit_conjugate_gradient(weight, mask, hessian, tolerance, max_iterations,
                                         initial, hessian_inverse)
    raise ValueError(f"solver must be 'auto', 'direct' or 'cg', got {solver!r}")
