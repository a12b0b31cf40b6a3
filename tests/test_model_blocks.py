"""Block stack and prunable layers of Llama, GPT-2 (Conv1D), BERT and MiniLM, no per-family code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _tiny_models import minilm_folder, tiny_model
from obs_compress.errors import UnsupportedModel
from obs_compress.model.blocks import find_block_stack, find_layers


@pytest.mark.parametrize("family, stack_name, names", [
    ("llama", "model.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                               "mlp.down_proj"]),
    ("gpt2", "transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    ("bert", "encoder.layer", ["attention.self.query", "attention.self.key",
                               "attention.self.value", "attention.output.dense",
                               "intermediate.dense", "output.dense"]),
])
def test_stack_and_layers(family, stack_name, names):
    model = tiny_model(family, layers=3)
    stack = find_block_stack(model)
    assert stack.name == stack_name and len(stack) == 3
    layers = find_layers(stack.modules[1], stack.block_name(1))
    assert [layer.name for layer in layers] == [f"{stack_name}.1.{n}" for n in names]
    for layer in layers:
        assert model.get_submodule(layer.name) is layer.module


def test_conv1d_is_seen_as_d_out_by_d_in():
    model = tiny_model("gpt2")
    stack = find_block_stack(model)
    layer = find_layers(stack.modules[0], stack.block_name(0))[0]  # attn.c_attn: 64 -> 192
    assert layer.transposed and layer.shape == (192, 64) and layer.d_in == 64
    assert tuple(layer.module.weight.shape) == (64, 192)
    x = torch.randn(5, 64)
    weight = layer.weight_matrix()
    torch.testing.assert_close(layer.module(x), x @ weight.T + layer.module.bias)
    parameter = layer.module.weight
    new = torch.randn(192, 64)
    layer.set_weight_(new)
    assert layer.module.weight is parameter  # same Parameter object, updated in place
    torch.testing.assert_close(layer.weight_matrix(), new, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        layer.set_weight_(torch.randn(64, 192))


def test_linear_weight_matrix_is_a_view():
    model = tiny_model("llama")
    stack = find_block_stack(model)
    layer = find_layers(stack.modules[0], stack.block_name(0))[0]
    assert not layer.transposed
    assert layer.weight_matrix().data_ptr() == layer.module.weight.data_ptr()


def test_lm_head_and_embeddings_are_never_candidates():
    model = tiny_model("llama")
    stack = find_block_stack(model)
    names = {layer.name for i, block in enumerate(stack.modules)
             for layer in find_layers(block, stack.block_name(i))}
    assert "lm_head" not in names and all(n.startswith("model.layers.") for n in names)


def test_no_block_stack_is_a_clear_error():
    with pytest.raises(UnsupportedModel, match="no block stack"):
        find_block_stack(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_nested_lists_lose_to_the_outer_stack():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
            self.router = nn.Linear(8, 4)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(2))

    stack = find_block_stack(Model())
    assert stack.name == "blocks"


def test_minilm():
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_folder(), use_safetensors=True)
    stack = find_block_stack(model)
    assert stack.name == "encoder.layer" and len(stack) == 6
    assert len(find_layers(stack.modules[0], stack.block_name(0))) == 6
