"""The one layer loop: capture -> accumulate -> prune -> re-forward -> offload, block by block.

The driver of SparseGPT (Frantar & Alistarh 2023, sec. 4, "catch the inputs of block 0, then
walk the blocks"), written once for every model ``transformers`` loads. It takes a plan
(:func:`obs_compress.plan.build_plan`: every check that can fail has run) and calibration
token ids, or None for magnitude pruning from the weights alone.

:func:`prune_blocks` captures block 0's inputs (:mod:`obs_compress.model.capture`), then
for each block: onload it to the compute device, let forward hooks feed every target
layer's Hessian accumulator, prune each layer with
:func:`obs_compress.algorithms.prune_weight`, run the block again with the pruned weights to
produce the next block's inputs, offload it, and yield a
:class:`~obs_compress.report.BlockResult`. With ``sequential`` the layers of a block are
pruned in groups, in the order the forward reaches them (layers fed the same tensor form one
group: q/k/v, then o_proj, then gate/up, then down_proj in a Llama block), each group's
Hessians taken from inputs recomputed with the earlier groups already pruned. Layers fed the
same tensor share one Hessian accumulator either way, and those with equal settings one
stacked solve (each still reaching its own sparsity). The accumulation forward stops at the
last input it needs. With ``block_sparsity: owl`` the plan is first moved by
:func:`obs_compress.owl.owl_plan`. :func:`prune_model` runs the loop to the end and returns
the :class:`~obs_compress.report.PruneReport`.

Shapes: calibration ``input_ids: (n_samples, seq_len)``; a layer's ``W: (d_out, d_in)``,
its inputs ``X: (n_tokens, d_in)`` and ``H = 2 X^T X / n: (d_in, d_in)``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms import prune_weight
from .algorithms.refit import row_losses
from .curvature import block_output_factors, model_output_factors
from .distributed import ProcessGroup, assign_by_cost, solve_cost
from .errors import InvalidArgument, NonFiniteError, ObsCompressError
from .math.hessian import Curvature, HessianAccumulator, RecursiveInverseAccumulator
from .math.inverse import undamped_hessian
from .math.kronecker import kronecker_row_weights
from .model.blocks import PrunableLayer, module_device
from .model.activations import ActivationStore
from .model.capture import BlockCall, capture_block_inputs
from .model.hooks import accumulate_inputs, input_hooks, on_device, until_stopped
from .owl import owl_plan
from .plan import BlockPlan, LayerPlan, PrunePlan, check_runs_without_data
from .recipe import CurvatureSettings, PruneSettings
from .structured import DenseReference, remove_block_structure
from .report import BlockResult, LayerStats, PruneReport, StructureStats, summarize

logger = logging.getLogger(__name__)

BlockLoader = Callable[[BlockPlan], None]


def reconstruction_loss(delta: torch.Tensor, hessian: torch.Tensor,
                        old: torch.Tensor | None = None) -> float:
    """``sum over rows of dW H dW^T / 2`` = ``||dW X^T||^2 / n`` for ``dW = delta - old``
    (``old`` None: ``delta`` itself), ``(d_out, d_in)``, and the undamped ``H``: the products
    in ``H``'s dtype, a chunk of rows at a time
    (:func:`~obs_compress.algorithms.refit.row_losses`), summed in float64."""
    return row_losses(delta.to(hessian.device), hessian,
                      old.to(hessian.device) if old is not None else None
                      ).sum(dtype=torch.float64).item()


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
                  extra_seconds: float = 0.0,
                  row_weights: dict[str, torch.Tensor] | None = None) -> list[LayerStats]:
    """Prune layers fed the same inputs with the same settings in place, in one solve.

    Their weights are stacked by rows (``prune_weight``'s ``row_groups``: every layer still
    reaches its own sparsity), so q/k/v or gate/up cost one pass of the solver's per-step
    calls instead of one each. ``hessian`` is the undamped ``H`` that measures the loss,
    ``prepared_cache`` is shared by the layers of one accumulator. The solve's seconds are
    split over the layers by their share of the rows. ``curvature`` and ``hessian`` are None
    for magnitude pruning without calibration data; the losses are then None.
    ``row_weights``: layer name -> its Kronecker row factors (``curvature.kind kronecker``).
    """
    settings = plans[0].settings
    names = ", ".join(plan.layer.name for plan in plans)
    # Contiguous: a Conv1D weight arrives as a transposed view.
    weights = [plan.layer.weight_matrix().contiguous() for plan in plans]
    rows = [weight.shape[0] for weight in weights]
    stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
    if curvature is not None:
        curvature = replace(curvature, name=names)  # errors name these layers
    weights_of_rows = (torch.cat([row_weights[plan.layer.name] for plan in plans])
                       if row_weights is not None else None)
    start = time.perf_counter()
    try:
        result = prune_weight(stacked, curvature, prepared_cache=prepared_cache,
                              row_groups=rows if len(plans) > 1 else None,
                              row_weights=weights_of_rows, **settings.prune_kwargs())
    except ObsCompressError as exc:
        raise _named(exc, names) from exc
    del stacked  # a copy of the layers' weights when stacked: not needed past the solve
    seconds = time.perf_counter() - start + extra_seconds
    dampening = _dampening_used(result.dampening_frac, settings)
    stats = []
    for plan, weight, new_weight, mask, loss in zip(
            plans, weights, result.weight.split(rows), result.mask.split(rows),
            result.loss.split(rows)):
        layer = plan.layer
        if not torch.isfinite(new_weight).all():
            raise NonFiniteError(f"layer {layer.name}: pruning produced NaN or infinity "
                                 f"{_dampening_text(dampening, settings)}; raise "
                                 "dampening_frac or give more calibration samples")
        if hessian is None:
            measured = None
        elif result.loss_measured:  # measured on this weight with this undamped H already
            measured = loss.double().sum().item()
        else:
            measured = reconstruction_loss(new_weight, hessian, weight)
        n_pruned = int(mask.sum().item())
        layer.set_weight_(new_weight)
        stats.append(LayerStats(
            name=layer.name, block=block_index, shape=layer.shape, method=settings.method,
            pattern=settings.pattern, target_sparsity=settings.sparsity,
            sparsity=n_pruned / mask.numel(), n_pruned=n_pruned,
            predicted_loss=loss.sum().item() if curvature is not None else None,
            reconstruction_loss=measured,
            n_tokens=curvature.n_tokens if curvature is not None else 0,
            seconds=seconds * weight.shape[0] / sum(rows),
            dampening_frac=dampening, requested_dampening_frac=settings.dampening_frac))
    return stats


def _dampening_used(used: float | None, settings: PruneSettings) -> float | None:
    """The dampening a solve ran with: the raised one when the Cholesky step raised it; the
    recipe's on the recursive path (its accumulator folded exactly that in); None when no
    inverse was taken (magnitude, OBD)."""
    if used is not None and math.isnan(used):
        return settings.dampening_frac
    return used


def _dampening_text(used: float | None, settings: PruneSettings) -> str:
    if used is None:
        return "(no inverse was taken)"
    if used != settings.dampening_frac:
        return (f"(with dampening_frac {used:g}, raised from the recipe's "
                f"{settings.dampening_frac:g})")
    return f"(with dampening_frac {used:g})"


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


def _row_weights(block: nn.Module, block_plan: BlockPlan, calls: Sequence[BlockCall],
                 settings: CurvatureSettings, model_factors: dict[str, torch.Tensor] | None,
                 device: torch.device | None) -> dict[str, torch.Tensor] | None:
    """Each target layer's Kronecker row factors (``curvature.kind kronecker``), from ``G``
    of the block-output loss taken now, at the block's dense point, or of the model's
    next-token loss taken before the loop (``model_factors``); None for ``hessian``."""
    if settings.kind != "kronecker":
        return None
    layers = [plan.layer for plan in block_plan.layers]
    factors = model_factors if model_factors is not None else block_output_factors(
        block, calls, layers, n_probes=settings.n_probes, seed=settings.seed + block_plan.index,
        device=device)
    weights = {}
    for layer in layers:
        try:
            weights[layer.name] = kronecker_row_weights(factors[layer.name],
                                                        settings.dampening_frac_g)
        except ObsCompressError as exc:
            raise _named(exc, layer.name) from exc
    return weights


def _solve_units(feeds: Sequence[_Feed]) -> list[tuple[_Feed, list[LayerPlan]]]:
    """The solves of one pass, in order: per accumulator, its layers with the same settings
    (stacked by rows into one ``prune_weight`` call). The widest accumulator goes first, so
    its ``d_in^2`` Hessian (down_proj's) is freed before the others' solves run beside it;
    the results do not depend on the order (each solve reads its own Hessian only)."""
    units = []
    for feed in sorted(feeds, key=lambda feed: -feed.layers[0].layer.d_in):
        alike: dict[PruneSettings, list[LayerPlan]] = {}
        for plan in feed.layers:
            alike.setdefault(plan.settings, []).append(plan)
        units.extend((feed, plans) for plans in alike.values())
    return units


def _prune_block_layers(block: nn.Module, block_plan: BlockPlan, calls: Sequence[BlockCall], *,
                        sequential: bool, expected_tokens: int, device: torch.device | None,
                        order_cache: dict, group: ProcessGroup | None = None,
                        curvature: CurvatureSettings | None = None,
                        model_factors: dict[str, torch.Tensor] | None = None) -> list[LayerStats]:
    """Accumulate, then prune every target layer of one block (in groups if ``sequential``).

    With a process ``group``: the accumulators are summed over the ranks, each rank solves
    the units :func:`~obs_compress.distributed.assign_by_cost` gives it, and the pruned
    weights are broadcast, so every rank ends with the same block. ``curvature`` kronecker:
    each layer's row factors from ``G`` (:func:`_row_weights`), taken before any change."""
    row_weights = (_row_weights(block, block_plan, calls, curvature, model_factors, device)
                   if curvature is not None else None)
    order = _execution_order(block, block_plan, calls[0], order_cache)
    passes = [[inputs] for inputs in order.groups] if sequential else [order.groups]
    rank = group.rank if group is not None else 0
    stats: list[LayerStats] = []
    for groups in passes:
        feeds = _feeds(groups, expected_tokens, device)
        modules = {feed.layers[0].layer.name: feed.module for feed in feeds}
        accumulators = {feed.layers[0].layer.name: feed.accumulator for feed in feeds}
        with accumulate_inputs(modules, accumulators, stop_after=_stop_after(feeds, order)):
            for call in calls:
                until_stopped(call, block)
        del accumulators
        units = _solve_units(feeds)
        if group is not None:
            group.all_reduce_accumulators_([feed.accumulator for feed in feeds],
                                           f"block {block_plan.name}")
            owners = assign_by_cost([solve_cost(sum(p.layer.shape[0] for p in plans),
                                                plans[0].layer.d_in, plans[0].settings.method)
                                     for _, plans in units], group.world_size)
        else:
            owners = [0] * len(units)
        solved: list[list[LayerStats] | None] = [None] * len(units)
        current: _Feed | None = None
        for index, ((feed, plans), owner) in enumerate(zip(units, owners)):
            if owner != rank:
                continue
            finalize_seconds = 0.0
            if feed is not current:  # one inverse per accumulator, taken by each rank using it
                start = time.perf_counter()
                try:
                    curvature = feed.accumulator.finalize()
                except ObsCompressError as exc:
                    raise _named(exc, feed.layers[0].layer.name) from exc
                # the recursive path keeps only the damped inverse: H from it, in float64
                hessian = (curvature.hessian if curvature.hessian is not None
                           else undamped_hessian(curvature))
                finalize_seconds = time.perf_counter() - start
                prepared_cache: dict = {}
                current = feed
                feed.accumulator = None  # its sum is in the curvature now: free it
            solved[index] = _prune_layers(plans, curvature, hessian, prepared_cache,
                                          block_plan.index, finalize_seconds,
                                          row_weights=row_weights)
        current = curvature = hessian = prepared_cache = None
        if group is not None:
            group.share_solved_([plans for _, plans in units], owners, solved,
                                f"block {block_plan.name}")
        stats.extend(layer_stats for unit_stats in solved for layer_stats in unit_stats)
        del feeds, units
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


def _check_finite_outputs(hidden: torch.Tensor, block_name: str,
                          stats: Sequence[LayerStats]) -> None:
    if not torch.isfinite(hidden).all():
        used = sorted({f"{s.dampening_frac:g}" for s in stats if s.dampening_frac is not None})
        raised = [s.name for s in stats if s.dampening_raised]
        detail = f" (its layers were solved with dampening_frac {', '.join(used)}" if used else ""
        if used and raised:
            detail += f"; raised for {', '.join(raised)}"
        detail += ")" if used else ""
        raise NonFiniteError(f"block {block_name}: its outputs hold NaN or infinity after "
                             f"pruning{detail}; check the model's dtype (fp16 overflow) and "
                             "raise dampening_frac")


def _batches(input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise InvalidArgument("calibration input_ids must be an integer tensor (n_samples, "
                              f"seq_len), got {tuple(input_ids.shape)} {input_ids.dtype}")
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
    return list(input_ids.split(batch_size))


def _prune_blocks_without_data(plan: PrunePlan, *, block_loader: BlockLoader | None,
                               start_block: int) -> Iterator[tuple[BlockPlan, list[LayerStats],
                                                                   None, None]]:
    """Magnitude pruning from the weights alone: no capture, no forward, no device moves."""
    for block_plan in plan.blocks[start_block:]:
        if block_loader is not None:
            block_loader(block_plan)
        yield block_plan, [stats for layer_plan in block_plan.layers
                           for stats in _prune_layers([layer_plan], None, None, {},
                                                      block_plan.index)], None, None


def _prune_blocks_with_data(model: nn.Module, plan: PrunePlan, batches: Sequence[torch.Tensor], *,
                            expected_tokens: int, device: torch.device | None,
                            sequential: bool, block_loader: BlockLoader | None,
                            start_block: int, start_inputs: Sequence[torch.Tensor] | None,
                            group: ProcessGroup | None = None,
                            activations: str = "device",
                            activations_dir: Any = None) -> Iterator[
                                tuple[BlockPlan, list[LayerStats], list[torch.Tensor],
                                      StructureStats | None]]:
    order_cache: dict = {}
    calls = capture_block_inputs(model, plan.stack, batches, device=device)
    if start_inputs is not None:  # a resumed run: the inputs block ``start_block`` received
        if len(start_inputs) != len(calls):
            raise InvalidArgument(f"{len(start_inputs)} stored input batches for block "
                                  f"{start_block}, but the calibration has {len(calls)}")
        for call, hidden in zip(calls, start_inputs):
            call.hidden_states = hidden.to(call.hidden_states.device)
    curvature = plan.recipe.curvature
    model_factors = None
    if curvature.kind == "kronecker" and curvature.loss != "block_reconstruction":
        # the next-token loss needs the whole dense model: G of every layer, taken once now
        model_factors = model_output_factors(
            model, plan.stack, torch.cat(list(batches)), [p.layer for p in plan.layers],
            loss=curvature.loss, seed=curvature.seed, device=device)
    store = ActivationStore(activations, device, activations_dir)
    reference = None
    if (plan.structured is not None and plan.recipe.structured.score == "obs"
            and plan.recipe.structured.reference == "dense"):
        reference = DenseReference(calls)  # the dense stream, beside the pruned one
    try:
        store.hold_(calls)
        if plan.recipe.block_sparsity.method == "owl":
            plan = owl_plan(plan, calls, device)
        for block_plan in plan.blocks[start_block:]:
            if block_loader is not None:
                block_loader(block_plan)
            with on_device(block_plan.module, device) as block:
                stats = (_prune_block_layers(block, block_plan, calls, sequential=sequential,
                                             expected_tokens=expected_tokens, device=device,
                                             order_cache=order_cache, group=group,
                                             curvature=curvature, model_factors=model_factors)
                         if block_plan.layers else [])
                structure = (remove_block_structure(block, block_plan, plan.structured, calls,
                                                    plan.recipe, device, reference)
                             if block_plan.structure is not None else None)
                for call in calls:
                    hidden = call(block)
                    _check_finite_outputs(hidden, block_plan.name, stats)
                    store.replace_(call, hidden)
                    del hidden
            # Held on CPU or disk, these are overwritten by the next block: use them first.
            yield block_plan, stats, [call.hidden_states for call in calls], structure
    finally:
        store.close()


def prune_blocks(model: nn.Module, plan: PrunePlan, input_ids: torch.Tensor | None, *,
                 device: torch.device | str | None = None, batch_size: int = 8,
                 sequential: bool | None = None, progress: bool = True,
                 block_loader: BlockLoader | None = None, start_block: int = 0,
                 start_inputs: Sequence[torch.Tensor] | None = None,
                 group: ProcessGroup | None = None, activations: str = "device",
                 activations_dir: Any = None) -> Iterator[BlockResult]:
    """Prune ``model`` in place, block by block, yielding each :class:`BlockResult` when done.

    ``input_ids: (n_samples, seq_len)`` calibration tokens, or None to prune from the
    weights alone (a magnitude-only plan; anything else is refused before any weight
    changes). ``device``: where each block runs (None: where the model is); only the block
    being worked on is moved there. ``sequential``: None takes the recipe's. The model is in
    eval mode meanwhile and gets its training flag back at the end; every hook is removed,
    even on error.

    ``block_loader(block_plan)`` runs before each block is worked on (streaming: its weights
    are read from disk then). ``start_block``/``start_inputs``: a resumed run starts at that
    block, with the hidden states it received (one tensor per batch; None without data).
    Each result carries the hidden states the block produced (``outputs``).

    ``group``: this process's place in a multi-process run (:mod:`obs_compress.distributed`):
    it forwards only its share of ``input_ids``, the Hessians are summed over the ranks and
    each block's layers are solved on different ranks; every rank gets the same pruned model
    and the same results. ``outputs`` are then this rank's share.

    ``activations``: where the calibration hidden states are held between blocks,
    ``device``, ``cpu`` or ``disk`` (a memory-mapped file in ``activations_dir``;
    :mod:`obs_compress.model.activations`); the pruned weights are the same in each. Held
    on CPU or disk, a result's ``outputs`` are valid until the next block is worked on.
    """
    sequential = plan.recipe.sequential if sequential is None else sequential
    device = torch.device(device) if device is not None else None
    if input_ids is None:
        check_runs_without_data(plan.recipe)
        logger.info("no calibration data (magnitude only): pruning %d layers in %d blocks of "
                    "%s from their weights alone", len(plan.layers), len(plan.blocks),
                    plan.stack.name)
    else:
        _batches(input_ids, batch_size)  # checks the ids and batch size on the whole set
        if group is not None:
            recursive = sorted({p.layer.name for p in plan.layers if _uses_recursive(p.settings)})
            if recursive:
                raise InvalidArgument(f"inverse: recursive keeps H^-1, which cannot be summed "
                                      f"over {group.world_size} processes (layers "
                                      f"{', '.join(recursive[:3])}{', ...' if len(recursive) > 3 else ''}): "
                                      "use inverse: cholesky with several processes")
            if plan.recipe.block_sparsity.method == "owl":
                raise InvalidArgument("block_sparsity owl does not run with several processes "
                                      "(its dense pass is not split over the ranks)")
            if plan.structured is not None:
                raise InvalidArgument("structured removal does not run with several processes "
                                      "(it loads the whole model)")
            if plan.recipe.curvature.kind == "kronecker":
                raise InvalidArgument("curvature.kind kronecker does not run with several "
                                      "processes (each rank's G would come from its share of "
                                      "the samples alone); use one process")
        batches = _batches(group.local_samples(input_ids) if group is not None else input_ids,
                           batch_size)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(plan.blocks), initial=start_block, desc="pruning", unit="block",
               disable=not progress or (group is not None and not group.is_writer))
    try:
        with torch.no_grad():
            blocks = (_prune_blocks_without_data(plan, block_loader=block_loader,
                                                 start_block=start_block)
                      if input_ids is None else
                      _prune_blocks_with_data(model, plan, batches,
                                              expected_tokens=input_ids.numel(), device=device,
                                              sequential=sequential, block_loader=block_loader,
                                              start_block=start_block,
                                              start_inputs=start_inputs, group=group,
                                              activations=activations,
                                              activations_dir=activations_dir))
            start = time.perf_counter()
            for block_plan, stats, outputs, structure in blocks:
                seconds = time.perf_counter() - start
                result = BlockResult(index=block_plan.index, name=block_plan.name,
                                     module=block_plan.module, layers=stats, seconds=seconds,
                                     outputs=outputs, structure=structure)
                logger.info("%s", result.describe(len(plan.blocks)))
                bar.update(1)
                predicted = [s.predicted_loss for s in stats if s.predicted_loss is not None]
                if predicted:
                    bar.set_postfix(loss=f"{sum(predicted):.3g}")
                yield result
                start = time.perf_counter()
    finally:
        bar.close()
        model.train(was_training)


def prune_model(model: nn.Module, plan: PrunePlan, input_ids: torch.Tensor | None, *,
                device: torch.device | str | None = None, batch_size: int = 8,
                sequential: bool | None = None, progress: bool = True,
                model_name: str = "", activations: str = "device") -> PruneReport:
    """Run :func:`prune_blocks` to the end and summarize it (no samples: ``input_ids`` None)."""
    start = time.perf_counter()
    results = []
    for result in prune_blocks(model, plan, input_ids, device=device, batch_size=batch_size,
                               sequential=sequential, progress=progress,
                               activations=activations):
        result.outputs = None  # else every block's hidden states would be kept to the end
        results.append(result)
    n_samples, seq_len = input_ids.shape if input_ids is not None else (0, 0)
    report = summarize(results, n_samples=n_samples, seq_len=seq_len,
                       seconds=time.perf_counter() - start, recipe=plan.recipe, model=model_name)
    report.activations = activations if input_ids is not None else "none"
    return report


__all__ = ["prune_blocks", "prune_model", "reconstruction_loss"]
