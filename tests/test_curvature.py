"""The output-gradient factor G (obs_compress/curvature.py) against independent autograd
computations on the tiny Llama and GPT-2: the gradient with respect to an added zero
``delta`` on the layer's output (no hooks), the exact Gauss-Newton ``J^T J`` from the
Jacobian, and the summed next-token loss of the whole model."""

from __future__ import annotations

import pytest
import torch

from _tiny_models import tiny_model
from obs_compress.curvature import (block_output_factors, model_output_factors,
                                    next_token_loss)
from obs_compress.errors import InvalidArgument
from obs_compress.model.blocks import find_block_stack, find_layers
from obs_compress.model.capture import capture_block_inputs


def setup(family, n_samples=3, seq_len=12, seed=0):
    model = tiny_model(family)
    stack = find_block_stack(model)
    ids = torch.randint(4, 128, (n_samples, seq_len), generator=torch.Generator().manual_seed(seed))
    calls = capture_block_inputs(model, stack, ids.split(2))
    layers = find_layers(stack.modules[0], stack.block_name(0))
    return model, stack, ids, calls, layers


def with_delta(module, delta):
    """The module's output plus ``delta``: a hook-free handle on dL/dY."""
    return module.register_forward_hook(lambda _m, _a, output: output + delta)


def reference_block_factor(block, calls, layer, probes):
    """sum_t g_t g_t^T / n with g = d(eps . y)/d(delta) for the same probes."""
    total, tokens = 0, 0
    for call, eps_list in zip(calls, probes):
        for eps in eps_list:
            d_out = layer.shape[0]
            delta = torch.zeros(*call.hidden_states.shape[:-1], d_out, requires_grad=True)
            handle = with_delta(layer.module, delta)
            try:
                with torch.enable_grad():
                    output = call(block)
                    (grad,) = torch.autograd.grad((output * eps).sum(), delta)
            finally:
                handle.remove()
            g = grad.reshape(-1, d_out).double()
            total = total + g.T @ g
            tokens += g.shape[0]
    return (total / tokens).float()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_block_factor_equals_the_gradient_of_the_same_probes(family):
    model, stack, _, calls, layers = setup(family)
    block = stack.modules[0]
    factors = block_output_factors(block, calls, layers, n_probes=2, seed=3)
    generator = torch.Generator().manual_seed(3)
    probes = [[torch.randn(call(block).shape, generator=generator) for _ in range(2)]
              for call in calls]
    for layer in layers:
        # the probes are drawn in call order, n_probes per call: regenerate them likewise
        expected = reference_block_factor(block, calls, layer, probes)
        torch.testing.assert_close(factors[layer.name], expected, rtol=1e-4, atol=1e-6)
        assert factors[layer.name].shape == (layer.shape[0],) * 2
    assert all(p.grad is None for p in block.parameters())


def test_block_factor_converges_to_the_gauss_newton_matrix():
    """E[g g^T] over Gaussian probes is J^T J (J from torch.autograd.functional.jacobian)."""
    model, stack, _, calls, layers = setup("llama", n_samples=1, seq_len=4)
    block, call = stack.modules[0], calls[:1]
    layer = next(l for l in layers if l.name.endswith("mlp.up_proj"))
    d_out = layer.shape[0]
    shape = (*call[0].hidden_states.shape[:-1], d_out)

    def block_of_delta(delta):
        handle = with_delta(layer.module, delta)
        try:
            return call[0](block)
        finally:
            handle.remove()

    jacobian = torch.autograd.functional.jacobian(block_of_delta, torch.zeros(shape))
    j = jacobian.reshape(-1, shape[1], d_out).double()  # (outputs, tokens, d_out)
    exact = torch.einsum("otd,ote->de", j, j) / shape[1]
    sampled = block_output_factors(block, call, [layer], n_probes=1500, seed=0)[layer.name]
    error = (sampled.double() - exact).norm() / exact.norm()
    assert error < 0.15, float(error)  # Monte Carlo error of 1500 probes: 0.10 here


@pytest.mark.parametrize("loss", ["next_token", "next_token_sampled"])
def test_model_factor_equals_the_gradient_of_the_summed_next_token_loss(loss):
    model, stack, ids, _, _ = setup("llama")
    layers = [l for index, block in enumerate(stack.modules)
              for l in find_layers(block, stack.block_name(index))
              if l.name.endswith(("mlp.down_proj", "self_attn.q_proj"))]
    factors = model_output_factors(model, stack, ids, layers, loss=loss, seed=5)
    generator = torch.Generator().manual_seed(5)
    sums = {l.name: 0 for l in layers}
    tokens = 0
    for sample in ids.split(1):
        deltas = {l.name: torch.zeros(*sample.shape, l.shape[0], requires_grad=True)
                  for l in layers}
        handles = [with_delta(l.module, deltas[l.name]) for l in layers]
        try:
            with torch.enable_grad():
                logits = model(input_ids=sample, use_cache=False).logits
                value = next_token_loss(logits, sample, sampled=loss == "next_token_sampled",
                                        generator=generator)
                grads = torch.autograd.grad(value, list(deltas.values()))
        finally:
            for handle in handles:
                handle.remove()
        for l, grad in zip(layers, grads):
            g = grad.reshape(-1, l.shape[0]).double()
            sums[l.name] = sums[l.name] + g.T @ g
        tokens += sample.numel()
    for l in layers:
        torch.testing.assert_close(factors[l.name], (sums[l.name] / tokens).float(),
                                   rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_refusals():
    model, stack, ids, calls, layers = setup("llama")
    with pytest.raises(InvalidArgument, match="n_probes must be >= 1"):
        block_output_factors(stack.modules[0], calls, layers, n_probes=0)
    with pytest.raises(InvalidArgument, match="takes loss next_token or next_token_sampled"):
        model_output_factors(model, stack, ids, layers, loss="block_reconstruction")
    with pytest.raises(InvalidArgument, match="at least one layer"):
        block_output_factors(stack.modules[0], calls, [])
