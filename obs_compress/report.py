"""What a run reports: per-layer statistics, per-block results, and the run's summary.

Losses are increases of ``E = ||(W' - W) X^T||^2 / n`` on the calibration inputs the layer
saw (``X: (n, d_in)``, ``n`` = the calibration tokens, ``LayerStats.n_tokens``): the squared
error of the layer's output summed over its ``d_out`` output rows, averaged over the tokens
(per token, summed over rows; the square of the activations' unit). With ``H = 2 X^T X / n``
it is ``sum over rows r of dW_r H dW_r^T / 2``. ``predicted_loss`` is the solver's own
prediction (the sum of ``PruneResult.loss``, under the damped ``H`` it used);
``reconstruction_loss`` is measured with the undamped ``H``. They differ only by the
dampening, and only for the OBS solvers without refit: with refit, and for magnitude and
OBD, the prediction is the loss measured with ``H`` (with the damped one on the recursive
inverse path, which keeps no undamped ``H`` to measure by).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from torch import nn

from .model.structure import BlockRemoval
from .recipe import Recipe

# What the loss figures of a report are, in its JSON ("loss_units") and under its table.
LOSS_UNITS = ("increase of E = ||(W' - W) X^T||^2 / n on the calibration data, n = calibration "
              "tokens: the squared output error per token, summed over the layer's output rows; "
              "predicted_loss under the damped H the solver used (the measured value for "
              "magnitude, OBD and refit), reconstruction_loss measured with the undamped H")


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
    # The dampening the layer's inverse was taken with (None: no inverse, magnitude or OBD),
    # and the recipe's: they differ where the Cholesky step had to raise it.
    dampening_frac: float | None = None
    requested_dampening_frac: float | None = None

    @property
    def dampening_raised(self) -> bool:
        return (self.dampening_frac is not None and self.requested_dampening_frac is not None
                and self.dampening_frac != self.requested_dampening_frac)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        data["dampening_raised"] = self.dampening_raised
        return data


@dataclass
class StructureStats:
    """What structured removal took out of one block (indices into the original widths)."""

    block: int
    name: str
    score: str  # obs | activation | weight_norm
    curvature: str  # hessian | kronecker (the obs saliency's)
    shots: int
    mlp_width: int
    mlp_channels: tuple[int, ...]  # removed
    n_heads: int
    heads: tuple[int, ...]  # query heads removed
    kv_heads: tuple[int, ...]  # key/value heads removed
    # The joint group OBS prediction under the damped H (obs only), and the increase of
    # ||(W' - W) X^T||^2 / n measured with the undamped H, summed over o_proj and down_proj
    # (each shot with the inputs of that shot).
    predicted_loss: float | None
    reconstruction_loss: float
    dampening_frac: float | None  # the largest a shot's inverse was taken with (obs)
    seconds: float

    @property
    def removal(self) -> BlockRemoval:
        return BlockRemoval(block=self.block, mlp_channels=self.mlp_channels, heads=self.heads,
                            kv_heads=self.kv_heads)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("mlp_channels", "heads", "kv_heads"):
            data[key] = list(data[key])
        return data

    def describe(self) -> str:
        parts = []
        if self.mlp_channels:
            parts.append(f"{len(self.mlp_channels)} of {self.mlp_width} MLP channels")
        if self.heads:
            kv = f" ({len(self.kv_heads)} key/value)" if self.kv_heads else ""
            parts.append(f"query heads {list(self.heads)} of {self.n_heads}{kv}")
        return (f"removed {', '.join(parts)} by {self.score}"
                + (f" ({self.curvature})" if self.score == "obs" else "")
                + f", measured dE {self.reconstruction_loss:.4g}")


@dataclass
class BlockResult:
    """One pruned block, yielded as soon as it is done (its weights already pruned in place)."""

    index: int
    name: str
    module: nn.Module
    layers: list[LayerStats]
    seconds: float  # since the previous block was yielded (block 0: capture and OWL included)
    # The hidden states the block produced, one tensor per batch (the next block's inputs);
    # None without calibration data. Not part of the report.
    outputs: list | None = field(default=None, repr=False)
    structure: StructureStats | None = None  # structured removal: what the block lost

    def describe(self, n_blocks: int) -> str:
        """One log line: the block, its sparsity and losses, its time."""
        if self.structure is not None:
            return (f"block {self.index + 1}/{n_blocks} {self.name}: "
                    f"{self.structure.describe()}, {self.seconds:.1f} s")
        if not self.layers:
            return (f"block {self.index + 1}/{n_blocks} {self.name}: no target layers, "
                    f"{self.seconds:.1f} s")
        size = sum(s.shape[0] * s.shape[1] for s in self.layers)
        pruned = sum(s.n_pruned for s in self.layers)
        losses = ""
        if all(s.predicted_loss is not None for s in self.layers):
            losses = (f", predicted loss {sum(s.predicted_loss for s in self.layers):.4g}, "
                      f"measured {sum(s.reconstruction_loss for s in self.layers):.4g}")
        return (f"block {self.index + 1}/{n_blocks} {self.name}: {len(self.layers)} layers, "
                f"sparsity {pruned / size:.4f}{losses}, {self.seconds:.1f} s")


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
    # Perplexity before and after pruning, per evaluation set (prune --eval):
    # {"wikitext2": {"before": 24.1, "after": 44.7, "n_tokens": 40920}}
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)
    # How the weights were read: "in-memory" (the whole model loaded) or "streaming" (one
    # block at a time from the safetensors files), and why when not the default.
    path: str = "in-memory"
    resumed_at_block: int | None = None  # a resumed run: the first block it pruned itself
    world_size: int = 1  # processes that pruned together (torch.distributed), rank 0 wrote
    # Where the calibration activations were held between blocks (device, cpu, disk; why).
    activations: str = "device"
    # Structured removal: what each block lost, and the model's parameters before and after
    # the rows and columns were dropped (None until the model is shrunk).
    structure: list[StructureStats] = field(default_factory=list)
    parameters: dict[str, int] | None = None

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
            "perplexity": self.perplexity,
            "path": self.path,
            "resumed_at_block": self.resumed_at_block,
            "world_size": self.world_size,
            "activations": self.activations,
            "dampening_raised": [s.name for s in self.raised_dampening],
            "structure": [s.to_dict() for s in self.structure],
            "parameters": self.parameters,
            "loss_units": LOSS_UNITS,
            "layers": [s.to_dict() for s in self.layers],
        }

    @property
    def raised_dampening(self) -> list[LayerStats]:
        """The layers whose dampening the Cholesky step raised above the recipe's."""
        return [s for s in self.layers if s.dampening_raised]

    def table(self) -> str:
        """The per-layer summary as an aligned text table (per block for structured removal)."""
        if self.structure:
            return self._structure_table()
        width = max([len("layer")] + [len(s.name) for s in self.layers])
        header = (f"{'layer':<{width}}  {'shape':>11}  {'pattern':>12}  {'sparsity':>8}  "
                  f"{'predicted dE':>12}  {'measured dE':>12}  {'dampening':>10}  "
                  f"{'seconds':>7}")
        lines = [header, "-" * len(header)]
        if any(s.predicted_loss is not None for s in self.layers):
            lines.insert(0, "dE: increase of ||(W' - W) X^T||^2 / n, the squared output error "
                            "per calibration token, summed over the layer's output rows")
        for s in self.layers:
            shape = f"{s.shape[0]}x{s.shape[1]}"
            lines.append(f"{s.name:<{width}}  {shape:>11}  {s.pattern:>12}  {s.sparsity:>8.4f}  "
                         f"{_loss_text(s.predicted_loss):>12}  "
                         f"{_loss_text(s.reconstruction_loss):>12}  "
                         f"{_dampening_text(s):>10}  {s.seconds:>7.2f}")
        lines.append("-" * len(header))
        lines.append(f"{len(self.layers)} layers in {self.n_blocks} blocks: global sparsity "
                     f"{self.global_sparsity:.4f} ({self.pruned:,} of {self.total:,} weights), "
                     f"{self.seconds:.1f} s ({self.path}"
                     + (f", {self.world_size} processes" if self.world_size > 1 else "") + ")")
        raised = self.raised_dampening
        if raised:
            count = f"{len(raised)} layer{'s' if len(raised) != 1 else ''}"
            lines.append(f"* dampening_frac raised above the recipe's for {count} "
                         "(the Cholesky factorization failed with it): "
                         + ", ".join(f"{s.name} {s.requested_dampening_frac:g} -> "
                                     f"{s.dampening_frac:g}" for s in raised))
        for name, figures in self.perplexity.items():
            lines.append(f"{name} perplexity: {figures['before']:.4f} before pruning, "
                         f"{figures['after']:.4f} after ({int(figures['n_tokens']):,} tokens)")
        return "\n".join(lines)


    def _structure_table(self) -> str:
        width = max(len("block"), *(len(s.name) for s in self.structure))
        header = (f"{'block':<{width}}  {'MLP channels':>13}  {'query heads':>11}  "
                  f"{'kv heads':>8}  {'predicted dE':>12}  {'measured dE':>12}  "
                  f"{'dampening':>9}  {'seconds':>7}")
        lines = ["structured removal; dE: increase of ||(W' - W) X^T||^2 / n of o_proj and "
                 "down_proj, per calibration token", header, "-" * len(header)]
        for s in self.structure:
            dampening = "-" if s.dampening_frac is None else f"{s.dampening_frac:g}"
            lines.append(f"{s.name:<{width}}  {f'-{len(s.mlp_channels)}/{s.mlp_width}':>13}  "
                         f"{f'-{len(s.heads)}/{s.n_heads}':>11}  {f'-{len(s.kv_heads)}':>8}  "
                         f"{_loss_text(s.predicted_loss):>12}  "
                         f"{_loss_text(s.reconstruction_loss):>12}  {dampening:>9}  "
                         f"{s.seconds:>7.2f}")
        lines.append("-" * len(header))
        first = self.structure[0]
        how = f"{first.score}" + (f" ({first.curvature} curvature)" if first.score == "obs" else
                                  ", no compensation")
        lines.append(f"{len(self.structure)} blocks, each lost {len(first.mlp_channels)} MLP "
                     f"channels and {len(first.heads)} query heads "
                     f"({len(first.kv_heads)} key/value) by {how} in {first.shots} shot"
                     f"{'s' if first.shots != 1 else ''}, {self.seconds:.1f} s ({self.path})")
        if self.parameters:
            before, after = self.parameters["before"], self.parameters["after"]
            lines.append(f"parameters {before:,} -> {after:,} ({after / before:.4f} of dense); "
                         "the rows and columns are dropped: a smaller dense model")
        for name, figures in self.perplexity.items():
            lines.append(f"{name} perplexity: {figures['before']:.4f} before pruning, "
                         f"{figures['after']:.4f} after ({int(figures['n_tokens']):,} tokens)")
        return "\n".join(lines)


def _loss_text(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4g}"


def _dampening_text(stats: LayerStats) -> str:
    """The dampening a layer was solved with; ``*`` where it was raised; ``-``: no inverse."""
    if stats.dampening_frac is None:
        return "-"
    return f"{stats.dampening_frac:g}" + ("*" if stats.dampening_raised else "")


def summarize(results: Sequence[BlockResult], *, n_samples: int, seq_len: int, seconds: float,
              recipe: Recipe | None = None, model: str = "") -> PruneReport:
    return PruneReport(layers=[s for r in results for s in r.layers], n_blocks=len(results),
                       n_samples=n_samples, seq_len=seq_len, seconds=seconds,
                       recipe=recipe.to_dict() if recipe is not None else {}, model=model,
                       structure=[r.structure for r in results if r.structure is not None])


__all__ = ["LOSS_UNITS", "BlockResult", "LayerStats", "PruneReport", "StructureStats",
           "summarize"]
