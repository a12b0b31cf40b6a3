"""Where a block's structured units live, masking them, and shrinking a model without them.

Structured removal (issue 14) takes whole MLP channels and attention heads out of a block:

* an MLP channel ``j`` is row ``j`` of ``gate_proj`` and ``up_proj`` (what produces it) and
  column ``j`` of ``down_proj`` (what reads it);
* a query head ``h`` is rows ``h*head_dim:(h+1)*head_dim`` of ``q_proj`` and those columns of
  ``o_proj``; a key/value head ``g`` is those rows of ``k_proj`` and ``v_proj`` and serves
  the query heads ``g*n_rep:(g+1)*n_rep`` (grouped-query attention, ``n_rep =
  num_attention_heads / num_key_value_heads``), so it goes only with all of them.

While a run is in progress the units are masked (their producing rows zeroed, their columns
in the consumer zeroed by the compensation step), so the model keeps its shapes and every
later block sees exactly what the shrunk model will compute. :func:`shrink_model_` then drops
those rows and columns and updates the config, giving a smaller dense model that stock
``transformers`` loads. The config holds one ``intermediate_size`` and one head count for
every block, so every block must lose the same number of each (Llama, Mistral, Qwen2 and
their kind have no per-layer widths).

This module only finds, zeroes and slices; the linear algebra is
:mod:`obs_compress.math.structured`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import InvalidArgument
from .blocks import PrunableLayer

_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


@dataclass(frozen=True)
class ModelWidths:
    """The widths that structured removal changes, read from the config."""

    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    @property
    def queries_per_kv_head(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class BlockStructure:
    """The layers of one Llama-style block that structured removal reads and changes."""

    name: str  # the block's module name (``model.layers.3``)
    gate: PrunableLayer
    up: PrunableLayer
    down: PrunableLayer
    q: PrunableLayer
    k: PrunableLayer
    v: PrunableLayer
    o: PrunableLayer
    widths: ModelWidths

    def head_columns(self, heads: Sequence[int]) -> torch.Tensor:
        """The ``o_proj`` columns (= ``q_proj`` rows) of query ``heads``: ``(len, head_dim)``."""
        size = self.widths.head_dim
        return torch.stack([torch.arange(h * size, (h + 1) * size) for h in heads])

    def kv_group_heads(self, kv_head: int) -> list[int]:
        """The query heads that read key/value head ``kv_head``."""
        n_rep = self.widths.queries_per_kv_head
        return list(range(kv_head * n_rep, (kv_head + 1) * n_rep))


def model_widths(config) -> ModelWidths:
    """The structured widths of ``config``, refusing an architecture without them."""
    names = ("intermediate_size", "num_attention_heads")
    missing = [name for name in names if not isinstance(getattr(config, name, None), int)]
    if missing:
        raise InvalidArgument(
            f"structured removal needs one {' and one '.join(missing)} in the config for every "
            f"block; {type(config).__name__} ({getattr(config, 'model_type', '?')}) has "
            f"none (supported: Llama-style blocks with mlp.gate_proj/up_proj/down_proj and "
            f"self_attn.q_proj/k_proj/v_proj/o_proj)")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise InvalidArgument(f"num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
    return ModelWidths(intermediate_size=config.intermediate_size, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=head_dim)


def block_structure(block: nn.Module, name: str, widths: ModelWidths) -> BlockStructure:
    """The structured layers of ``block``; refuses a block that is not Llama-style or whose
    shapes disagree with the config (naming what is missing or wrong)."""
    layers = {}
    for path in _MLP + _ATTENTION:
        try:
            module = block.get_submodule(path)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            raise InvalidArgument(
                f"structured removal supports Llama-style blocks (mlp.gate_proj/up_proj/"
                f"down_proj, self_attn.q_proj/k_proj/v_proj/o_proj as nn.Linear); block {name} "
                f"({type(block).__name__}) has no nn.Linear {path}")
        layers[path.split(".")[-1]] = PrunableLayer(f"{name}.{path}", module)
    heads, kv_heads, size = (widths.num_attention_heads, widths.num_key_value_heads,
                             widths.head_dim)
    expected = {"gate_proj": (widths.intermediate_size, None),
                "up_proj": (widths.intermediate_size, None),
                "down_proj": (None, widths.intermediate_size),
                "q_proj": (heads * size, None), "k_proj": (kv_heads * size, None),
                "v_proj": (kv_heads * size, None), "o_proj": (None, heads * size)}
    for key, (rows, cols) in expected.items():
        shape = layers[key].shape
        if (rows is not None and shape[0] != rows) or (cols is not None and shape[1] != cols):
            raise InvalidArgument(
                f"layer {layers[key].name} has shape {shape[0]}x{shape[1]}, which disagrees with "
                f"the config (intermediate_size {widths.intermediate_size}, {heads} heads of "
                f"{size}, {kv_heads} key/value heads): the block widths differ per layer, "
                "which structured removal does not support")
    return BlockStructure(name=name, gate=layers["gate_proj"], up=layers["up_proj"],
                          down=layers["down_proj"], q=layers["q_proj"], k=layers["k_proj"],
                          v=layers["v_proj"], o=layers["o_proj"], widths=widths)


@torch.no_grad()
def _zero_rows_(layer: PrunableLayer, rows: torch.Tensor) -> None:
    layer.module.weight[rows.to(layer.module.weight.device)] = 0
    if layer.module.bias is not None:
        layer.module.bias[rows.to(layer.module.bias.device)] = 0


def zero_mlp_channels_(structure: BlockStructure, channels: Sequence[int]) -> None:
    """Zero the rows of ``gate_proj`` and ``up_proj`` producing ``channels`` (their
    ``down_proj`` columns are set by the removal step)."""
    rows = torch.as_tensor(list(channels), dtype=torch.long)
    for layer in (structure.gate, structure.up):
        _zero_rows_(layer, rows)


def zero_heads_(structure: BlockStructure, heads: Sequence[int], kv_heads: Sequence[int]) -> None:
    """Zero the ``q_proj`` rows of query ``heads`` and the ``k_proj``/``v_proj`` rows of
    ``kv_heads`` (the ``o_proj`` columns are set by the removal step)."""
    if heads:
        _zero_rows_(structure.q, structure.head_columns(heads).flatten())
    if kv_heads:
        rows = structure.head_columns(kv_heads).flatten()
        for layer in (structure.k, structure.v):
            _zero_rows_(layer, rows)


@dataclass(frozen=True)
class BlockRemoval:
    """What one block lost: MLP channels, query heads, key/value heads (indices, sorted)."""

    block: int
    mlp_channels: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    kv_heads: tuple[int, ...] = ()


def _kept(width: int, removed: Sequence[int]) -> torch.Tensor:
    gone = set(removed)
    return torch.tensor([i for i in range(width) if i not in gone], dtype=torch.long)


def _sliced(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        bias = bias.index_select(0, rows.to(bias.device)) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(linear.training)
    return new


def _replace(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(block.get_submodule(parent), leaf, module)


def check_uniform(removals: Sequence[BlockRemoval], n_blocks: int) -> tuple[int, int, int]:
    """The channels, query heads and key/value heads every block lost; refuses removals that
    differ between blocks (the config has one width for all) or miss a block."""
    if len(removals) != n_blocks or sorted(r.block for r in removals) != list(range(n_blocks)):
        raise InvalidArgument(f"structured removals name blocks "
                              f"{sorted(r.block for r in removals)}, the model has {n_blocks}")
    counts = {(len(r.mlp_channels), len(r.heads), len(r.kv_heads)) for r in removals}
    if len(counts) != 1:
        raise InvalidArgument(f"every block must lose the same numbers of MLP channels, heads and "
                              f"key/value heads (the config has one width for all blocks), got "
                              f"{sorted(counts)}")
    return counts.pop()


@torch.no_grad()
def shrink_model_(model: nn.Module, structures: Sequence[BlockStructure],
                  removals: Sequence[BlockRemoval]) -> None:
    """Drop the removed rows and columns from every block of ``model`` and update its config
    (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``; ``head_dim``
    written out, since ``hidden_size / num_attention_heads`` no longer gives it)."""
    n_channels, n_heads, n_kv = check_uniform(removals, len(structures))
    by_block = {removal.block: removal for removal in removals}
    widths = structures[0].widths
    for index, structure in enumerate(structures):
        removal = by_block[index]
        # a key/value head goes only with every query head that reads it
        readers = {h for g in removal.kv_heads for h in structure.kv_group_heads(g)}
        if not readers <= set(removal.heads):
            raise InvalidArgument(f"block {structure.name}: key/value heads "
                                  f"{list(removal.kv_heads)} would go while query heads "
                                  f"{sorted(readers - set(removal.heads))} read them")
        block = model.get_submodule(structure.name)
        channels = _kept(widths.intermediate_size, removal.mlp_channels)
        q_rows = structure.head_columns(
            _kept(widths.num_attention_heads, removal.heads).tolist()).flatten()
        kv_rows = structure.head_columns(
            _kept(widths.num_key_value_heads, removal.kv_heads).tolist()).flatten()
        for path, rows, cols in (("mlp.gate_proj", channels, None), ("mlp.up_proj", channels, None),
                                 ("mlp.down_proj", None, channels),
                                 ("self_attn.q_proj", q_rows, None),
                                 ("self_attn.k_proj", kv_rows, None),
                                 ("self_attn.v_proj", kv_rows, None),
                                 ("self_attn.o_proj", None, q_rows)):
            _replace(block, path, _sliced(block.get_submodule(path), rows, cols))
        attention = block.get_submodule("self_attn")
        kept_heads = widths.num_attention_heads - n_heads
        kept_kv = widths.num_key_value_heads - n_kv
        if kept_heads % kept_kv:
            raise InvalidArgument(f"block {structure.name}: {kept_heads} query heads left for "
                                  f"{kept_kv} key/value heads (not a multiple)")
        # the shrunk model maps query head i to key/value head i // (kept_heads / kept_kv):
        # every kept group must keep the same number of its query heads
        per_group = {len(set(structure.kv_group_heads(g)) - set(removal.heads))
                     for g in range(widths.num_key_value_heads) if g not in removal.kv_heads}
        if per_group != {kept_heads // kept_kv}:
            raise InvalidArgument(f"block {structure.name}: the kept key/value groups keep "
                                  f"{sorted(per_group)} query heads each; grouped-query "
                                  "attention needs the same number in every group")
        if hasattr(attention, "num_key_value_groups"):
            attention.num_key_value_groups = kept_heads // kept_kv
    config = model.config
    config.intermediate_size = widths.intermediate_size - n_channels
    config.num_attention_heads = widths.num_attention_heads - n_heads
    config.num_key_value_heads = widths.num_key_value_heads - n_kv
    config.head_dim = widths.head_dim


__all__ = ["BlockRemoval", "BlockStructure", "ModelWidths", "block_structure", "check_uniform",
           "model_widths", "shrink_model_", "zero_heads_", "zero_mlp_channels_"]
