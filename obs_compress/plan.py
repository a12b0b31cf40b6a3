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
from .model.structure import BlockStructure, ModelWidths, block_structure, model_widths
from .recipe import PruneSettings, Recipe, StructuredSettings, load_recipe


@dataclass(frozen=True)
class LayerPlan:
    layer: PrunableLayer
    settings: PruneSettings


@dataclass(frozen=True)
class StructuredCounts:
    """How many units every block loses (structured removal; the same in each block)."""

    mlp_channels: int
    heads: int  # query heads
    kv_heads: int  # key/value heads (whole_group: one per group of query heads removed)
    heads_per_group: int  # per_group: query heads removed from each key/value group


@dataclass(frozen=True)
class BlockPlan:
    index: int
    name: str
    module: nn.Module
    layers: tuple[LayerPlan, ...]
    structure: BlockStructure | None = None  # structured removal: the block's units


@dataclass(frozen=True)
class PrunePlan:
    """Which layers of which blocks are pruned, and how."""

    stack: BlockStack
    blocks: tuple[BlockPlan, ...]
    recipe: Recipe
    structured: StructuredCounts | None = None  # structured removal: what every block loses

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
    if recipe.structured.active:
        return _structured_plan(model, stack, recipe)
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


def structured_counts(settings: StructuredSettings, widths: ModelWidths) -> StructuredCounts:
    """The units every block loses under ``settings``; refuses counts that grouped-query
    attention or the widths do not allow, naming what would."""
    channels = round(settings.mlp_fraction * widths.intermediate_size)
    if settings.mlp_fraction > 0 and not 0 < channels < widths.intermediate_size:
        raise RecipeError(f"structured.mlp_fraction {settings.mlp_fraction:g} of "
                          f"{widths.intermediate_size} MLP channels is {channels}; it must remove "
                          "at least one and keep at least one")
    heads, kv_heads, n_rep = (widths.num_attention_heads, widths.num_key_value_heads,
                              widths.queries_per_kv_head)
    removed = settings.heads_removed
    layout = (f"{heads} query heads in {kv_heads} key/value groups of {n_rep}")
    per_group = kv_removed = 0
    if settings.heads == "per_group":
        if removed % kv_heads or removed // kv_heads >= n_rep:
            raise RecipeError(
                f"structured.heads_removed {removed} with heads per_group: the model has "
                f"{layout}, so it must be a multiple of {kv_heads} below {heads} "
                f"(e.g. {kv_heads}: one query head from every group)"
                + ("" if n_rep > 1 else "; each group has one query head: use whole_group"))
        per_group = removed // kv_heads
    elif settings.heads == "whole_group":
        if removed % n_rep or removed // n_rep >= kv_heads:
            raise RecipeError(
                f"structured.heads_removed {removed} with heads whole_group: the model has "
                f"{layout}, so it must be a multiple of {n_rep} below {heads} "
                f"(e.g. {n_rep}: one whole group)")
        kv_removed = removed // n_rep
    return StructuredCounts(mlp_channels=channels, heads=removed, kv_heads=kv_removed,
                            heads_per_group=per_group)


def _structured_plan(model: nn.Module, stack: BlockStack, recipe: Recipe) -> PrunePlan:
    """Every block with its structured units and no unstructured targets."""
    try:
        widths = model_widths(model.config)
        counts = structured_counts(recipe.structured, widths)
        blocks = tuple(BlockPlan(index=index, name=stack.block_name(index), module=block,
                                 layers=(), structure=block_structure(
                                     block, stack.block_name(index), widths))
                       for index, block in enumerate(stack.modules))
    except InvalidArgument as exc:
        raise RecipeError(f"recipe structured: {exc}") from None
    for block in blocks:
        for layer in (block.structure.down, block.structure.o):
            weight = layer.weight_matrix()
            if weight.device.type != "meta" and not torch.isfinite(weight).all():
                raise NonFiniteError(f"layer {layer.name}: the weight holds NaN or infinity; "
                                     "the checkpoint is broken, refusing to prune it")
    return PrunePlan(stack=stack, blocks=blocks, recipe=recipe, structured=counts)


def check_runs_without_data(recipe: Recipe) -> None:
    """Refuse to run ``recipe`` without calibration data when it reads the Hessian: every
    method but magnitude, ``refit`` and OWL's block sparsities do."""
    needs = recipe.data_needs_text()
    if needs:
        raise InvalidArgument(f"pruning without calibration data: {needs} the Hessian of "
                              "calibration inputs; give calibration data (e.g. dataset c4)")


__all__ = ["BlockPlan", "LayerPlan", "PrunePlan", "build_plan", "check_runs_without_data"]
