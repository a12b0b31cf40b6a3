"""The one layer loop: capture -> accumulate -> prune -> re-forward -> offload, block by block.

The driver of SparseGPT (Frantar & Alistarh 2023, sec. 4, "catch the inputs of block 0, then
walk the blocks"), written once for every model ``transformers`` loads:

1. :func:`build_plan` finds the block stack and its prunable layers
   (:mod:`obs_compress.model.blocks`) and resolves the recipe per layer; every check that
   can fail (targets that match nothing, an N:M that does not divide a width) fails here,
   before any weight changes.
2. :func:`prune_blocks` captures block 0's inputs (:mod:`obs_compress.model.capture`), then
   for each block: onload it to the compute device, let forward hooks feed every target
   layer's Hessian accumulator, prune each layer with
   :func:`obs_compress.algorithms.prune_weight`, run the block again with the pruned
   weights to produce the next block's inputs, offload it, and yield a
   :class:`BlockResult`. With ``sequential`` the layers of a block are pruned in groups, in
   the order the forward reaches them (layers fed the same tensor form one group: q/k/v,
   then o_proj, then gate/up, then down_proj in a Llama block), each group's Hessians taken
   from inputs recomputed with the earlier groups already pruned. Layers fed the same tensor
   share one Hessian accumulator either way, and those with equal settings one stacked solve
   (each still reaching its own sparsity). The accumulation forward stops at the last input
   it needs.
   With ``block_sparsity: owl`` a dense pass over every block comes first
   (:func:`block_input_norms`, on the first calibration samples) and :func:`owl_plan`
   moves each block's unstructured sparsity by its outlier fraction, same total.
3. :func:`summarize` turns the per-block results into a :class:`PruneReport`.

Shapes: calibration ``input_ids: (n_samples, seq_len)``; a layer's ``W: (d_out, d_in)``,
its inputs ``X: (n_tokens, d_in)`` and ``H = 2 X^T X / n: (d_in, d_in)``.

Statistics per layer: the predicted increase of ``E = ||(W' - W) X^T||^2 / n`` (the sum of
``PruneResult.loss``) and the measured one, ``sum over rows of dW H dW^T / 2`` with the
undamped ``H`` of the inputs the layer saw (the two differ by the dampening).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms import prune_weight
from .algorithms.refit import row_losses
from .errors import InvalidArgument, NonFiniteError, ObsCompressError, RecipeError
from .math.block_sparsity import outlier_fraction, owl_sparsities
from .math.hessian import (Curvature, HessianAccumulator, InputNormAccumulator,
                           RecursiveInverseAccumulator)
from .math.inverse import undamped_hessian
from .math.masks import check_pattern_fits, parse_pattern
from .model.blocks import BlockStack, PrunableLayer, find_block_stack, find_layers, module_device
from .model.capture import BlockCall, capture_block_inputs
from .model.hooks import accumulate_inputs, input_hooks, on_device, until_stopped
from .recipe import PruneSettings, Recipe, load_recipe

logger = logging.getLogger(__name__)

# Test-only: seconds to sleep after each block, so a test can interrupt a run mid-way.
TEST_BLOCK_DELAY_ENV = "OBS_COMPRESS_TEST_BLOCK_DELAY"


# --------------------------------------------------------------------------- the plan


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
        if not torch.isfinite(layer.weight_matrix()).all():
            raise NonFiniteError(f"layer {layer.name}: the weight holds NaN or infinity; the "
                                 "checkpoint is broken, refusing to prune it")
    for index, block in enumerate(stack.modules):
        layers = []
        for block_index, layer in chosen:
            if block_index != index:
                continue
            settings = recipe.settings_for(layer.name)
            try:
                check_pattern_fits(parse_pattern(settings.pattern), layer.d_in, layer.name)
            except InvalidArgument as exc:
                raise RecipeError(f"recipe pattern {settings.pattern}: {exc}") from None
            layers.append(LayerPlan(layer=layer, settings=settings))
        blocks.append(BlockPlan(index=index, name=stack.block_name(index), module=block,
                                layers=tuple(layers)))
    return PrunePlan(stack=stack, blocks=tuple(blocks), recipe=recipe)


# --------------------------------------------------------------------------- block sparsity


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


# --------------------------------------------------------------------------- results


@dataclass
class LayerStats:
    """What happened to one layer."""

    name: str
    block: int
    shape: tuple[int, int]  # (d_out, d_in)
    method: str
    pattern: str
    target_sparsity: float
    sparsity: float  # fraction pruned (mask), measured
    n_pruned: int
    # None when pruned without calibration data (magnitude only): there is no H to measure by.
    predicted_loss: float | None  # sum of PruneResult.loss
    reconstruction_loss: float | None  # sum over rows of dW H dW^T / 2, undamped H
    n_tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data


@dataclass
class BlockResult:
    """One pruned block, yielded as soon as it is done (its weights already pruned in place)."""

    index: int
    name: str
    module: nn.Module
    layers: list[LayerStats]
    seconds: float  # since the previous block was yielded (block 0: capture and OWL included)


@dataclass
class PruneReport:
    """The summary of a run: per-layer statistics plus totals."""

    layers: list[LayerStats]
    n_blocks: int
    n_samples: int
    seq_len: int
    seconds: float
    recipe: dict[str, Any] = field(default_factory=dict)
    model: str = ""

    @property
    def pruned(self) -> int:
        return sum(s.n_pruned for s in self.layers)

    @property
    def total(self) -> int:
        return sum(s.shape[0] * s.shape[1] for s in self.layers)

    @property
    def global_sparsity(self) -> float:
        """Pruned fraction over all target layers together."""
        return self.pruned / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "global_sparsity": self.global_sparsity,
            "pruned_weights": self.pruned,
            "target_weights": self.total,
            "n_blocks": self.n_blocks,
            "n_layers": len(self.layers),
            "n_samples": self.n_samples,
            "seq_len": self.seq_len,
            "seconds": self.seconds,
            "recipe": self.recipe,
            "layers": [s.to_dict() for s in self.layers],
        }

    def table(self) -> str:
        """The per-layer summary as an aligned text table."""
        width = max([len("layer")] + [len(s.name) for s in self.layers])
        header = (f"{'layer':<{width}}  {'shape':>11}  {'pattern':>12}  {'sparsity':>8}  "
                  f"{'predicted':>10}  {'measured':>10}  {'seconds':>7}")
        lines = [header, "-" * len(header)]
        for s in self.layers:
            shape = f"{s.shape[0]}x{s.shape[1]}"
            lines.append(f"{s.name:<{width}}  {shape:>11}  {s.pattern:>12}  {s.sparsity:>8.4f}  "
                         f"{_loss_text(s.predicted_loss):>10}  "
                         f"{_loss_text(s.reconstruction_loss):>10}  {s.seconds:>7.2f}")
        lines.append("-" * len(header))
        lines.append(f"{len(self.layers)} layers in {self.n_blocks} blocks: global sparsity "
                     f"{self.global_sparsity:.4f} ({self.pruned:,} of {self.total:,} weights), "
                     f"{self.seconds:.1f} s")
        return "\n".join(lines)


def _loss_text(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4g}"


def summarize(results: Sequence[BlockResult], *, n_samples: int, seq_len: int, seconds: float,
              recipe: Recipe | None = None, model: str = "") -> PruneReport:
    return PruneReport(layers=[s for r in results for s in r.layers], n_blocks=len(results),
                       n_samples=n_samples, seq_len=seq_len, seconds=seconds,
                       recipe=recipe.to_dict() if recipe is not None else {}, model=model)


# --------------------------------------------------------------------------- the loop


def reconstruction_loss(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sum over rows of dW H dW^T / 2`` = ``||dW X^T||^2 / n`` for ``delta = dW: (d_out,
    d_in)`` and the undamped ``H`` (:func:`~obs_compress.math.inverse.undamped_hessian`)."""
    return row_losses(delta.to(device=hessian.device, dtype=hessian.dtype), hessian).sum().item()


