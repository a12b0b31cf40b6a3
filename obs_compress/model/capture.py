"""Capture what block 0 receives, then call any block with it.

The model's own forward runs on each calibration batch until it reaches block 0, where a
forward pre-hook (``with_kwargs=True``) records the positional and keyword arguments and
raises a sentinel exception, so nothing after the embeddings runs. Whatever the family
needs arrives that way (attention mask, position ids, rotary ``position_embeddings``,
GPT-2's positional arguments), computed by the model itself: no per-family driver.
Caches are disabled (``use_cache=False`` and any ``Cache`` object replaced by ``None``),
so re-running a block never appends to a key/value cache.

Shapes: ``input_ids: (batch, seq_len)``; hidden states ``(batch, seq_len, hidden)``.

Limitation: every block is called with block 0's keyword arguments. Models that pass a
different mask to different blocks (alternating sliding-window attention, e.g. Gemma-2)
need those per-block arguments and are not handled yet.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import UnsupportedModel
from .blocks import BlockStack
from .hooks import outside_on_device

logger = logging.getLogger(__name__)

try:
    from transformers.cache_utils import Cache as _Cache
except ImportError:  # pragma: no cover
    _Cache = ()


class _ReachedFirstBlock(Exception):
    """Raised by the capture hook to stop the forward at block 0."""


@dataclass
class BlockCall:
    """One batch's call of a block: hidden states plus the other arguments, as given."""

    hidden_states: torch.Tensor  # (batch, seq_len, hidden)
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_key: str | None = None  # None: hidden states are the first positional argument
    # Where the block runs, when the hidden states are held elsewhere (CPU or disk,
    # model/activations.py): they are moved there for each call. None: used where they are.
    device: torch.device | None = None

    def __call__(self, block: nn.Module, hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``block`` on this call's arguments (or on ``hidden_states`` in their place);
        returns the block's output hidden states."""
        hidden = self.hidden_states if hidden_states is None else hidden_states
        if self.device is not None and hidden.device != self.device:
            hidden = hidden.to(self.device, non_blocking=True)
        if self.hidden_key is None:
            output = block(hidden, *self.args, **self.kwargs)
        else:
            output = block(*self.args, **{**self.kwargs, self.hidden_key: hidden})
        return block_output_hidden_states(output)


def block_output_hidden_states(output: Any) -> torch.Tensor:
    """The hidden states in what a block returns: a tensor, or a tuple/ModelOutput led by one."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
        first = output[0]
        if isinstance(first, torch.Tensor):
            return first
    raise UnsupportedModel(f"a block returned {type(output).__name__}, not hidden states "
                           "(a tensor, or a tuple that starts with one)")


def _without_cache(value: Any) -> Any:
    return None if _Cache and isinstance(value, _Cache) else value


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    return _without_cache(value)


def _split_call(args: tuple, kwargs: dict[str, Any]) -> BlockCall:
    kwargs = {key: _detached(value) for key, value in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    if args:
        hidden, rest, key = args[0], tuple(_detached(a) for a in args[1:]), None
    elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
        hidden, rest, key = kwargs.pop("hidden_states"), (), "hidden_states"
    else:
        raise UnsupportedModel("block 0 was called without hidden states as its first "
                               f"positional argument or 'hidden_states' (got {sorted(kwargs)})")
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise UnsupportedModel(f"block 0's first input is {type(hidden).__name__}, not a "
                               "floating-point hidden-state tensor")
    return BlockCall(hidden_states=hidden.detach(), args=rest, kwargs=kwargs, hidden_key=key)


def model_inputs(model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments for ``model(...)`` on a batch of full-length token ids, cache off."""
    inputs: dict[str, Any] = {"input_ids": input_ids}
    parameters = inspect.signature(model.forward).parameters
    if "use_cache" in parameters:
        inputs["use_cache"] = False
    return inputs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, stack: BlockStack, batches: Iterable[torch.Tensor],
                         *, device: torch.device | str | None = None) -> list[BlockCall]:
    """One :class:`BlockCall` per batch of ``input_ids: (batch, seq_len)``: block 0's inputs.

    Only the modules outside the block stack are onloaded to ``device`` meanwhile; the
    returned tensors live on ``device`` (or where the model put them).
    """
    attention_types = {getattr(block, "attention_type", None) for block in stack.modules}
    if len(attention_types) > 1:
        logger.warning("the blocks of %s use different attention types (%s); every block is run "
                       "with block 0's mask, so the blocks of another type see approximate "
                       "calibration inputs", 
                       stack.name, ", ".join(sorted(map(str, attention_types))))
    calls: list[BlockCall] = []

    def stop_at_first_block(_module, args, kwargs):
        calls.append(_split_call(args, kwargs))
        raise _ReachedFirstBlock

    handle = stack.modules[0].register_forward_pre_hook(stop_at_first_block, with_kwargs=True)
    try:
        with outside_on_device(model, stack.modules, device):
            for input_ids in batches:
                if device is not None:
                    input_ids = input_ids.to(device)
                try:
                    model(**model_inputs(model, input_ids))
                except _ReachedFirstBlock:
                    continue
                raise UnsupportedModel(f"{type(model).__name__}'s forward never called block 0 "
                                       f"of {stack.name}; cannot capture its inputs")
    finally:
        handle.remove()
    return calls


__all__ = ["BlockCall", "block_output_hidden_states", "capture_block_inputs", "model_inputs"]
