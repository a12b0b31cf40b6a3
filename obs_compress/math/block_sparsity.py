"""Non-uniform sparsity across blocks at the same total: OWL (Yin et al. 2024).

Outlier-weighed layerwise sparsity: blocks whose weights meet large activations more
often lose fewer weights. For block ``b`` with target layers ``l``, weights ``W_l:
(d_out, d_in)`` and input column norms ``||X_j||`` (``X: (n_tokens, d_in)``), the scores are
Wanda's ``A_ij = |W_ij| ||X_j||``; the block's outlier fraction ``D_b`` is the share of its
scores (all its layers pooled) above ``threshold`` times their mean. Then

    s_b = target + mean(d) - d_b,    d = 2 * spread * (D - min D) / (max D - min D),

so the sparsities span a range ``2 * spread`` wide (OWL's ``lambda`` is ``spread``) and
their mean, weighted by each block's weight count, is ``target``: the total number of
pruned weights is unchanged.

``||X_j||`` enters only through ratios, so any positive multiple serves (``sqrt(diag H)``
with ``H = 2 X^T X / n`` would do); the driver passes
:class:`~obs_compress.math.hessian.InputNormAccumulator` norms.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InvalidArgument
from .masks import check_sparsity


def outlier_fraction(weights: Sequence[torch.Tensor], input_norms: Sequence[torch.Tensor],
                     threshold: float) -> float:
    """OWL's layerwise outlier distribution for one block: the fraction of pooled scores
    ``|W_ij| ||X_j||`` above ``threshold`` times their mean.

    ``weights[l]: (d_out, d_in)``, ``input_norms[l]: (d_in,)`` (any positive multiple).
    """
    if len(weights) != len(input_norms) or not weights:
        raise InvalidArgument("outlier_fraction needs one input-norm vector per weight, and at "
                              "least one weight")
    if threshold <= 0:
        raise InvalidArgument(f"outlier threshold must be > 0, got {threshold}")
    # Two passes over the layers (mean, then count) rather than one concatenated copy of
    # every score in the block.
    def scores(w, n):
        return w.abs().to(torch.float64) * n.to(w.device, torch.float64)[None, :]

    count = sum(w.numel() for w in weights)
    if count == 0:
        raise InvalidArgument("outlier_fraction needs weights with at least one entry")
    mean = sum(scores(w, n).sum().item() for w, n in zip(weights, input_norms)) / count
    above = sum((scores(w, n) > threshold * mean).sum().item()
                for w, n in zip(weights, input_norms))
    return above / count


def owl_sparsities(outlier_fractions: Sequence[float], sizes: Sequence[int], target: float,
                   spread: float) -> list[float]:
    """One sparsity per block, in a range ``2 * spread`` wide, lower where
    ``outlier_fractions`` is higher, with the ``sizes``-weighted mean exactly ``target``.

    Raises when a block's sparsity would leave ``[0, 1)``: lower ``spread``.
    """
    fractions = torch.as_tensor(outlier_fractions, dtype=torch.float64)
    weights = torch.as_tensor(sizes, dtype=torch.float64)
    if fractions.ndim != 1 or fractions.shape != weights.shape or not len(fractions):
        raise InvalidArgument("owl_sparsities needs one size per outlier fraction")
    if (weights <= 0).any():
        raise InvalidArgument("block sizes must be positive")
    if not torch.isfinite(fractions).all():
        raise InvalidArgument(f"outlier fractions must be finite, got {list(outlier_fractions)}")
    target = check_sparsity(target)
    if spread < 0:
        raise InvalidArgument(f"spread must be >= 0, got {spread}")
    span = fractions.max() - fractions.min()
    if span <= 0 or spread == 0 or target == 0:  # nothing to prune, nothing to move
        return [float(target)] * len(fractions)
    offsets = 2 * spread * (fractions - fractions.min()) / span
    sparsities = target + (offsets * weights).sum() / weights.sum() - offsets
    if sparsities.min() < 0 or sparsities.max() >= 1:
        raise InvalidArgument(
            f"OWL with spread {spread} around sparsity {target} gives block sparsities in "
            f"[{sparsities.min().item():.3f}, {sparsities.max().item():.3f}], outside [0, 1); "
            f"use a spread of at most {min(target, 1 - target) / 2:.3f}")
    return sparsities.tolist()


__all__ = ["outlier_fraction", "owl_sparsities"]