def _uses_recursive(settings: PruneSettings) -> bool:
    return settings.inverse == "recursive" and settings.method != "magnitude"


def _accumulator(layer: PrunableLayer, settings: PruneSettings, expected_tokens: int,
                 device: torch.device | None):
    # Beside the layer when no compute device is named, so a model on the GPU stays there.
    device = device if device is not None else module_device(layer.module)
    if _uses_recursive(settings):
        return RecursiveInverseAccumulator(layer.d_in, dampening_frac=settings.dampening_frac,
                                           expected_tokens=expected_tokens, device=device,
                                           name=layer.name)
    return HessianAccumulator(layer.d_in, device=device, name=layer.name)


def _named(error: ObsCompressError, name: str) -> ObsCompressError:
    """The same error with the layer named, when its message does not name it yet."""
    if name in str(error):
        return error
    try:
        return type(error)(f"layer {name}: {error}")
    except TypeError:
        return error


def _prune_layers(plans: Sequence[LayerPlan], curvature: Curvature | None,
                  hessian: torch.Tensor | None, prepared_cache: dict, block_index: int,
                  extra_seconds: float = 0.0) -> list[LayerStats]:
    """Prune layers fed the same inputs with the same settings in place, in one solve.

    Their weights are stacked by rows (``prune_weight``'s ``row_groups``: every layer still
    reaches its own sparsity), so q/k/v or gate/up cost one pass of the solver's per-step
    calls instead of one each. ``hessian`` is the undamped ``H`` that measures the loss,
    ``prepared_cache`` is shared by the layers of one accumulator. The solve's seconds are
    split over the layers by their share of the rows. ``curvature`` and ``hessian`` are None
    for magnitude pruning without calibration data; the losses are then None.
    """
    settings = plans[0].settings
    names = ", ".join(plan.layer.name for plan in plans)
    # Contiguous: a Conv1D weight arrives as a transposed view.
    weights = [plan.layer.weight_matrix().contiguous() for plan in plans]
    rows = [weight.shape[0] for weight in weights]
    stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
    if curvature is not None:
        curvature = replace(curvature, name=names)  # errors name these layers
    start = time.perf_counter()
    try:
        result = prune_weight(stacked, curvature, prepared_cache=prepared_cache,
                              row_groups=rows if len(plans) > 1 else None,
                              **settings.prune_kwargs())
    except ObsCompressError as exc:
        raise _named(exc, names) from exc
    seconds = time.perf_counter() - start + extra_seconds
    stats = []
    for plan, weight, new_weight, mask, loss in zip(
            plans, weights, result.weight.split(rows), result.mask.split(rows),
            result.loss.split(rows)):
        layer = plan.layer
        if not torch.isfinite(new_weight).all():
            raise NonFiniteError(f"layer {layer.name}: pruning produced NaN or infinity; raise "
                                 f"dampening_frac (now {settings.dampening_frac}) or give more "
                                 "calibration samples")
        measured = (reconstruction_loss(new_weight - weight, hessian) if hessian is not None
                    else None)
        n_pruned = int(mask.sum().item())
        layer.set_weight_(new_weight)
        stats.append(LayerStats(
            name=layer.name, block=block_index, shape=layer.shape, method=settings.method,
            pattern=settings.pattern, target_sparsity=settings.sparsity,
            sparsity=n_pruned / mask.numel(), n_pruned=n_pruned,
            predicted_loss=loss.sum().item() if curvature is not None else None,
            reconstruction_loss=measured,
            n_tokens=curvature.n_tokens if curvature is not None else 0,
            seconds=seconds * weight.shape[0] / sum(rows)))
    return stats


