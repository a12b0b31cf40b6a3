"""Streaming curvature of one Linear layer.

Shapes: calibration inputs ``X: (n_tokens, d_in)`` arrive in batches of any shape
``(..., d_in)``; the weight is ``W: (d_out, d_in)``; the Hessian ``H: (d_in, d_in)``.

The layer-wise loss is ``E = ||(W' - W) X^T||^2 / n`` and its Hessian ``H = 2 X^T X / n``
(the same for every output row). With this convention the OBS saliency
``w_q^2 / (2 [H^-1]_qq)`` is the exact increase of ``E`` when ``w_q`` is removed and the
rest of the row is compensated (Hassibi & Stork 1992, eq. 5 with ``H`` as above).

Two accumulators produce a :class:`Curvature`:

* :class:`HessianAccumulator` keeps the raw sum ``sum x x^T`` and the token count; the
  inverse is taken afterwards (Cholesky, see :mod:`obs_compress.math.inverse`).
* :class:`RecursiveInverseAccumulator` keeps ``H^-1`` itself, with the OBS recursive
  update (Hassibi & Stork 1992, eq. 17) applied ``k`` vectors at a time (Woodbury).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import InvalidArgument, NonFiniteError
from .inverse import woodbury_downdate_

logger = logging.getLogger(__name__)

# From this width on, HessianAccumulator updates only the upper triangle of X^T X, a block row
# of column panels at a time (torch has no syrk): with 4 panels 10 of 16 panel products, and
# on a 2-core CPU 27% (d_in 576) to 41% (d_in 1536) less time per 4096-token batch.
TRIANGLE_MIN_WIDTH = 256
TRIANGLE_PANELS = 4
# finalize mirrors the triangle in this many bands of rows (its temporaries: d_in^2 / bands).
MIRROR_BANDS = 8


@dataclass(frozen=True)
class Curvature:
    """What the solvers need to know about one layer's loss surface.

    Exactly one of ``hessian`` (undamped ``H``) and ``hessian_inverse`` (already damped
    ``(H + lambda I)^-1``, from the recursive accumulator) is required; the other is
    derived on demand by :func:`obs_compress.math.inverse.prepare_curvature`.
    """

    hessian: torch.Tensor | None = None  # (d_in, d_in), undamped
    hessian_inverse: torch.Tensor | None = None  # (d_in, d_in), damped, recursive path
    n_tokens: int = 0
    # Inputs that were exactly zero on every calibration token: pruning their weight
    # costs nothing. None means "derive from diag(H) == 0".
    dead_inputs: torch.Tensor | None = None  # (d_in,) bool
    # Absolute dampening already folded into hessian_inverse (lambda = alpha / n).
    dampening: float = 0.0
    # Undamped diag(H), kept by the recursive accumulator (which has no H) for OBD.
    hessian_diagonal: torch.Tensor | None = None  # (d_in,)
    name: str = ""  # the layer's name, used in error messages only

    @property
    def d_in(self) -> int:
        tensor = self.hessian if self.hessian is not None else self.hessian_inverse
        return tensor.shape[-1]


def _flatten_inputs(inputs: torch.Tensor, d_in: int, name: str) -> torch.Tensor:
    if inputs.shape[-1] != d_in:
        raise InvalidArgument(
            f"layer {name or '?'}: inputs have {inputs.shape[-1]} features, expected d_in={d_in}"
        )
    return inputs.reshape(-1, d_in)


def _check_finite(inputs: torch.Tensor, name: str) -> None:
    if not torch.isfinite(inputs).all():
        raise NonFiniteError(
            f"layer {name or '?'}: calibration activations hold NaN or infinity; "
            "check the model's dtype (fp16 overflow) and the calibration text"
        )


class HessianAccumulator:
    """Streaming ``H = 2 X^T X / n`` over batches of inputs ``(..., d_in)``.

    The sum is kept in ``dtype`` (fp32 by default, fp64 on request) on ``device``;
    inputs are cast to it before the product, so fp16/bf16 activations lose nothing. From
    :data:`TRIANGLE_MIN_WIDTH` inputs on, only the upper triangle is summed (the panels on and
    above the diagonal) and :meth:`finalize` mirrors it, so ``H`` comes out exactly symmetric.
    """

    def __init__(self, d_in: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, name: str = ""):
        if dtype not in (torch.float32, torch.float64):
            raise InvalidArgument(f"Hessian dtype must be float32 or float64, got {dtype}")
        self.d_in = d_in
        self.name = name
        self.dtype = dtype
        # sum x x^T; with panels, only its upper triangle is meaningful until finalize.
        self.sum_outer = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self.n_tokens = 0
        self._finalized: Curvature | None = None
        edges = ([round(i * d_in / TRIANGLE_PANELS) for i in range(TRIANGLE_PANELS + 1)]
                 if d_in >= TRIANGLE_MIN_WIDTH else [0, d_in])
        self._panels = list(zip(edges[:-1], edges[1:]))

    def add_batch(self, inputs: torch.Tensor) -> None:
        if self.sum_outer is None:
            raise InvalidArgument(f"layer {self.name or '?'}: this Hessian accumulator was "
                                  "finalized already")
        x = _flatten_inputs(inputs, self.d_in, self.name).to(self.sum_outer.device, self.dtype)
        _check_finite(x, self.name)
        for start, stop in self._panels:
            self.sum_outer[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])
        self.n_tokens += x.shape[0]

    def finalize(self) -> Curvature:
        """``H`` from the sum, in place: the accumulator's own buffer becomes ``H`` (no second
        ``d_in^2`` tensor: at d_in 8192 that is 0.27 GB less at the peak of a block), so an
        accumulator takes no batch afterwards; finalizing again returns the same curvature."""
        if self._finalized is not None:
            return self._finalized
        if self.n_tokens == 0:
            raise InvalidArgument(f"layer {self.name or '?'}: no calibration tokens were seen")
        # The upper triangle mirrored a band of rows at a time, then scaled: bit for bit
        # (upper + upper.triu(1).T) * (2 / n). Below the diagonal panels nothing was summed,
        # inside them both triangles hold the same sums; each is overwritten from the upper.
        hessian, self.sum_outer = self.sum_outer, None
        step = -(-self.d_in // MIRROR_BANDS)
        for start in range(0, self.d_in, step):
            stop = min(start + step, self.d_in)
            hessian[start:stop, :start] = hessian[:start, start:stop].T
            band = hessian[start:stop, start:stop]
            band.copy_(band.triu() + band.triu(1).T)
        hessian.mul_(2.0 / self.n_tokens)
        self._finalized = Curvature(hessian=hessian, n_tokens=self.n_tokens,
                                    dead_inputs=torch.diagonal(hessian) == 0, name=self.name)
        return self._finalized


class InputNormAccumulator:
    """Streaming ``||X_j||^2``, the sum of squares of each input column (``diag`` of
    ``X^T X``): the activation statistic of Wanda and OWL, without the ``d_in^2`` product."""

    def __init__(self, d_in: int, *, device: torch.device | str | None = None, name: str = ""):
        self.d_in = d_in
        self.name = name
        self.sum_squares = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = _flatten_inputs(inputs, self.d_in, self.name).to(self.sum_squares.device,
                                                              torch.float64)
        _check_finite(x, self.name)
        self.sum_squares += x.square().sum(dim=0)
        self.n_tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        """``||X_j||``: ``(d_in,)`` float64."""
        if self.n_tokens == 0:
            raise InvalidArgument(f"layer {self.name or '?'}: no calibration tokens were seen")
        return self.sum_squares.sqrt()


class RecursiveInverseAccumulator:
    """One pass over the data that keeps the inverse Hessian, never ``H`` itself.

    Hassibi & Stork (1992, eq. 17) grow ``H^-1`` one vector at a time from ``(alpha I)^-1``
    with Sherman-Morrison. Printed as is (denominator ``P + x^T H^-1 x``) it needs the
    token count ``P`` in advance; here the running matrix is the inverse of the raw sum
    ``A = alpha I + 2 sum x x^T`` instead, and at the end ``H^-1`` follows by scaling:

        H + (alpha / n) I = A / n    =>    (H + (alpha / n) I)^-1 = n A^-1.

    So ``alpha`` is a dampening in units of summed tokens: the final absolute dampening is
    ``lambda = alpha / n``. To match ``dampening_frac`` (``lambda = frac * mean(diag H)``)
    without a second pass, ``alpha`` is set from the first batch:
    ``alpha = frac * mean(diag(2 X_1^T X_1)) * expected_tokens / n_1``, which equals the
    exact value when the first batch is representative and ``expected_tokens`` is the
    final count. The realised ``dampening_frac`` is logged at the end. Pass ``alpha``
    explicitly to control it exactly.

    ``block_size`` vectors are folded in at once with Woodbury (``k x k`` solve), which runs
    at matrix-multiply speed; ``block_size=1`` is the rank-1 recursion of the paper.
    """

    def __init__(self, d_in: int, *, alpha: float | None = None, dampening_frac: float = 0.01,
                 expected_tokens: int | None = None, block_size: int = 64,
                 dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                 name: str = ""):
        if alpha is None and expected_tokens is None:
            raise InvalidArgument(
                "RecursiveInverseAccumulator needs alpha, or expected_tokens to derive alpha "
                "from dampening_frac (alpha = dampening_frac * mean(diag H) * n)")
        if alpha is not None and not alpha > 0:
            raise InvalidArgument(f"alpha must be > 0 (the start is (alpha I)^-1), got {alpha}")
        if not dampening_frac > 0 and alpha is None:
            raise InvalidArgument(
                "the recursive inverse starts from (alpha I)^-1 and needs dampening_frac > 0")
        if block_size < 1:
            raise InvalidArgument(f"block_size must be >= 1, got {block_size}")
        self.d_in = d_in
        self.name = name
        self.alpha = alpha
        self.dampening_frac = dampening_frac
        self.expected_tokens = expected_tokens
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        self.inverse_sum: torch.Tensor | None = None  # A^-1, A = alpha I + 2 sum x x^T
        self.diag_sum = torch.zeros(d_in, dtype=dtype, device=device)  # diag of sum x x^T
        self.n_tokens = 0

    def _start(self, x: torch.Tensor) -> None:
        if self.alpha is None:
            mean_diag = 2.0 * (x * x).sum(0).mean().item() / x.shape[0]
            if mean_diag == 0:
                raise InvalidArgument(
                    f"layer {self.name or '?'}: first calibration batch is all zeros; "
                    "cannot derive alpha from dampening_frac, pass alpha explicitly")
            self.alpha = self.dampening_frac * mean_diag * self.expected_tokens
        self.inverse_sum = torch.eye(self.d_in, dtype=self.dtype, device=self.diag_sum.device)
        self.inverse_sum /= self.alpha

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = _flatten_inputs(inputs, self.d_in, self.name).to(self.diag_sum.device, self.dtype)
        _check_finite(x, self.name)
        if x.shape[0] == 0:
            return
        if self.inverse_sum is None:
            self._start(x)
        # Each token enters A as (sqrt(2) x)(sqrt(2) x)^T.
        scaled = x * (2.0 ** 0.5)
        for start in range(0, scaled.shape[0], self.block_size):
            woodbury_downdate_(self.inverse_sum, scaled[start:start + self.block_size])
        self.diag_sum += (x * x).sum(0)
        self.n_tokens += x.shape[0]

    def finalize(self) -> Curvature:
        if self.n_tokens == 0:
            raise InvalidArgument(f"layer {self.name or '?'}: no calibration tokens were seen")
        n = self.n_tokens
        hessian_inverse = self.inverse_sum * n
        mean_diag = 2.0 * self.diag_sum.mean().item() / n
        realised = (self.alpha / n) / mean_diag if mean_diag > 0 else float("inf")
        logger.debug("layer %s: recursive inverse over %d tokens, alpha=%.4g, dampening_frac=%.4g",
                     self.name, n, self.alpha, realised)
        return Curvature(hessian_inverse=hessian_inverse, n_tokens=n,
                         dead_inputs=self.diag_sum == 0, dampening=self.alpha / n,
                         hessian_diagonal=self.diag_sum * (2.0 / n), name=self.name)
