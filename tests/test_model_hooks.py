"""Input hooks feed accumulators and are always removed; onload/offload keeps parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _tiny_models import no_hooks, tiny_model
from obs_compress.math.hessian import HessianAccumulator
from obs_compress.model.hooks import (accumulate_inputs, on_device, outside_on_device,
                                      until_stopped)


def test_accumulators_see_each_layers_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    accumulators = {"0": HessianAccumulator(6), "2": HessianAccumulator(5)}
    x = torch.randn(4, 7, 6)
    with accumulate_inputs({"0": model[0], "2": model[2]}, accumulators):
        model(x)
    assert no_hooks(model)
    flat = x.reshape(-1, 6)
    hidden = torch.relu(model[0](flat))
    torch.testing.assert_close(accumulators["0"].finalize().hessian, 2 * flat.T @ flat / 28)
    torch.testing.assert_close(accumulators["2"].finalize().hessian, 2 * hidden.T @ hidden / 28)



def test_stop_after_feeds_the_last_input_and_runs_nothing_after_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU())
    ran = []
    model[2].register_forward_hook(lambda *_: ran.append("2"))
    model[3].register_forward_hook(lambda *_: ran.append("3"))
    accumulators = {"0": HessianAccumulator(6), "2": HessianAccumulator(5)}
    x = torch.randn(4, 7, 6)
    with accumulate_inputs({"0": model[0], "2": model[2]}, accumulators, stop_after="2"):
        until_stopped(model, x)
        until_stopped(model, x)
    assert ran == []  # neither the stopping layer nor anything after it ran
    flat = x.reshape(-1, 6)
    hidden = torch.relu(model[0](flat))
    assert accumulators["2"].n_tokens == 56
    torch.testing.assert_close(accumulators["2"].finalize().hessian, 2 * hidden.T @ hidden / 28)
    model(x)  # hooks gone: the whole forward runs again
    assert ran == ["2", "3"]
    with pytest.raises(KeyError, match="stop_after"):
        with accumulate_inputs({"0": model[0]}, accumulators, stop_after="2"):
            pass

def test_hooks_are_removed_on_error():
    model = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(RuntimeError, match="boom"):
        with accumulate_inputs({"0": model[0]}, {"0": HessianAccumulator(6)}):
            raise RuntimeError("boom")
    assert no_hooks(model)
    # An accumulator that raises inside the forward (NaN input) also leaves no hook behind.
    with pytest.raises(ArithmeticError, match="layer 0"):
        with accumulate_inputs({"0": model[0]}, {"0": HessianAccumulator(6, name="0")}):
            model(torch.full((2, 6), float("nan")))
    assert no_hooks(model)


def test_on_device_is_a_no_op_where_the_module_already_is():
    model = tiny_model("llama")
    parameters = {name: p for name, p in model.named_parameters()}
    pointers = {name: p.data_ptr() for name, p in parameters.items()}
    with on_device(model.model.layers[0], "cpu"), outside_on_device(model, model.model.layers,
                                                                    "cpu"):
        pass
    with on_device(model, None):
        pass
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    assert all(parameters[name] is p for name, p in model.named_parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_onload_one_block_and_put_it_back():
    model = tiny_model("llama")
    block = model.model.layers[1]
    parameter = block.mlp.up_proj.weight
    with on_device(block, "cuda"):
        assert parameter.is_cuda and block.mlp.up_proj.weight is parameter
        assert not model.model.layers[0].mlp.up_proj.weight.is_cuda
    assert not parameter.is_cuda and block.mlp.up_proj.weight is parameter
    with outside_on_device(model, model.model.layers, "cuda"):
        assert model.model.embed_tokens.weight.is_cuda and model.lm_head.weight.is_cuda
        assert not block.mlp.up_proj.weight.is_cuda
    assert not model.model.embed_tokens.weight.is_cuda
