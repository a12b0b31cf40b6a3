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
    ``dead_inputs`` marks inputs that were zero on every token (free to prune);
    ``factor`` is the upper ``U`` with ``H^-1 = U^T U``, present when
    :func:`prepare_curvature` was asked for it (``upper_factor=True``).
    """

    hessian: torch.Tensor
    hessian_inverse: torch.Tensor
    dead_inputs: torch.Tensor
    dampening_frac: float  # the one that succeeded (nan on the recursive path)
    name: str = ""
    factor: torch.Tensor | None = None

    @property
    def upper_factor(self) -> torch.Tensor:
        """Upper ``U`` with ``H^-1 = U^T U``."""
        if self.factor is None:
            raise InvalidArgument(f"layer {self.name or '?'}: this curvature was prepared "
                                  "without its upper factor; call prepare_curvature(..., "
                                  "upper_factor=True)")
        return self.factor


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


# Rows of H converted to float64 at a time when filling the damped matrices (a 64 MiB chunk).
DAMPED_CHUNK_ELEMENTS = 1 << 23


def _fill_damped(out: torch.Tensor, hessian: torch.Tensor, dead: torch.Tensor,
                 dead_diagonal: float, damping: float) -> torch.Tensor:
    """In place: ``out <- H`` with dead rows and columns zeroed, ``dead_diagonal`` on their
    diagonal and ``damping`` added to the whole diagonal, computed in float64 a chunk of rows
    at a time and stored in ``out``'s dtype (so a float32 ``out`` holds the float64 result
    rounded once, and no full float64 copy of ``H`` is made beside ``out``)."""
    width = hessian.shape[0]
    rows = max(1, DAMPED_CHUNK_ELEMENTS // max(1, width))
    dead_columns = dead.nonzero().flatten()
    for begin in range(0, width, rows):
        end = min(begin + rows, width)
        chunk = hessian[begin:end].to(torch.float64, copy=True)  # never the caller's H
        chunk[:, dead_columns] = 0
        chunk[dead[begin:end]] = 0
        local = torch.arange(end - begin, device=chunk.device)
        diagonal = chunk[local, local + begin]
        diagonal = torch.where(dead[begin:end], torch.full_like(diagonal, dead_diagonal),
                               diagonal)
        chunk[local, local + begin] = diagonal + damping
        out[begin:end] = chunk
    return out


def _row_major_copy(work: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A row-major ``dtype`` copy of the column-major work matrix (``.to`` would keep its
    strides, and the solvers slice rows)."""
    return torch.empty(work.shape, dtype=dtype, device=work.device).copy_(work)