@dataclass
class _Feed:
    """One accumulator, fed by one layer's hook, serving every layer that sees the same
    inputs and needs the same kind of curvature (q/k/v, or gate/up, share one Hessian)."""

    accumulator: Any
    module: nn.Module
    layers: list[LayerPlan] = field(default_factory=list)


def _accumulator_key(settings: PruneSettings) -> tuple:
    if _uses_recursive(settings):
        return ("recursive", settings.dampening_frac)
    return ("cholesky",)


def _feeds(input_groups: Sequence[Sequence[LayerPlan]], expected_tokens: int,
           device: torch.device | None) -> list[_Feed]:
    feeds: list[_Feed] = []
    for group in input_groups:
        by_key: dict[tuple, _Feed] = {}
        for plan in group:
            key = _accumulator_key(plan.settings)
            if key not in by_key:
                by_key[key] = _Feed(_accumulator(plan.layer, plan.settings, expected_tokens,
                                                 device), plan.layer.module)
                feeds.append(by_key[key])
            by_key[key].layers.append(plan)
    return feeds


def _prune_block_layers(block: nn.Module, block_plan: BlockPlan, calls: Sequence[BlockCall], *,
                        sequential: bool, expected_tokens: int, device: torch.device | None,
                        order_cache: dict) -> list[LayerStats]:
    """Accumulate, then prune every target layer of one block (in groups if ``sequential``)."""
    order = _execution_order(block, block_plan, calls[0], order_cache)
    passes = [[group] for group in order.groups] if sequential else [order.groups]
    stats: list[LayerStats] = []
    for groups in passes:
        feeds = _feeds(groups, expected_tokens, device)
        modules = {feed.layers[0].layer.name: feed.module for feed in feeds}
        accumulators = {feed.layers[0].layer.name: feed.accumulator for feed in feeds}
        with accumulate_inputs(modules, accumulators, stop_after=_stop_after(feeds, order)):
            for call in calls:
                until_stopped(call, block)
        for feed in feeds:
            start = time.perf_counter()
            try:
                curvature = feed.accumulator.finalize()
            except ObsCompressError as exc:
                raise _named(exc, feed.layers[0].layer.name) from exc
            hessian = undamped_hessian(curvature)
            finalize_seconds = time.perf_counter() - start
            prepared_cache: dict = {}
            alike: dict[PruneSettings, list[LayerPlan]] = {}
            for plan in feed.layers:
                alike.setdefault(plan.settings, []).append(plan)
            for position, plans in enumerate(alike.values()):
                stats.extend(_prune_layers(plans, curvature, hessian, prepared_cache,
                                           block_plan.index,
                                           finalize_seconds if position == 0 else 0.0))
        del feeds, accumulators
    position = {plan.layer.name: index for index, plan in enumerate(block_plan.layers)}
    return sorted(stats, key=lambda layer_stats: position[layer_stats.name])


