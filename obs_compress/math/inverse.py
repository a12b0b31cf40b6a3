"""Dampening and inverse Hessians.

Shapes: ``H: (d_in, d_in)`` symmetric positive semi-definite; ``U: (d_in, d_in)`` upper
triangular with ``H^-1 = U^T U`` (the factor the blockwise solver walks, as in SparseGPT,
Frantar & Alistarh 2023, sec. 3.2).

* :func:`prepare_curvature` turns a :class:`~obs_compress.math.hessian.Curvature` into the
  damped ``H``, ``H^-1`` and (on demand) ``U``, raising the dampening step by step when the
  Cholesky factorization fails and raising :class:`HessianNotPositiveDefinite` past the cap
  (``max_dampening_frac``).
  It never falls back to the identity.
* :func:`woodbury_downdate_` / :func:`recursive_inverse` are the OBS recursive inverse
  (Hassibi & Stork 1992, eq. 17), ``k`` vectors at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import torch

from ..errors import HessianNotPositiveDefinite, InvalidArgument, NonFiniteError

logger = logging.getLogger(__name__)

# Dampening fractions tried, in order, after the requested one fails, up to the caller's cap
# (max_dampening_frac, 1.0 by default: lambda = mean(diag H) already swamps the data).
DAMPENING_STEPS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def dampening_value(hessian: torch.Tensor, dampening_frac: float) -> float:
    """Absolute dampening ``lambda = dampening_frac * mean(diag H)``."""
    return dampening_frac * torch.diagonal(hessian).mean().item()


def woodbury_downdate_(inverse: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """In place: ``inverse <- (inverse^-1 + V^T V)^-1`` for ``V: (k, d)``. Returns ``inverse``.

    Woodbury: ``(A + V^T V)^-1 = A^-1 - A^-1 V^T (I_k + V A^-1 V^T)^-1 V A^-1``. With
    ``k = 1`` this is the Sherman-Morrison step of Hassibi & Stork (1992, eq. 17).
    """
    projected = vectors @ inverse  # (k, d) = V A^-1 (A^-1 symmetric)
    capacitance = vectors @ projected.T  # (k, k) = V A^-1 V^T
    capacitance.diagonal().add_(1.0)
    factor = torch.linalg.cholesky(capacitance)
    solved = torch.cholesky_solve(projected, factor)  # (I + V A^-1 V^T)^-1 V A^-1
    inverse.sub_(projected.T @ solved)
    # Keep exact symmetry so that rounding does not accumulate over many updates.
    inverse.add_(inverse.T.clone()).mul_(0.5)
    return inverse


def recursive_inverse(inputs: torch.Tensor, alpha: float, *, block_size: int = 1,
                      scale: float = 2.0) -> torch.Tensor:
    """``(alpha I + scale * X^T X)^-1`` in one pass over the rows of ``X: (n, d)``.

    Pure form of the recursion used by the streaming accumulator (kept for tests and for
    researchers): starts from ``(alpha I)^-1`` and folds ``block_size`` rows at a time.
    """
    if not alpha > 0:
        raise InvalidArgument(f"alpha must be > 0, got {alpha}")
    x = inputs.reshape(-1, inputs.shape[-1])
    inverse = torch.eye(x.shape[1], dtype=x.dtype, device=x.device) / alpha
    scaled = x * scale ** 0.5
    for start in range(0, x.shape[0], block_size):
        woodbury_downdate_(inverse, scaled[start:start + block_size])
    return inverse


@dataclass
class PreparedCurvature:
    """Damped curvature of one layer in the solvers' working dtype.

    ``hessian`` is damped (``H + lambda I``, dead inputs given a unit diagonal);
    ``dead_inputs`` marks inputs that were zero on every token (free to prune).
    """

    hessian: torch.Tensor
    hessian_inverse: torch.Tensor
    dead_inputs: torch.Tensor
    dampening_frac: float  # the one that succeeded (nan on the recursive path)
    name: str = ""

    @cached_property
    def upper_factor(self) -> torch.Tensor:
        """Upper ``U`` with ``H^-1 = U^T U``."""
        inverse64 = self.hessian_inverse.double()
        try:
            factor = torch.linalg.cholesky(inverse64, upper=True)
        except torch.linalg.LinAlgError as error:
            raise HessianNotPositiveDefinite(
                f"layer {self.name or '?'}: the inverse Hessian is not positive definite "
                f"({error}); raise dampening_frac (now {self.dampening_frac}) or give more "
                "calibration samples") from error
        return factor.to(self.hessian_inverse.dtype)


def _check_square_finite(matrix: torch.Tensor, what: str, name: str) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise InvalidArgument(f"layer {name or '?'}: {what} must be square (d_in, d_in), "
                              f"got shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise NonFiniteError(f"layer {name or '?'}: {what} holds NaN or infinity")


def undamped_hessian(curvature) -> torch.Tensor:
    """``H`` itself, float64: as accumulated, or for the recursive path (which keeps only
    ``(H + lambda I)^-1``) by inverting it and removing ``lambda``."""
    if curvature.hessian is not None:
        return curvature.hessian.double()
    hessian = torch.linalg.inv(curvature.hessian_inverse.double())
    hessian.diagonal().sub_(curvature.dampening)
    return hessian


def dampening_fractions(dampening_frac: float, max_dampening_frac: float = 1.0) -> list[float]:
    """The dampening fractions tried in order: ``dampening_frac``, then each larger step of
    :data:`DAMPENING_STEPS` up to ``max_dampening_frac``, then the cap itself when it is not
    a step (``max_dampening_frac == dampening_frac`` allows no raise)."""
    if not 0.0 <= dampening_frac < float("inf"):
        raise InvalidArgument(f"dampening_frac must be >= 0, got {dampening_frac}")
    if not dampening_frac <= max_dampening_frac < float("inf"):
        raise InvalidArgument(f"max_dampening_frac must be finite and >= dampening_frac "
                              f"({dampening_frac}), got {max_dampening_frac}")
    fractions = [dampening_frac] + [step for step in DAMPENING_STEPS
                                    if dampening_frac < step <= max_dampening_frac]
    if max_dampening_frac > fractions[-1]:
        fractions.append(max_dampening_frac)
    return fractions


def prepare_curvature(curvature, dampening_frac: float, *, max_dampening_frac: float = 1.0,
                      dtype: torch.dtype = torch.float32) -> PreparedCurvature:
    """Damp, guard dead inputs and invert, in float64, returning ``dtype`` tensors.

    ``curvature`` is a :class:`~obs_compress.math.hessian.Curvature`. Given ``H``, the
    Cholesky factorization of ``H + lambda I`` is tried with each of
    :func:`dampening_fractions` in turn (``dampening_frac``, then larger steps up to
    ``max_dampening_frac``); every raise is logged, and past the cap
    :class:`HessianNotPositiveDefinite` names the layer and what to change.
    Given ``H^-1`` (recursive path) it is used as is: its dampening was folded in already.
    """
    fractions = dampening_fractions(dampening_frac, max_dampening_frac)
    name = curvature.name
    if curvature.hessian_inverse is not None:
        inverse = curvature.hessian_inverse
        _check_square_finite(inverse, "the inverse Hessian", name)
        inverse64 = inverse.double()
        hessian64 = (curvature.hessian.double() if curvature.hessian is not None
                     else torch.linalg.inv(inverse64))
        dead = (curvature.dead_inputs if curvature.dead_inputs is not None
                else torch.zeros(inverse.shape[0], dtype=torch.bool, device=inverse.device))
        return PreparedCurvature(hessian=hessian64.to(dtype), hessian_inverse=inverse.to(dtype),
                                 dead_inputs=dead.to(inverse.device), dampening_frac=float("nan"),
                                 name=name)

    hessian = curvature.hessian
    _check_square_finite(hessian, "the Hessian", name)
    hessian64 = hessian.double()
    diagonal = torch.diagonal(hessian64)
    if (diagonal < 0).any():
        raise HessianNotPositiveDefinite(
            f"layer {name or '?'}: the Hessian has negative diagonal entries; "
            "it must be 2 X^T X / n (positive semi-definite)")
    dead = diagonal == 0
    if curvature.dead_inputs is not None:
        dead = dead | curvature.dead_inputs.to(dead.device)
    mean_diagonal = diagonal.mean().item()
    # A dead input's row and column are zero; a unit diagonal there decouples it and keeps
    # H invertible. Its weight is pruned for free (see the solvers), never compensated.
    hessian64 = hessian64.clone()
    hessian64[dead, :] = 0
    hessian64[:, dead] = 0
    hessian64.diagonal()[dead] = mean_diagonal if mean_diagonal > 0 else 1.0

    last_error = None
    for attempt, fraction in enumerate(fractions):
        damped = hessian64.clone()
        damped.diagonal().add_(fraction * mean_diagonal)
        factor, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            if attempt > 0:
                logger.warning("layer %s: Hessian not positive definite with dampening_frac=%g; "
                               "succeeded with %g", name or "?", dampening_frac, fraction)
            inverse64 = torch.cholesky_inverse(factor)
            return PreparedCurvature(hessian=damped.to(dtype), hessian_inverse=inverse64.to(dtype),
                                     dead_inputs=dead, dampening_frac=fraction, name=name)
        last_error = info.item()
        logger.info("layer %s: Cholesky failed with dampening_frac=%g (minor %d); raising it",
                    name or "?", fraction, last_error)
    raise HessianNotPositiveDefinite(
        f"layer {name or '?'}: the Hessian is not positive definite even with dampening_frac="
        f"{fractions[-1]} (asked for {dampening_frac}, max_dampening_frac {max_dampening_frac}); "
        f"raise max_dampening_frac (now {max_dampening_frac}) or give more calibration samples "
        "(n_samples x seq_len well above d_in), or check the activations for degenerate inputs")