def _upper_factor_in_place(work: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``U`` (upper, ``H^-1 = U^T U``) in ``dtype``, from ``work`` holding ``H^-1`` in
    float64, column-major; ``work`` is overwritten by the factorization."""
    info = torch.empty((), dtype=torch.int32, device=work.device)
    torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
    if info.item() != 0:
        raise HessianNotPositiveDefinite(
            f"layer {name or '?'}: the inverse Hessian is not positive definite (minor "
            f"{info.item()} of its Cholesky factorization); raise dampening_frac or give "
            "more calibration samples")
    return _row_major_copy(work, dtype)


def preparation_bytes(d_in: int, element_size: int, upper_factor: bool) -> tuple[int, int]:
    """``(peak, held)`` bytes of :func:`prepare_curvature` for a ``d_in``-wide ``H`` with
    results of ``element_size`` bytes, beside the caller's ``H``: at the peak the float64 work
    matrix with ``H^-1`` (and ``U``) copied out; held after, ``H^-1``, ``U`` and the damped
    ``H``."""
    square = d_in * d_in
    copies = 2 if upper_factor else 1
    return 8 * square + copies * element_size * square, (copies + 1) * element_size * square


def prepare_curvature(curvature, dampening_frac: float, *, max_dampening_frac: float = 1.0,
                      dtype: torch.dtype = torch.float32,
                      upper_factor: bool = False) -> PreparedCurvature:
    """Damp, guard dead inputs and invert, in float64, returning ``dtype`` tensors.

    ``curvature`` is a :class:`~obs_compress.math.hessian.Curvature`. Given ``H``, the
    Cholesky factorization of ``H + lambda I`` is tried with each of
    :func:`dampening_fractions` in turn (``dampening_frac``, then larger steps up to
    ``max_dampening_frac``); every raise is logged, and past the cap
    :class:`HessianNotPositiveDefinite` names the layer and what to change.
    Given ``H^-1`` (recursive path) it is used as is: its dampening was folded in already.
    ``upper_factor``: also compute ``U`` (the blockwise solvers walk it).

    Memory beside the caller's ``H``: one float64 ``(d_in, d_in)`` work matrix, factorized and
    inverted in place, with ``H^-1`` and ``U`` copied out of it in ``dtype``; the damped ``H``
    is filled once the work matrix is freed (:func:`preparation_bytes`). For a 2048 x 8192
    ``down_proj`` in fp32 the preparation peaked 1,060 MiB above the caller's ``H``, and the
    whole obs_blockwise solve with refit 1,107 MiB, where separate float64 copies had taken
    the solve to 3,107 MiB (``tools/bench_solve_memory.py``, docs/benchmarks.md).
    """
    fractions = dampening_fractions(dampening_frac, max_dampening_frac)
    name = curvature.name
    if curvature.hessian_inverse is not None:
        inverse = curvature.hessian_inverse
        _check_square_finite(inverse, "the inverse Hessian", name)
        hessian = (curvature.hessian.to(dtype) if curvature.hessian is not None
                   else torch.linalg.inv(inverse.double()).to(dtype))
        dead = (curvature.dead_inputs if curvature.dead_inputs is not None
                else torch.zeros(inverse.shape[0], dtype=torch.bool, device=inverse.device))
        factor = None
        if upper_factor:
            work = torch.empty(inverse.shape, dtype=torch.float64, device=inverse.device).mT
            work.copy_(inverse)  # column-major, so that it is factorized truly in place
            factor = _upper_factor_in_place(work, dtype, name)
            del work
        return PreparedCurvature(hessian=hessian, hessian_inverse=inverse.to(dtype),
                                 dead_inputs=dead.to(inverse.device), dampening_frac=float("nan"),
                                 name=name, factor=factor)

    hessian = curvature.hessian
    _check_square_finite(hessian, "the Hessian", name)
    diagonal = torch.diagonal(hessian).to(torch.float64)
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
    dead_diagonal = mean_diagonal if mean_diagonal > 0 else 1.0

    # Column-major (LAPACK's order), so that torch factorizes and inverts it truly in place;
    # a row-major out= is copied to column-major and back, a second float64 matrix.
    work = torch.empty(hessian.shape, dtype=torch.float64, device=hessian.device).mT
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    last_error = None
    for attempt, fraction in enumerate(fractions):
        damping = fraction * mean_diagonal
        _fill_damped(work, hessian, dead, dead_diagonal, damping)
        torch.linalg.cholesky_ex(work, out=(work, info))
        if info.item() == 0:
            if attempt > 0:
                logger.warning("layer %s: Hessian not positive definite with dampening_frac=%g; "
                               "succeeded with %g", name or "?", dampening_frac, fraction)
            torch.cholesky_inverse(work, out=work)
            inverse = _row_major_copy(work, dtype)
            factor = _upper_factor_in_place(work, dtype, name) if upper_factor else None
            del work  # before the damped copy, so that the two never coexist
            damped = _fill_damped(torch.empty(hessian.shape, dtype=dtype, device=hessian.device),
                                  hessian, dead, dead_diagonal, damping)
            return PreparedCurvature(hessian=damped, hessian_inverse=inverse, dead_inputs=dead,
                                     dampening_frac=fraction, name=name, factor=factor)
        last_error = info.item()
        logger.info("layer %s: Cholesky failed with dampening_frac=%g (minor %d); raising it",
                    name or "?", fraction, last_error)
    raise HessianNotPositiveDefinite(
        f"layer {name or '?'}: the Hessian is not positive definite even with dampening_frac="
        f"{fractions[-1]} (asked for {dampening_frac}, max_dampening_frac {max_dampening_frac}); "
        f"raise max_dampening_frac (now {max_dampening_frac}) or give more calibration samples "
        "(n_samples x seq_len well above d_in), or check the activations for degenerate inputs")