@dataclass(frozen=True)
class _ExecutionOrder:
    """How one forward of a block reaches its target layers."""

    groups: list[list[LayerPlan]]  # fed the same tensor, in the order first reached
    reached: list[str]  # layer names in the order first called
    called_once: bool  # no target layer is called twice in one forward


def _execution_groups(block: nn.Module, layers: Sequence[LayerPlan],
                      call: BlockCall) -> _ExecutionOrder:
    """``layers`` grouped by the tensor they are fed, in the order the forward reaches them."""
    seen: list[tuple[str, torch.Tensor]] = []
    modules = {plan.layer.name: plan.layer.module for plan in layers}
    with input_hooks(modules, lambda name, inputs: seen.append((name, inputs))):
        call(block)
    groups: list[tuple[torch.Tensor, list[str]]] = []
    reached: list[str] = []
    for name, inputs in seen:
        if name in reached:
            continue
        reached.append(name)
        for tensor, names in groups:
            if tensor is inputs:
                names.append(name)
                break
        else:
            groups.append((inputs, [name]))
    by_name = {plan.layer.name: plan for plan in layers}
    ordered = [[by_name[name] for name in names] for _, names in groups]
    never_called = [plan for plan in layers if plan.layer.name not in reached]
    if never_called:  # their accumulators will see no tokens and say so, naming them
        ordered.append(never_called)
    return _ExecutionOrder(groups=ordered, reached=reached,
                           called_once=len(seen) == len(reached))


