"""The plan of a run: which layers of which blocks are pruned, and with which settings.

:func:`build_plan` resolves a recipe against a model: it finds the block stack and its
prunable layers (:mod:`obs_compress.model.blocks`), selects the targets, applies the
overrides and checks everything that can fail before any weight changes (targets that
match nothing, an N:M that does not divide a width, a weight holding NaN).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InvalidArgument, NonFiniteError, RecipeError
from .math.masks import check_pattern_fits, parse_pattern
from .model.blocks import BlockStack, PrunableLayer, find_block_stack, find_layers
from .recipe import PruneSettings, Recipe, load_recipe


@dataclass(frozen=True)
class LayerPlan:
    layer: PrunableLayer
    settings: PruneSettings


@dataclass(frozen=True)
class BlockPlan:
    index: int
    name: str
    module: nn.Module
    layers: tuple[LayerPlan, ...]


@dataclass(frozen=True)
class PrunePlan:
    """Which layers of which blocks are pruned, and how."""

    stack: BlockStack
    blocks: tuple[BlockPlan, ...]
    recipe: Recipe

    @property
    def layers(self) -> list[LayerPlan]:
        return [layer for block in self.blocks for layer in block.layers]


def build_plan(model: nn.Module, recipe: Recipe | Any) -> PrunePlan:
    """Resolve ``recipe`` against ``model``; raises before anything is modified.

    Candidates are the prunable layers inside the block stack (so never ``lm_head``,
    embeddings or norms); ``targets``/``ignore`` select among them; overrides apply in order.
    A target weight holding NaN or infinity is refused here, with its layer named.
    """
    recipe = load_recipe(recipe)
    stack = find_block_stack(model)
    candidates = [(index, layer) for index, block in enumerate(stack.modules)
                  for layer in find_layers(block, stack.block_name(index))]
    chosen = [(index, layer) for index, layer in candidates if recipe.is_target(layer.name)]
    if not chosen:
        examples = ", ".join(layer.name for _, layer in candidates[:6])
        raise RecipeError(
            f"recipe targets {list(recipe.targets)} (ignore {list(recipe.ignore)}) match no "
            f"prunable layer inside {stack.name}; its layers are named like: {examples}")
    for position, override in enumerate(recipe.overrides):
        if not any(re.search(p, layer.name) for _, layer in chosen for p in override.targets):
            raise RecipeError(
                f"recipe field overrides[{position}].targets {list(override.targets)} matches "
                f"no target layer; target layers are named like: "
                f"{', '.join(layer.name for _, layer in chosen[:6])}")
    blocks = []
    for _, layer in chosen:
        # Before any forward: a broken weight would otherwise surface as non-finite inputs
        # of a later layer, which would be named instead.
        # (A streaming run's weights are still on disk: checked as each block is read.)
        weight = layer.weight_matrix()
        if weight.device.type != "meta" and not torch.isfinite(weight).all():
            raise NonFiniteError(f"layer {layer.name}: the weight holds NaN or infinity; the "
                                 "checkpoint is broken, refusing to prune it")
    for index, block in enumerate(stack.modules):
        layers = []
        for block_index, layer in chosen:
            if block_index != index:
                continue
            settings = recipe.settings_for(layer.name)
            if recipe.curvature.kind == "kronecker" and settings.method == "magnitude":
                raise RecipeError(f"layer {layer.name}: method magnitude (an override) reads "
                                  "the weights alone, and curvature.kind kronecker needs a "
                                  "curvature method (obd, obs_exact, obs_blockwise)")
            try:
                check_pattern_fits(parse_pattern(settings.pattern), layer.d_in, layer.name)
            except InvalidArgument as exc:
                raise RecipeError(f"recipe pattern {settings.pattern}: {exc}") from None
            layers.append(LayerPlan(layer=layer, settings=settings))
        blocks.append(BlockPlan(index=index, name=stack.block_name(index), module=block,
                                layers=tuple(layers)))
    return PrunePlan(stack=stack, blocks=tuple(blocks), recipe=recipe)


def check_runs_without_data(recipe: Recipe) -> None:
    """Refuse to run ``recipe`` without calibration data when it reads the Hessian: every
    method but magnitude, ``refit`` and OWL's block sparsities do."""
    needs = recipe.data_needs_text()
    if needs:
        raise InvalidArgument(f"pruning without calibration data: {needs} the Hessian of "
                              "calibration inputs; give calibration data (e.g. dataset c4)")


__all__ = ["BlockPlan", "LayerPlan", "PrunePlan", "build_plan", "check_runs_without_data"]
