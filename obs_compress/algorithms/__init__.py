"""``prune_weight``: the one entry point to every solver.

Shapes: ``weight W: (d_out, d_in)``, ``hessian H: (d_in, d_in)`` with ``H = 2 X^T X / n``
for calibration inputs ``X: (n, d_in)``; the loss is ``E = ||(W' - W) X^T||^2 / n``.
Never sees ``nn.Module``, files or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from obs_compress_kernels import BACKENDS

from ..errors import InvalidArgument, NonFiniteError
from ..math.hessian import Curvature
from ..math.inverse import prepare_curvature, preparation_bytes
from ..math.masks import ALLOCATIONS, check_pattern_fits, check_sparsity, parse_pattern
from .mask_only import magnitude, obd
from .obs import greedy_work_bytes, obs_blockwise, obs_exact
from .refit import (CG_CHUNK_ELEMENTS, CG_WORK_MATRICES, DIRECT_MAX_WIDTH, refit_kept_weights,
                    row_losses)

METHODS = ("magnitude", "obd", "obs_exact", "obs_blockwise")


@dataclass(frozen=True)
class PruneResult:
    """``weight``: the pruned weight (pruned entries exactly 0), in the input's dtype;
    ``mask``: bool, True where pruned; ``loss``: per row, the predicted increase of ``E``
    (the solver's own prediction under the damped ``H`` it used; exact on the calibration
    data when ``dampening_frac=0``); ``dampening_frac``: the dampening the inverse was taken
    with, which is larger than the one asked for when the Cholesky factorization needed a
    raise (None when no inverse was needed: magnitude, OBD; nan on the recursive path, whose
    dampening was folded in by its accumulator). ``loss_measured``: ``loss`` was measured
    on the finished weight with the undamped ``H`` (magnitude and OBD with a Hessian, every
    refit), so it is the reconstruction loss itself and need not be measured again."""

    weight: torch.Tensor  # (d_out, d_in)
    mask: torch.Tensor  # (d_out, d_in) bool
    loss: torch.Tensor  # (d_out,)
    dampening_frac: float | None = None
    loss_measured: bool = False

    @property
    def sparsity(self) -> float:
        return self.mask.float().mean().item()


def _check_arguments(weight, hessian, method, allocation, block_size, backend):
    if method not in METHODS:
        raise InvalidArgument(f"method must be one of {METHODS}, got {method!r}")
    if allocation not in ALLOCATIONS:
        raise InvalidArgument(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if backend not in BACKENDS:
        raise InvalidArgument(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InvalidArgument(f"block_size must be a positive integer, got {block_size!r}")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise InvalidArgument("weight must be a 2-D floating-point tensor (d_out, d_in), got "
                              f"{getattr(weight, 'shape', type(weight))}")
    if not torch.isfinite(weight).all():
        raise NonFiniteError("weight holds NaN or infinity")
    if hessian is None:
        if method != "magnitude":
            raise InvalidArgument(f"method {method!r} needs the Hessian (only 'magnitude' does not)")
        return None
    curvature = hessian if isinstance(hessian, Curvature) else Curvature(hessian=hessian)
    if curvature.d_in != weight.shape[1]:
        raise InvalidArgument(f"{curvature.name or 'layer'}: the Hessian is for d_in={curvature.d_in}"
                              f" but the weight has {weight.shape[1]} input columns")
    return curvature


def prune_weight(weight: torch.Tensor, hessian: torch.Tensor | Curvature | None, *, method: str,
                 sparsity: float, pattern: str = "unstructured", allocation: str = "layer",
                 block_size: int = 128, dampening_frac: float = 0.01,
                 max_dampening_frac: float = 1.0, refit: bool = False,
                 backend: str = "auto", prepared_cache: dict | None = None,
                 row_groups: Sequence[int] | None = None,
                 row_weights: torch.Tensor | None = None) -> PruneResult:
    """Prune one layer's weight with second-order information; inputs are not modified.

    ``hessian``: ``H`` (undamped) or a :class:`~obs_compress.math.hessian.Curvature` from an
    accumulator (the recursive one holds ``H^-1`` with its dampening already in, so
    ``dampening_frac`` does not apply to it). ``method``: ``magnitude`` | ``obd`` |
    ``obs_exact`` | ``obs_blockwise``. ``pattern``: ``"unstructured"`` or ``"N:M"`` (at most
    N nonzeros in every M consecutive inputs; ``sparsity`` and ``allocation`` then do not
    apply). ``allocation``: ``"row"`` (same count per row) or ``"layer"`` (rows differ by
    predicted loss). ``max_dampening_frac``: the cap up to which ``dampening_frac`` is raised
    step by step when the Cholesky factorization fails (equal to it: no raise). ``refit``:
    re-solve the kept weights for the final mask (exact least-squares optimum of that mask).
    ``backend``: ``"auto"`` | ``"torch"`` | ``"triton"``.
    ``prepared_cache``: a dict shared by the calls on one ``hessian`` (layers fed the same
    inputs), so that its damped inverse is computed once per ``(dampening_frac,
    max_dampening_frac, dtype)``.
    ``row_groups``: ``weight`` is several layers stacked by rows on this one ``hessian``
    (row counts, summing to ``d_out``), pruned in one pass; each group reaches ``sparsity``
    on its own (layer allocation allocates within each group), as if pruned alone.
    ``row_weights``: ``(d_out,)`` positive factors on each row's loss, the Kronecker row
    factor ``1 / [G^-1]_ii`` of :func:`obs_compress.math.kronecker.kronecker_row_weights`
    (curvature ``G (x) H``, compensation within each row over ``H``): they move how layer
    allocation spreads the count over the rows and nothing else (row allocation and N:M
    prune each row on its own); all 1 is the layer-wise method exactly. Not for magnitude.
    Work happens in float64 when the weight or Hessian is float64, else float32.
    """
    curvature = _check_arguments(weight, hessian, method, allocation, block_size, backend)
    parsed = parse_pattern(pattern)
    sparsity = parsed.sparsity if parsed.is_nm else check_sparsity(sparsity)
    name = curvature.name if curvature is not None else ""
    check_pattern_fits(parsed, weight.shape[1], name)
    if method == "obs_blockwise" and parsed.is_nm and block_size % parsed.m:
        raise InvalidArgument(f"block_size {block_size} must be a multiple of M={parsed.m} for "
                              f"pattern {parsed}, so that no N:M group straddles two blocks")
    if row_groups is not None and (
            any(not isinstance(size, int) or size < 1 for size in row_groups)
            or sum(row_groups) != weight.shape[0]):
        raise InvalidArgument(f"row_groups must be positive row counts summing to d_out="
                              f"{weight.shape[0]}, got {list(row_groups)}")
    if refit and curvature is None:
        raise InvalidArgument("refit needs the Hessian (refit=True with hessian=None)")
    if row_weights is not None:
        if method == "magnitude":
            raise InvalidArgument("row_weights (Kronecker curvature) need a curvature method; "
                                  "magnitude reads the weights alone")
        if (row_weights.shape != (weight.shape[0],) or not torch.isfinite(row_weights).all()
                or not bool((row_weights > 0).all())):
            raise InvalidArgument(f"row_weights must be {weight.shape[0]} finite positive "
                                  f"factors, got shape {tuple(row_weights.shape)}")
    if not isinstance(dampening_frac, (int, float)) or not dampening_frac >= 0:
        raise InvalidArgument(f"dampening_frac must be >= 0, got {dampening_frac!r}")
    if (not isinstance(max_dampening_frac, (int, float))
            or not dampening_frac <= max_dampening_frac < float("inf")):
        raise InvalidArgument(f"max_dampening_frac must be finite and >= dampening_frac "
                              f"({dampening_frac}), got {max_dampening_frac!r}")

    reference = curvature.hessian if curvature is not None and curvature.hessian is not None \
        else (curvature.hessian_inverse if curvature is not None else weight)
    dtype = torch.float64 if torch.float64 in (weight.dtype, reference.dtype) else torch.float32
    original = weight.detach().to(dtype=dtype, device=reference.device)

    # The recursive path holds no raw H: preparing it yields the damped H for the loss.
    needs_inverse = method in ("obs_exact", "obs_blockwise") or refit or (
        curvature is not None and curvature.hessian is None)
    prepared = None
    if needs_inverse:
        # Only the blockwise solver walks U; the others skip its factorization and memory.
        upper_factor = method == "obs_blockwise"
        key = (dampening_frac, max_dampening_frac, dtype, upper_factor)
        if prepared_cache is not None and key in prepared_cache:
            prepared = prepared_cache[key]
        else:
            prepared = prepare_curvature(curvature, dampening_frac,
                                         max_dampening_frac=max_dampening_frac, dtype=dtype,
                                         upper_factor=upper_factor)
            if prepared_cache is not None:
                prepared_cache[key] = prepared
    # The loss of a finished weight is measured with the raw H (exact on the calibration
    # data); the recursive path has only the damped inverse, so its damped H stands in.
    loss_hessian = None
    if curvature is not None and curvature.hessian is not None:
        loss_hessian = curvature.hessian.to(dtype)
    elif curvature is not None and prepared is not None:
        loss_hessian = prepared.hessian

    loss = None  # measured below with the raw H unless the solver's prediction stands
    groups = list(row_groups or [weight.shape[0]])
    if method == "magnitude":
        mask = torch.cat([magnitude(part, sparsity=sparsity, pattern=parsed,
                                    allocation=allocation) for part in original.split(groups)])
        pruned = original.masked_fill(mask, 0)
    elif method == "obd":
        # Undamped diag(H): dead inputs have H_qq = 0, so they score 0 and go first.
        diagonal = (curvature.hessian_diagonal if curvature.hessian_diagonal is not None
                    else torch.diagonal(curvature.hessian)).to(dtype)
        weights = (row_weights.split(groups) if row_weights is not None
                   else [None] * len(groups))
        mask = torch.cat([obd(part, diagonal, sparsity=sparsity, pattern=parsed,
                              allocation=allocation, row_weights=part_weights)
                          for part, part_weights in zip(original.split(groups), weights)])
        pruned = original.masked_fill(mask, 0)
    elif method == "obs_exact":
        pruned, mask, loss = obs_exact(original, prepared, sparsity=sparsity, pattern=parsed,
                                       allocation=allocation, backend=backend, row_groups=groups,
                                       row_weights=row_weights)
    else:
        pruned, mask, loss = obs_blockwise(original, prepared, sparsity=sparsity, pattern=parsed,
                                           allocation=allocation, block_size=block_size,
                                           backend=backend, row_groups=groups,
                                           row_weights=row_weights)
    if refit:
        # obs_exact's weights already are the optimum of its mask under the damped H.
        if method != "obs_exact":
            pruned = refit_kept_weights(original, mask, prepared.hessian, initial=pruned,
                                        hessian_inverse=prepared.hessian_inverse)
        loss = None
    # in place on the solver's own result; never on the caller's weight
    shares_input = pruned.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    pruned = pruned.masked_fill(mask, 0) if shares_input else pruned.masked_fill_(mask, 0)
    measured = loss is None and curvature is not None and curvature.hessian is not None
    if loss is None:
        loss = (row_losses(pruned, loss_hessian, original) if loss_hessian is not None
                else torch.full((weight.shape[0],), float("nan"), dtype=dtype))
    return PruneResult(weight=pruned.to(weight.dtype).to(weight.device),
                       mask=mask.to(weight.device), loss=loss.to(weight.device),
                       dampening_frac=prepared.dampening_frac if prepared is not None else None,
                       loss_measured=measured)


def solve_bytes(d_out: int, d_in: int, *, method: str, refit: bool, block_size: int = 128,
                element_size: int = 4) -> int:
    """Peak bytes :func:`prune_weight` holds for a ``(d_out, d_in)`` layer beyond the caller's
    weight and ``H`` (the memory plan's figure): the result and mask; for the second-order
    methods and refit the prepared curvature (:func:`preparation_bytes`, the larger of its
    peak and what it holds beside the solve); for the OBS methods the greedy solve's work
    (:func:`~obs_compress.algorithms.obs.greedy_work_bytes` over the whole row for obs_exact,
    over ``block_size`` columns for obs_blockwise); for refit by conjugate gradient its work
    matrices and result. ``element_size``: the working dtype's (fp32 unless the inputs are
    float64)."""
    weights = d_out * d_in * element_size + d_out * d_in  # result and bool mask
    if method not in ("obs_exact", "obs_blockwise") and not refit:
        return weights
    peak, held = preparation_bytes(d_in, element_size, upper_factor=method == "obs_blockwise")
    solving = held + weights
    if method in ("obs_exact", "obs_blockwise"):
        width = d_in if method == "obs_exact" else min(block_size, d_in)
        solving += greedy_work_bytes(d_out, width, element_size)
    if refit and d_in > DIRECT_MAX_WIDTH:
        solving += (CG_WORK_MATRICES * min(d_out * d_in, CG_CHUNK_ELEMENTS)
                    + d_out * d_in) * element_size
    return max(peak, solving)


__all__ = ["METHODS", "PruneResult", "prune_weight", "solve_bytes"]
