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


# ----------------------------------------------- Kronecker curvature in the solvers


def test_row_weights_of_g():
    from obs_compress.math.kronecker import kronecker_row_weights

    torch.testing.assert_close(kronecker_row_weights(torch.eye(6), 0.01), torch.ones(6))
    diagonal = torch.tensor([1.0, 2.0, 4.0, 8.0])
    weights = kronecker_row_weights(torch.diag(diagonal), 0.0)  # 1/[G^-1]_ii = G_ii
    torch.testing.assert_close(weights, diagonal / diagonal.mean())
    full = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    full = full @ full.T + torch.eye(5)
    expected = 1 / torch.diagonal(torch.linalg.inv(full.double()))
    torch.testing.assert_close(kronecker_row_weights(full, 0.0).double(),
                               expected / expected.mean())


def _layer_problem(seed=0, d_out=12, d_in=32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(200, d_in, generator=generator)
    return torch.randn(d_out, d_in, generator=generator), 2 * x.T @ x / 200


def _bytes(tensor):
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("method", ["obd", "obs_exact", "obs_blockwise"])
@pytest.mark.parametrize("allocation", ["layer", "row"])
def test_g_identity_is_the_layer_wise_method_exactly(method, allocation):
    from obs_compress.algorithms import prune_weight
    from obs_compress.math.kronecker import kronecker_row_weights

    weight, hessian = _layer_problem()
    kwargs = dict(method=method, sparsity=0.5, allocation=allocation, block_size=16)
    plain = prune_weight(weight, hessian, **kwargs)
    kron = prune_weight(weight, hessian, row_weights=kronecker_row_weights(torch.eye(12), 0.01),
                        **kwargs)
    assert _bytes(plain.weight) == _bytes(kron.weight) and torch.equal(plain.mask, kron.mask)


@pytest.mark.parametrize("method", ["obd", "obs_blockwise"])
def test_row_weights_move_the_layer_allocation_toward_heavy_rows(method):
    from obs_compress.algorithms import prune_weight

    weight, hessian = _layer_problem()
    weight = weight[:1].repeat(12, 1)  # identical rows: only the row weights tell them apart
    row_weights = torch.ones(12)
    row_weights[:6] = 10.0
    result = prune_weight(weight, hessian, method=method, sparsity=0.5, allocation="layer",
                          block_size=16, row_weights=row_weights)
    pruned = result.mask.sum(dim=1)
    assert int(pruned.sum()) == 12 * 16
    assert pruned[:6].max() < pruned[6:].min()  # the heavy rows keep more
    plain = prune_weight(weight, hessian, method=method, sparsity=0.5, allocation="layer",
                         block_size=16).mask.sum(dim=1)
    assert abs(int(plain[:6].sum()) - int(plain[6:].sum())) <= 6  # without: about even


@pytest.mark.parametrize("method", ["obd", "obs_exact", "obs_blockwise"])
@pytest.mark.parametrize("pattern, allocation", [("2:4", "layer"), ("unstructured", "row")])
def test_row_weights_leave_each_rows_own_choice_unchanged(method, pattern, allocation):
    # N:M and allocation row choose within each row, so a row factor cannot move them:
    # the Kronecker 2:4 result is the layer-wise one, byte for byte
    from obs_compress.algorithms import prune_weight

    weight, hessian = _layer_problem()
    row_weights = torch.linspace(0.1, 10.0, 12)
    kwargs = dict(method=method, sparsity=0.5, pattern=pattern, allocation=allocation,
                  block_size=16)
    plain = prune_weight(weight, hessian, **kwargs)
    weighted = prune_weight(weight, hessian, row_weights=row_weights, **kwargs)
    assert _bytes(plain.weight) == _bytes(weighted.weight)
    assert torch.equal(plain.mask, weighted.mask)


def test_row_weights_refusals():
    from obs_compress.algorithms import prune_weight

    weight, hessian = _layer_problem()
    with pytest.raises(InvalidArgument, match="magnitude reads the weights alone"):
        prune_weight(weight, hessian, method="magnitude", sparsity=0.5,
                     row_weights=torch.ones(12))
    with pytest.raises(InvalidArgument, match="row_weights must be 12 finite positive"):
        prune_weight(weight, hessian, method="obd", sparsity=0.5, row_weights=torch.zeros(12))


@pytest.mark.parametrize("loss", ["block_reconstruction", "next_token"])
def test_a_kronecker_recipe_runs_and_moves_the_allocation(loss):
    from obs_compress.api import oneshot

    ids = torch.randint(4, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    recipe = {"method": "obs_blockwise", "sparsity": 0.5, "block_size": 32,
              "curvature": {"kind": "kronecker", "loss": loss}}
    masks = {}
    for kind in ("hessian", "kronecker"):
        model = tiny_model("llama")
        report = oneshot(model, {**recipe, "curvature": {**recipe["curvature"], "kind": kind}},
                         ids, progress=False)
        assert report.recipe["curvature"]["kind"] == kind
        assert abs(report.global_sparsity - 0.5) < 1e-3
        masks[kind] = {name: p == 0 for name, p in model.named_parameters() if "proj" in name}
    changed = sum(int((masks["hessian"][n] != masks["kronecker"][n]).sum()) for n in masks["hessian"])
    assert changed > 0


def test_kronecker_recipe_refusals(tmp_path):
    from obs_compress.errors import RecipeError
    from obs_compress.recipe import load_recipe
    from obs_compress.stream import streaming_refusal

    with pytest.raises(RecipeError, match="method magnitude reads the weights alone"):
        load_recipe({"method": "magnitude", "curvature": {"kind": "kronecker"}})
    with pytest.raises(RecipeError, match="curvature"):
        load_recipe({"curvature": {"kind": "fisher"}})
    recipe = load_recipe({"curvature": {"kind": "kronecker", "loss": "next_token"}})
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "whole model" in streaming_refusal(tmp_path, recipe, None, ())
