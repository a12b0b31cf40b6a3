"""The structured step of the layer loop: remove whole attention heads and MLP channels from
one block, then (after the loop) shrink the model.

For each of ``structured.shots`` steps, :func:`remove_block_structure` first takes heads out,
then MLP channels, each from curvature gathered with the block as it is at that moment:

1. one forward of the block's calibration inputs, hooked at the consumer layer (``o_proj`` for
   heads, ``down_proj`` for channels; the forward stops there), gives its input Hessian ``A``
   (``H = 2 X^T X / n``); with ``curvature.kind kronecker`` the output factor ``G`` of the
   block-output loss is taken too (:func:`obs_compress.curvature.block_output_factors`);
2. ``score: obs``: the units go one at a time, each the one of least group OBS saliency
   at that moment, the kept columns of the consumer compensated and ``A^-1`` downdated after
   each (:func:`obs_compress.math.structured.greedy_group_obs`); the baselines score every
   unit once and zero the columns of the lowest, with no compensation. Under grouped-query
   attention the same number goes from every key/value group, or whole groups go;
3. the removed units' producing rows (``q_proj`` rows, ``k_proj``/``v_proj`` rows of a
   removed group, ``gate_proj``/``up_proj`` rows) are zeroed.

The loop then runs the block again for the next block's inputs, as after unstructured
pruning, so later blocks calibrate on what the smaller model computes. Removal is exact
masking until :func:`shrink_pruned_model_` drops the masked rows and columns.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

from .algorithms.refit import row_losses
from .curvature import block_output_factors
from .errors import ObsCompressError
from .math.hessian import HessianAccumulator
from .math.inverse import prepare_curvature
from .math.structured import (TargetCovariance, activation_scores, greedy_group_obs, lowest,
                              refit_to_target, remove_column_groups, weight_norm_scores)
from .model.blocks import PrunableLayer, module_device
from .model.capture import BlockCall
from .model.hooks import accumulate_inputs, until_stopped
from .model.structure import BlockStructure, shrink_model_, zero_heads_, zero_mlp_channels_
from .plan import BlockPlan, PrunePlan, StructuredCounts
from .recipe import Recipe
from .report import StructureStats


def _cumulative(total: int, shot: int, shots: int) -> int:
    """Units removed by the end of ``shot`` (0-based) of ``shots``, spread evenly."""
    return round(total * (shot + 1) / shots)


class _Totals:
    def __init__(self) -> None:
        self.predicted = 0.0
        self.measured = 0.0
        self.dampening: list[float] = []


class DenseReference:
    """The dense model's residual stream beside the pruned one (``structured.reference:
    dense``): its hidden states per calibration batch, advanced block by block with the
    dense weights, and the two points of each block the compensated layers aim at."""

    def __init__(self, calls: Sequence[BlockCall]):
        self.hidden = [call.hidden_states.detach().clone() for call in calls]
        self.after_attention: list[torch.Tensor] = []  # h + o_proj(...): o_proj's target point
        self.outputs: list[torch.Tensor] = []  # the block's output: down_proj's target point

    def run_dense_(self, block: nn.Module, structure: BlockStructure,
                   calls: Sequence[BlockCall]) -> None:
        """Run the block, still dense, on the dense inputs (before any change to it)."""
        seen: list[torch.Tensor] = []
        handle = structure.o.module.register_forward_hook(
            lambda _module, _args, output: seen.append(output.detach()))
        try:
            self.after_attention, self.outputs = [], []
            for call, hidden in zip(calls, self.hidden):
                output = call(block, hidden).detach()
                self.after_attention.append(hidden.to(output.device) + seen.pop())
                self.outputs.append(output)
        finally:
            handle.remove()

    def advance_(self) -> None:
        """The dense outputs become the next block's dense inputs."""
        self.hidden = [output.to(hidden.device) for output, hidden in zip(self.outputs,
                                                                        self.hidden)]
        self.after_attention, self.outputs = [], []