def _execution_order(block: nn.Module, block_plan: BlockPlan, call: BlockCall,
                     cache: dict) -> _ExecutionOrder:
    """:func:`_execution_groups`, probed once per block class and set of target layers.

    Blocks of one class reach their layers in one order, so later blocks take the first
    one's probe (names relative to the block) instead of running a forward of their own.
    """
    prefix = block_plan.name + "."  # find_layers names every layer prefix + path
    by_relative = {plan.layer.name[len(prefix):]: plan for plan in block_plan.layers}
    key = (type(block), frozenset(by_relative))
    if key not in cache:
        probed = _execution_groups(block, block_plan.layers, call)
        cache[key] = ([[plan.layer.name[len(prefix):] for plan in group]
                       for group in probed.groups],
                      [name[len(prefix):] for name in probed.reached], probed.called_once)
        return probed
    groups, reached, called_once = cache[key]
    return _ExecutionOrder(groups=[[by_relative[name] for name in group] for group in groups],
                           reached=[prefix + name for name in reached], called_once=called_once)


def _stop_after(feeds: Sequence[_Feed], order: _ExecutionOrder) -> str | None:
    """The hooked layer the accumulation forward may stop at: the last one reached.

    Nothing after it feeds an accumulator, so the rest of the block (in a Llama block the
    down_proj product, a quarter of its Linear work) need not run. None when a target layer
    runs twice per forward (its later calls would be cut off) or a hooked layer never runs.
    """
    names = [feed.layers[0].layer.name for feed in feeds]
    if not order.called_once or not all(name in order.reached for name in names):
        return None
    return max(names, key=order.reached.index)


def _check_finite_outputs(hidden: torch.Tensor, block_name: str) -> None:
    if not torch.isfinite(hidden).all():
        raise NonFiniteError(f"block {block_name}: its outputs hold NaN or infinity after "
                             "pruning; check the model's dtype (fp16 overflow) and raise "
                             "dampening_frac")


