"""OWL block sparsity (Yin et al. 2024): move each block's unstructured sparsity by its
share of activation outliers, keeping the total number of pruned weights.

:func:`block_input_norms` runs the dense model block by block on the first calibration
samples and measures ``||X_j||`` of each unstructured target layer's inputs;
:func:`owl_plan` turns them into outlier fractions and block sparsities
(:mod:`obs_compress.math.block_sparsity`) and returns the plan with each block's layers
moved by one offset. N:M layers are never moved.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

import torch

from .errors import InvalidArgument, RecipeError
from .math.block_sparsity import outlier_fraction, owl_sparsities
from .math.hessian import InputNormAccumulator
from .math.masks import parse_pattern
from .model.blocks import module_device
from .model.capture import BlockCall
from .model.hooks import accumulate_inputs, on_device
from .plan import LayerPlan, PrunePlan

logger = logging.getLogger(__name__)


def _unstructured(plan: LayerPlan) -> bool:
    return not parse_pattern(plan.settings.pattern).is_nm


def _first_samples(calls: Sequence[BlockCall], n_samples: int) -> list[BlockCall]:
    chosen, count = [], 0
    for call in calls:
        if count >= n_samples:
            break
        chosen.append(call)
        count += call.hidden_states.shape[0]
    return chosen


def block_input_norms(plan: PrunePlan, calls: Sequence[BlockCall],
                      device: torch.device | None) -> list[dict[str, torch.Tensor]]:
    """A dense pass through every block on ``calls``: per block, ``||X_j||`` of each
    unstructured target layer's inputs. The calls' own hidden states are left as they are."""
    hidden = [call.hidden_states for call in calls]
    norms: list[dict[str, torch.Tensor]] = []
    for block_plan in plan.blocks:
        accumulators = {p.layer.name: InputNormAccumulator(
                            p.layer.d_in, name=p.layer.name,
                            device=device if device is not None else module_device(p.layer.module))
                        for p in block_plan.layers if _unstructured(p)}
        modules = {p.layer.name: p.layer.module for p in block_plan.layers if _unstructured(p)}
        with on_device(block_plan.module, device) as block, \
                accumulate_inputs(modules, accumulators):
            hidden = [call(block, h) for call, h in zip(calls, hidden)]
        norms.append({name: acc.norms() for name, acc in accumulators.items()})
    return norms


def owl_plan(plan: PrunePlan, calls: Sequence[BlockCall],
             device: torch.device | None) -> PrunePlan:
    """``plan`` with each block's unstructured layers moved by the block's OWL offset.

    The offsets come from the dense model (``block_sparsity.n_samples`` calibration samples)
    and keep the total number of pruned weights; see :mod:`obs_compress.math.block_sparsity`.
    """
    settings = plan.recipe.block_sparsity
    norms = block_input_norms(plan, _first_samples(calls, settings.n_samples), device)
    used, fractions, sizes, pruned = [], [], [], 0.0
    for block_plan, block_norms in zip(plan.blocks, norms):
        layers = [p for p in block_plan.layers if _unstructured(p)]
        if not layers:
            continue
        used.append(block_plan.index)
        fractions.append(outlier_fraction([p.layer.weight_matrix() for p in layers],
                                          [block_norms[p.layer.name] for p in layers],
                                          settings.outlier_threshold))
        sizes.append(sum(p.layer.shape[0] * p.layer.shape[1] for p in layers))
        pruned += sum(p.settings.sparsity * p.layer.shape[0] * p.layer.shape[1] for p in layers)
    if not used:
        logger.info("block_sparsity owl: no unstructured target layer, nothing to move")
        return plan
    target = pruned / sum(sizes)
    try:
        sparsities = owl_sparsities(fractions, sizes, target, settings.spread)
    except InvalidArgument as exc:
        raise RecipeError(f"recipe field block_sparsity: {exc}") from None
    offsets = {index: sparsity - target for index, sparsity in zip(used, sparsities)}
    blocks = []
    for block_plan in plan.blocks:
        offset = offsets.get(block_plan.index, 0.0)
        layers = []
        for p in block_plan.layers:
            if _unstructured(p) and offset:
                moved = p.settings.sparsity + offset
                if not 0 <= moved < 1:
                    raise RecipeError(
                        f"recipe field block_sparsity: layer {p.layer.name} would get sparsity "
                        f"{moved:.4f} ({p.settings.sparsity:g} {offset:+.4f}), outside [0, 1); "
                        f"lower block_sparsity.spread (now {settings.spread:g})")
                p = LayerPlan(layer=p.layer, settings=replace(p.settings, sparsity=moved))
            layers.append(p)
        blocks.append(replace(block_plan, layers=tuple(layers)))
    logger.info("block_sparsity owl (spread %g, threshold %g): outlier fractions %s -> block "
                "sparsities %s", settings.spread, settings.outlier_threshold,
                " ".join(f"{f:.4f}" for f in fractions), " ".join(f"{s:.3f}" for s in sparsities))
    return replace(plan, blocks=tuple(blocks))


__all__ = ["block_input_norms", "owl_plan"]
