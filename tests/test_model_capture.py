"""Capturing block 0's inputs reproduces the model's own forward, block after block."""

from __future__ import annotations

import pytest
import torch

from _tiny_models import hook_snapshot, no_hooks, tiny_model
from obs_compress.errors import UnsupportedModel
from obs_compress.model.blocks import find_block_stack
from obs_compress.model.capture import block_output_hidden_states, capture_block_inputs


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_blocks_rerun_from_captured_inputs_match_the_model(family):
    model = tiny_model(family, layers=3)
    stack = find_block_stack(model)
    input_ids = torch.randint(4, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    batches = list(input_ids.split(2))
    with torch.no_grad():
        reference = [model(input_ids=b, output_hidden_states=True).hidden_states for b in batches]
        before = hook_snapshot(model)
        calls = capture_block_inputs(model, stack, batches)
    assert hook_snapshot(model) == before
    assert len(calls) == 2
    with torch.no_grad():
        for call, hidden_states in zip(calls, reference):
            torch.testing.assert_close(call.hidden_states, hidden_states[0])
            current = call.hidden_states
            # The last entry of hidden_states may come after a final norm: compare the others.
            for index, block in enumerate(stack.modules[:-1]):
                current = call(block, current)
                torch.testing.assert_close(current, hidden_states[index + 1])


def test_capture_disables_the_cache():
    model = tiny_model("llama")
    stack = find_block_stack(model)
    with torch.no_grad():
        calls = capture_block_inputs(model, stack, [torch.randint(4, 128, (1, 8))])
    kwargs = calls[0].kwargs
    assert kwargs.get("past_key_values") is None and kwargs.get("use_cache") in (None, False)


def test_hook_is_removed_when_the_forward_fails():
    model = tiny_model("llama")
    stack = find_block_stack(model)
    with pytest.raises(IndexError):
        capture_block_inputs(model, stack, [torch.full((1, 8), 10_000)])  # outside the vocab
    assert no_hooks(model)


def test_block_output_forms():
    hidden = torch.zeros(1, 2, 3)
    assert block_output_hidden_states(hidden) is hidden
    assert block_output_hidden_states((hidden, None)) is hidden
    with pytest.raises(UnsupportedModel):
        block_output_hidden_states({"x": hidden})