def _batches(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise InvalidArgument("calibration input_ids must be an integer tensor (n_samples, "
                              f"seq_len), got {tuple(input_ids.shape)} {input_ids.dtype}")
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
    return list(input_ids.split(batch_size))


def _prune_blocks_without_data(plan: PrunePlan) -> Iterator[tuple[BlockPlan, list[LayerStats]]]:
    """Magnitude pruning from the weights alone: no capture, no forward, no device moves."""
    for block_plan in plan.blocks:
        yield block_plan, [stats for layer_plan in block_plan.layers
                           for stats in _prune_layers([layer_plan], None, None, {},
                                                      block_plan.index)]


def _prune_blocks_with_data(model: nn.Module, plan: PrunePlan, batches: Sequence[torch.Tensor], *,
                            expected_tokens: int, device: torch.device | None,
                            sequential: bool) -> Iterator[tuple[BlockPlan, list[LayerStats]]]:
    order_cache: dict = {}
    calls = capture_block_inputs(model, plan.stack, batches, device=device)
    if plan.recipe.block_sparsity.method == "owl":
        plan = owl_plan(plan, calls, device)
    for block_plan in plan.blocks:
        with on_device(block_plan.module, device) as block:
            stats = (_prune_block_layers(block, block_plan, calls, sequential=sequential,
                                         expected_tokens=expected_tokens, device=device,
                                         order_cache=order_cache)
                     if block_plan.layers else [])
            for call in calls:
                call.hidden_states = call(block)
                _check_finite_outputs(call.hidden_states, block_plan.name)
        yield block_plan, stats


def prune_blocks(model: nn.Module, plan: PrunePlan, input_ids: torch.Tensor | None, *,
                 device: torch.device | str | None = None, batch_size: int = 8,
                 sequential: bool | None = None, progress: bool = True) -> Iterator[BlockResult]:
    """Prune ``model`` in place, block by block, yielding each :class:`BlockResult` when done.

    ``input_ids: (n_samples, seq_len)`` calibration tokens, or None to prune from the
    weights alone (a magnitude-only plan; anything else is refused before any weight
    changes). ``device``: where each block runs (None: where the model is); only the block
    being worked on is moved there. ``sequential``: None takes the recipe's. The model is in
    eval mode meanwhile and gets its training flag back at the end; every hook is removed,
    even on error.
    """
    sequential = plan.recipe.sequential if sequential is None else sequential
    device = torch.device(device) if device is not None else None
    needs = plan.recipe.data_needs_text() if input_ids is None else ""
    if needs:
        raise InvalidArgument(f"pruning without calibration data: {needs} the Hessian of "
                              "calibration inputs; give calibration data (e.g. dataset c4)")
    if input_ids is not None:
        batches = _batches(input_ids, batch_size)
    delay = float(os.environ.get(TEST_BLOCK_DELAY_ENV, "0") or 0)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(plan.blocks), desc="pruning", unit="block", disable=not progress)
    try:
        with torch.no_grad():
            blocks = (_prune_blocks_without_data(plan) if input_ids is None else
                      _prune_blocks_with_data(model, plan, batches,
                                              expected_tokens=input_ids.numel(), device=device,
                                              sequential=sequential))
            start = time.perf_counter()
            for block_plan, stats in blocks:
                seconds = time.perf_counter() - start
                result = BlockResult(index=block_plan.index, name=block_plan.name,
                                     module=block_plan.module, layers=stats, seconds=seconds)
                _log_block(result, len(plan.blocks))
                bar.update(1)
                predicted = [s.predicted_loss for s in stats if s.predicted_loss is not None]
                if predicted:
                    bar.set_postfix(loss=f"{sum(predicted):.3g}")
                if delay:
                    time.sleep(delay)
                yield result
                start = time.perf_counter()
    finally:
        bar.close()
        model.train(was_training)


def _log_block(result: BlockResult, n_blocks: int) -> None:
    if result.layers:
        size = sum(s.shape[0] * s.shape[1] for s in result.layers)
        pruned = sum(s.n_pruned for s in result.layers)
        losses = ""
        if all(s.predicted_loss is not None for s in result.layers):
            losses = (f", predicted loss {sum(s.predicted_loss for s in result.layers):.4g}, "
                      f"measured {sum(s.reconstruction_loss for s in result.layers):.4g}")
        logger.info("block %d/%d %s: %d layers, sparsity %.4f%s, %.1f s", result.index + 1,
                    n_blocks, result.name, len(result.layers), pruned / size, losses,
                    result.seconds)
    else:
        logger.info("block %d/%d %s: no target layers, %.1f s", result.index + 1, n_blocks,
                    result.name, result.seconds)


def prune_model(model: nn.Module, plan: PrunePlan, input_ids: torch.Tensor | None, *,
                device: torch.device | str | None = None, batch_size: int = 8,
                sequential: bool | None = None, progress: bool = True,
                model_name: str = "") -> PruneReport:
    """Run :func:`prune_blocks` to the end and summarize it (no samples: ``input_ids`` None)."""
    start = time.perf_counter()
    results = list(prune_blocks(model, plan, input_ids, device=device, batch_size=batch_size,
                                sequential=sequential, progress=progress))
    n_samples, seq_len = input_ids.shape if input_ids is not None else (0, 0)
    return summarize(results, n_samples=n_samples, seq_len=seq_len,
                     seconds=time.perf_counter() - start, recipe=plan.recipe, model=model_name)


__all__ = ["BlockPlan", "BlockResult", "LayerPlan", "LayerStats", "PrunePlan", "PruneReport",
           "block_input_norms", "build_plan", "owl_plan", "prune_blocks", "prune_model",
           "reconstruction_loss", "summarize"]