def _gather(block: nn.Module, layer: PrunableLayer, calls: Sequence[BlockCall],
            device: torch.device | None, target_of) -> tuple:
    """The layer's input Hessian over the calibration batches and, with ``target_of(index,
    layer output, block output)`` giving each batch's target outputs, ``C = 2 T^T X / n``."""
    accumulator = HessianAccumulator(layer.d_in, device=device or module_device(layer.module),
                                     name=layer.name)
    if target_of is None:
        with accumulate_inputs({layer.name: layer.module}, {layer.name: accumulator},
                               stop_after=layer.name):
            for call in calls:
                until_stopped(call, block)
        return accumulator.finalize(), None
    covariance = TargetCovariance(layer.shape[0], layer.d_in,
                                  device=device or module_device(layer.module))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = layer.module.register_forward_hook(
        lambda _module, args, output: seen.append((args[0].detach(), output.detach())))
    try:
        for index, call in enumerate(calls):
            output = call(block).detach()
            inputs, layer_output = seen.pop()
            accumulator.add_batch(inputs)
            covariance.add_batch(target_of(index, layer_output, output), inputs)
    finally:
        handle.remove()
    return accumulator.finalize(), covariance.finalize()


def _remove_units(block: nn.Module, layer: PrunableLayer, calls: Sequence[BlockCall],
                  groups: torch.Tensor, count: int, parts: torch.Tensor | None, recipe: Recipe,
                  seed: int, device: torch.device | None, totals: _Totals,
                  target_of=None) -> torch.Tensor:
    """Remove ``count`` of the column ``groups`` of ``layer`` (``count`` per part with
    ``parts``) by the recipe's score; returns the positions in ``groups`` removed.
    ``target_of``: the dense reference's targets (obs only): the layer is first refit to
    them over all its columns, then the units go from that weight."""
    curvature, covariance = _gather(block, layer, calls, device, target_of)
    hessian = curvature.hessian.double()
    weight = layer.weight_matrix().double()
    score = recipe.structured.score
    if score == "obs":
        prepared = prepare_curvature(curvature, recipe.dampening_frac,
                                     max_dampening_frac=recipe.max_dampening_frac,
                                     dtype=torch.float64)
        totals.dampening.append(prepared.dampening_frac)
        output_factor = None
        if recipe.curvature.kind == "kronecker":
            output_factor = block_output_factors(
                block, calls, [layer], n_probes=recipe.curvature.n_probes, seed=seed,
                device=device)[layer.name].double()
        start = (refit_to_target(covariance, prepared.hessian_inverse)
                 if covariance is not None else weight)
        new_weight, chosen, predicted = greedy_group_obs(
            start, prepared.hessian_inverse, groups, count, parts=parts,
            output_factor=output_factor)
        totals.predicted += predicted
        chosen = chosen.cpu()
    else:
        scores = (activation_scores(weight, hessian, groups) if score == "activation"
                  else weight_norm_scores(weight, groups))
        chosen = lowest(scores.cpu(), count, parts=parts)
        new_weight = remove_column_groups(weight, groups[chosen].flatten())
    totals.measured += row_losses(new_weight - weight, hessian).sum().item()
    layer.set_weight_(new_weight)
    return chosen


def _remove_heads(block: nn.Module, structure: BlockStructure, counts: StructuredCounts,
                  calls: Sequence[BlockCall], recipe: Recipe, shot: int, seed: int,
                  device: torch.device | None, heads: list[int], kv_heads: list[int],
                  totals: _Totals, target_of=None) -> None:
    widths = structure.widths
    shots = recipe.structured.shots
    if counts.heads_per_group:  # the same number of query heads from every key/value group
        count = (_cumulative(counts.heads_per_group, shot, shots)
                 - len(heads) // widths.num_key_value_heads)
        if count == 0:
            return
        alive = [h for h in range(widths.num_attention_heads) if h not in heads]
        position = {head: index for index, head in enumerate(alive)}
        parts = torch.tensor([[position[h] for h in structure.kv_group_heads(g) if h in position]
                              for g in range(widths.num_key_value_heads)])
        chosen = _remove_units(block, structure.o, calls, structure.head_columns(alive), count,
                               parts, recipe, seed, device, totals, target_of)
        new_heads, new_kv = [alive[i] for i in chosen.tolist()], []
    else:  # whole key/value groups with every query head that reads them
        count = _cumulative(counts.kv_heads, shot, shots) - len(kv_heads)
        if count == 0:
            return
        alive = [g for g in range(widths.num_key_value_heads) if g not in kv_heads]
        groups = torch.stack([structure.head_columns(structure.kv_group_heads(g)).flatten()
                              for g in alive])
        chosen = _remove_units(block, structure.o, calls, groups, count, None, recipe, seed,
                               device, totals, target_of)
        new_kv = [alive[i] for i in chosen.tolist()]
        new_heads = [h for g in new_kv for h in structure.kv_group_heads(g)]
    zero_heads_(structure, new_heads, new_kv)
    heads.extend(new_heads)
    kv_heads.extend(new_kv)


def remove_block_structure(block: nn.Module, block_plan: BlockPlan, counts: StructuredCounts,
                           calls: Sequence[BlockCall], recipe: Recipe,
                           device: torch.device | None,
                           reference: DenseReference | None = None) -> StructureStats:
    """Take ``counts`` heads and MLP channels out of ``block`` (``block_plan``'s module, on
    the compute device) in ``recipe.structured.shots`` steps; returns what went and its losses.

    ``reference``: the dense model's stream (``structured.reference: dense``, score obs): the
    block is first run dense on it, then ``o_proj`` is fitted to the dense ``h + o_proj(...)``
    and ``down_proj`` to the dense block output, from the pruned stream's inputs (so each
    also undoes what earlier blocks' removals changed), in every shot, also where no unit of
    it goes (a recipe removing heads only still fits ``down_proj``), and the stream is
    advanced."""
    structure = block_plan.structure
    settings = recipe.structured
    start = time.perf_counter()
    heads: list[int] = []
    kv_heads: list[int] = []
    channels: list[int] = []
    totals = _Totals()
    o_target = down_target = None
    if reference is not None:
        reference.run_dense_(block, structure, calls)

        def o_target(index, layer_output, _block_output):
            # o_proj's output lands on the block input h: its target is dense (h + o) - h
            return (reference.after_attention[index]
                    - calls[index].hidden_states.to(layer_output.device))

        def down_target(index, layer_output, block_output):
            # down_proj's lands on h + attention = (current output - its own output)
            return reference.outputs[index] - block_output + layer_output
    for shot in range(settings.shots):
        seed = recipe.curvature.seed + 1000 * block_plan.index + shot
        try:
            if counts.heads:
                _remove_heads(block, structure, counts, calls, recipe, shot, seed, device, heads,
                              kv_heads, totals, o_target)
            elif reference is not None:  # nothing to remove: o_proj still fits the dense stream
                _remove_units(block, structure.o, calls,
                              structure.head_columns(range(structure.widths.num_attention_heads)),
                              0, None, recipe, seed, device, totals, o_target)
            count = _cumulative(counts.mlp_channels, shot, settings.shots) - len(channels)
            if count or reference is not None:  # count 0: down_proj only fits the dense stream
                alive = [j for j in range(structure.widths.intermediate_size)
                         if j not in set(channels)]
                chosen = _remove_units(block, structure.down, calls,
                                       torch.tensor(alive)[:, None], count, None, recipe,
                                       seed, device, totals, down_target)
                new = [alive[i] for i in chosen.tolist()]
                zero_mlp_channels_(structure, new)
                channels.extend(new)
        except ObsCompressError as exc:
            raise type(exc)(f"block {block_plan.name}: {exc}") from exc
    if reference is not None:
        reference.advance_()
    return StructureStats(
        block=block_plan.index, name=block_plan.name, score=settings.score,
        curvature=recipe.curvature.kind, shots=settings.shots,
        mlp_width=structure.widths.intermediate_size, mlp_channels=tuple(sorted(channels)),
        n_heads=structure.widths.num_attention_heads, heads=tuple(sorted(heads)),
        kv_heads=tuple(sorted(kv_heads)),
        predicted_loss=totals.predicted if settings.score == "obs" else None,
        reconstruction_loss=totals.measured,
        dampening_frac=max(totals.dampening) if totals.dampening else None,
        seconds=time.perf_counter() - start)


def shrink_pruned_model_(model: nn.Module, plan: PrunePlan,
                         stats: Sequence[StructureStats]) -> tuple[int, int]:
    """Drop what :func:`remove_block_structure` masked from ``model`` (in place) and update
    its config; returns the parameter counts before and after."""
    before = sum(p.numel() for p in model.parameters())
    shrink_model_(model, [block.structure for block in plan.blocks],
                  [s.removal for s in stats])
    return before, sum(p.numel() for p in model.parameters())


__all__ = ["remove_block_structure", "shrink_pruned_model_"]
