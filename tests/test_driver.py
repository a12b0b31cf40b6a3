"""The layer loop end to end on tiny Llama, GPT-2 (Conv1D), BERT, and on all-MiniLM-L6-v2."""

from __future__ import annotations

import json

import pytest
import torch

from _tiny_models import hook_snapshot, minilm_folder, no_hooks, tiny_model
from obs_compress import driver
from obs_compress.api import calibration_input_ids, oneshot
from obs_compress.driver import (_execution_groups, _ExecutionOrder, _Feed, _stop_after,
                                 prune_blocks, prune_model, reconstruction_loss)
from obs_compress.errors import (HessianNotPositiveDefinite, InvalidArgument, NonFiniteError,
                                 RecipeError)
from obs_compress.math.hessian import HessianAccumulator, RecursiveInverseAccumulator
from obs_compress.math.inverse import undamped_hessian
from obs_compress.math.masks import prune_count
from obs_compress.model.capture import capture_block_inputs
from obs_compress.plan import build_plan
from obs_compress.recipe import load_recipe

SEQ_LEN = 32


@pytest.fixture
def input_ids():
    return torch.randint(4, 128, (8, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def snapshot(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_pruned_exactly(model, before, report, *, row_wise=False):
    """Each target weight has exactly the requested zeros; every other tensor is bit-identical."""
    targets = {f"{layer.name}.weight": layer for layer in report.layers}
    assert targets
    for name, tensor in model.state_dict().items():
        if name not in targets:
            assert torch.equal(tensor, before[name]), f"{name} was modified"
            continue
        stats = targets[name]
        zeros = int((tensor == 0).sum())
        if stats.pattern != "unstructured":
            n, m = map(int, stats.pattern.split(":"))
            assert zeros == tensor.numel() * (m - n) // m, name
        elif row_wise:
            d_out, d_in = stats.shape
            assert zeros == d_out * prune_count(d_in, stats.target_sparsity), name
        else:
            assert zeros == prune_count(tensor.numel(), stats.target_sparsity), name
        assert stats.n_pruned == zeros


def assert_nm(weight_matrix, n, m):
    groups = (weight_matrix == 0).reshape(weight_matrix.shape[0], -1, m).sum(-1)
    assert bool((groups == m - n).all())


def assert_runs(model, input_ids):
    with torch.no_grad():
        output = model(input_ids=input_ids[:2])
    first = output[0] if isinstance(output, tuple) else (
        output.logits if hasattr(output, "logits") else output.last_hidden_state)
    assert torch.isfinite(first).all()


@pytest.mark.parametrize("family, method", [("llama", "obd"), ("llama", "magnitude"),
                                            ("gpt2", "obd"), ("bert", "magnitude")])
def test_requested_sparsity_on_every_target_and_nothing_else(family, method, input_ids):
    model = tiny_model(family)
    model.train()  # the driver runs in eval mode and gives the flag back
    before = snapshot(model)
    hooks = hook_snapshot(model)
    report = oneshot(model, {"method": method, "sparsity": 0.5}, input_ids, progress=False)
    assert model.training
    assert hook_snapshot(model) == hooks and no_hooks(model)
    expected = {"llama": 14, "gpt2": 8, "bert": 12}[family]
    assert len(report.layers) == expected and report.n_blocks == 2
    assert report.global_sparsity == pytest.approx(0.5, abs=1e-3)
    for stats in report.layers:
        assert stats.method == method and stats.n_tokens == input_ids.numel()
        assert stats.reconstruction_loss >= 0 and stats.seconds >= 0
    assert_pruned_exactly(model, before, report)
    assert_runs(model.eval(), input_ids)


def test_row_allocation(input_ids):
    model = tiny_model("llama")
    before = snapshot(model)
    report = oneshot(model, {"method": "obd", "sparsity": 0.3, "allocation": "row"}, input_ids,
                     progress=False)
    assert_pruned_exactly(model, before, report, row_wise=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_two_of_four_holds_on_every_target(family, input_ids):
    model = tiny_model(family)
    before = snapshot(model)
    method = "obs_blockwise" if family == "gpt2" else "magnitude"
    report = oneshot(model, {"method": method, "pattern": "2:4", "block_size": 32}, input_ids,
                     progress=False)
    assert_pruned_exactly(model, before, report)
    plan = build_plan(model, {"pattern": "2:4"})
    for layer_plan in plan.layers:
        assert_nm(layer_plan.layer.weight_matrix(), 2, 4)  # along d_in, Conv1D included
    assert_runs(model, input_ids)


def test_measured_loss_is_the_output_error_for_conv1d(input_ids):
    """GPT-2's c_attn (a Conv1D, weight stored (d_in, d_out)): the reported loss equals
    ||(W' - W) X^T||^2 / n computed from the layer's real inputs."""
    model = tiny_model("gpt2")
    block = model.transformer.h[0]
    old = block.attn.c_attn.weight.detach().clone()  # (d_in, d_out)
    with torch.no_grad():
        embeddings = model(input_ids=input_ids, output_hidden_states=True).hidden_states[0]
        inputs = block.ln_1(embeddings).reshape(-1, old.shape[0])  # (n, d_in)
    report = oneshot(model, {"method": "magnitude", "sparsity": 0.5}, input_ids,
                     progress=False)
    stats = report.layers[0]
    assert stats.name == "transformer.h.0.attn.c_attn" and stats.shape == (192, 64)
    delta = block.attn.c_attn.weight.detach() - old  # (d_in, d_out)
    direct = ((inputs @ delta) ** 2).sum().item() / inputs.shape[0]
    assert stats.reconstruction_loss == pytest.approx(direct, rel=1e-4)
    assert stats.predicted_loss == pytest.approx(direct, rel=1e-4)  # magnitude: exact loss


def test_reconstruction_loss_from_the_recursive_inverse():
    torch.manual_seed(0)
    inputs = torch.randn(400, 16, dtype=torch.float64)
    delta = torch.randn(5, 16, dtype=torch.float64)
    cholesky = HessianAccumulator(16, dtype=torch.float64)
    recursive = RecursiveInverseAccumulator(16, dampening_frac=0.01, expected_tokens=400)
    cholesky.add_batch(inputs)
    recursive.add_batch(inputs)
    direct = ((inputs @ delta.T) ** 2).sum().item() / 400
    assert reconstruction_loss(delta, undamped_hessian(cholesky.finalize())) == pytest.approx(
        direct, rel=1e-9)
    assert reconstruction_loss(delta, undamped_hessian(recursive.finalize())) == pytest.approx(
        direct, rel=1e-6)


def test_recursive_inverse_recipe(input_ids):
    model = tiny_model("llama")
    before = snapshot(model)
    report = oneshot(model, {"method": "obd", "inverse": "recursive"}, input_ids,
                     progress=False)
    assert_pruned_exactly(model, before, report)


def test_sequential_groups_follow_the_forward():
    model = tiny_model("llama")
    plan = build_plan(model, None)
    stack = plan.stack
    calls = capture_block_inputs(model, stack, [torch.randint(4, 128, (1, 8))])
    order = _execution_groups(stack.modules[0], plan.blocks[0].layers, calls[0])
    names = [[p.layer.name.split(".", 3)[-1] for p in group] for group in order.groups]
    assert names == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                     ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert [name.split(".", 3)[-1] for name in order.reached] == [
        name for group in names for name in group]
    assert order.called_once
    assert no_hooks(model)


@pytest.mark.parametrize("sequential", [False, True])
def test_accumulation_forward_stops_at_the_last_input_it_needs(input_ids, sequential,
                                                               monkeypatch):
    model = tiny_model("llama")
    runs = {"down_proj": 0, "q_proj": 0, "later_q_proj": 0}

    def count(key):
        return lambda *_: runs.__setitem__(key, runs[key] + 1)

    block = model.model.layers[0]
    block.mlp.down_proj.register_forward_hook(count("down_proj"))
    block.self_attn.q_proj.register_forward_hook(count("q_proj"))
    model.model.layers[1].self_attn.q_proj.register_forward_hook(count("later_q_proj"))
    n_batches = 2
    reference = tiny_model("llama")
    report = oneshot(model, {"method": "obs_blockwise", "block_size": 8,
                             "sequential": sequential}, input_ids,
                     batch_size=input_ids.shape[0] // n_batches, progress=False)
    # One probe forward (one batch) and the re-forward run down_proj; the accumulation
    # passes (one, or one per group) stop at its input.
    assert runs["down_proj"] == 1 + n_batches
    assert runs["q_proj"] == 1 + n_batches * (4 if sequential else 2)
    # Block 1, of the same class, reuses block 0's probe.
    assert runs["later_q_proj"] == n_batches * (4 if sequential else 2)
    # The Hessians are those of the full forward: the same result as with no early stop.
    monkeypatch.setattr(driver, "_stop_after", lambda feeds, order: None)
    expected = oneshot(reference, {"method": "obs_blockwise", "block_size": 8,
                                   "sequential": sequential}, input_ids,
                       batch_size=input_ids.shape[0] // n_batches, progress=False)
    assert [s.reconstruction_loss for s in report.layers] == [
        s.reconstruction_loss for s in expected.layers]
    for name, param in model.named_parameters():
        assert torch.equal(param, reference.get_parameter(name)), name


def test_no_early_stop_when_a_target_layer_runs_twice():
    model = tiny_model("llama")
    plan = build_plan(model, None)
    layers = plan.blocks[0].layers
    feeds = [_Feed(accumulator=None, module=p.layer.module, layers=[p]) for p in layers]
    reached = [p.layer.name for p in layers]
    once = _ExecutionOrder(groups=[[p] for p in layers], reached=reached, called_once=True)
    assert _stop_after(feeds, once) == reached[-1]
    twice = _ExecutionOrder(groups=[[p] for p in layers], reached=reached, called_once=False)
    assert _stop_after(feeds, twice) is None
    missing = _ExecutionOrder(groups=[[p] for p in layers], reached=reached[:-1],
                              called_once=True)
    assert _stop_after(feeds, missing) is None


@pytest.mark.parametrize("sequential", [False, True])
def test_a_layer_called_twice_per_forward_feeds_every_call(input_ids, sequential):
    """An MLP run twice per block forward: its layers' Hessians take both calls' tokens (an
    early stop at the first call of the last layer would drop the second)."""
    model = tiny_model("llama")
    for block in model.model.layers:
        block.mlp.forward = lambda x, once=block.mlp.forward: once(x) + once(x)
    report = oneshot(model, {"method": "obd", "sparsity": 0.5, "sequential": sequential},
                     input_ids, progress=False)
    tokens = {stats.name.rsplit(".", 1)[-1]: stats.n_tokens for stats in report.layers}
    assert tokens["q_proj"] == tokens["o_proj"] == input_ids.numel()
    assert tokens["gate_proj"] == tokens["up_proj"] == tokens["down_proj"] \
        == 2 * input_ids.numel()


def test_sequential_pruning_recomputes_inputs(input_ids):
    results = {}
    for sequential in (False, True):
        model = tiny_model("llama")
        before = snapshot(model)
        report = oneshot(model, {"method": "obd", "sequential": sequential}, input_ids,
                         progress=False)
        assert_pruned_exactly(model, before, report)
        results[sequential] = {s.name: s.reconstruction_loss for s in report.layers}
    # Block 0's q/k/v see the same inputs either way; o_proj sees pruned attention outputs.
    assert results[True]["model.layers.0.self_attn.q_proj"] == pytest.approx(
        results[False]["model.layers.0.self_attn.q_proj"])
    assert results[True]["model.layers.0.self_attn.o_proj"] != pytest.approx(
        results[False]["model.layers.0.self_attn.o_proj"])


def test_targets_ignore_and_mixed_overrides(input_ids):
    model = tiny_model("llama")
    before = snapshot(model)
    recipe = load_recipe({"method": "magnitude", "ignore": ["down_proj"],
                          "overrides": [{"targets": [r"\.mlp\."], "pattern": "2:4"}]})
    report = oneshot(model, recipe, input_ids, progress=False)
    names = {s.name for s in report.layers}
    assert len(names) == 12 and not any("down_proj" in n for n in names)
    assert_pruned_exactly(model, before, report)
    patterns = {s.name.split(".")[-1]: s.pattern for s in report.layers}
    assert patterns["up_proj"] == patterns["gate_proj"] == "2:4"
    assert patterns["q_proj"] == "unstructured"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_the_gpu_is_pruned_there_without_a_device_argument(input_ids, monkeypatch):
    import obs_compress.driver as driver
    model = tiny_model("llama").cuda()
    devices = []
    real = driver.prune_weight
    monkeypatch.setattr(driver, "prune_weight",
                        lambda w, c, **k: devices.append(c.hessian.device.type) or real(w, c, **k))
    oneshot(model, {"method": "obs_blockwise", "block_size": 32}, input_ids.cuda(),
            progress=False)
    assert devices and set(devices) == {"cuda"}


def test_owl_block_sparsity_matches_an_independent_computation(input_ids):
    """Block sparsities from outlier fractions computed here with plain forward hooks on the
    dense model; the total is kept, and the 2:4 layers are not moved."""
    from obs_compress.math.block_sparsity import owl_sparsities
    model = tiny_model("llama", layers=4)
    before = snapshot(model)
    owl = {"method": "owl", "spread": 0.1, "outlier_threshold": 2.0, "n_samples": 4}
    recipe = {"method": "magnitude", "sparsity": 0.5, "block_sparsity": owl,
              "overrides": [{"targets": ["down_proj"], "pattern": "2:4"}]}

    inputs: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(
        lambda m, args, out, name=name: inputs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1])))
        for name, module in model.named_modules() if name.endswith("proj") and "down" not in name]
    with torch.no_grad():
        model(input_ids=input_ids[:4])
    for handle in handles:
        handle.remove()
    fractions, sizes = [], []
    for block in range(4):
        names = [n for n in inputs if n.startswith(f"model.layers.{block}.")]
        scores = torch.cat([(model.get_submodule(n).weight.abs().double()
                             * inputs[n].double().norm(dim=0)).flatten() for n in names])
        fractions.append((scores > 2.0 * scores.mean()).double().mean().item())
        sizes.append(sum(model.get_submodule(n).weight.numel() for n in names))
    assert len(set(fractions)) > 1
    expected = owl_sparsities(fractions, sizes, 0.5, 0.1)

    report = oneshot(model, recipe, input_ids, progress=False, batch_size=2)
    assert_pruned_exactly(model, before, report)
    for stats in report.layers:
        if "down_proj" in stats.name:
            assert stats.pattern == "2:4" and stats.target_sparsity == 0.5
        else:
            assert stats.target_sparsity == pytest.approx(expected[stats.block], abs=1e-4)
    unstructured = [s for s in report.layers if "down_proj" not in s.name]
    pruned = sum(s.n_pruned for s in unstructured)
    total = sum(s.shape[0] * s.shape[1] for s in unstructured)
    assert abs(pruned - total / 2) <= len(unstructured)  # one rounding per layer at most


def test_owl_spread_too_wide_is_a_recipe_error(input_ids):
    model = tiny_model("llama", layers=4)
    before = snapshot(model)
    recipe = {"method": "magnitude", "sparsity": 0.05,
              "block_sparsity": {"method": "owl", "spread": 0.3, "outlier_threshold": 2.0}}
    with pytest.raises(RecipeError, match="block_sparsity.*spread"):
        oneshot(model, recipe, input_ids, progress=False)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert no_hooks(model)


@pytest.mark.parametrize("recipe, words", [
    ({"targets": ["lm_head"]}, ["match no prunable layer", "model.layers.0.self_attn.q_proj"]),
    ({"targets": ["mlp"], "ignore": ["mlp"]}, ["match no prunable layer"]),
    ({"overrides": [{"targets": ["fc1"], "sparsity": 0.2}]}, ["overrides[0].targets", "fc1"]),
    ({"method": "magnitude", "pattern": "1:3"},
     ["1:3", "model.layers.0.self_attn.q_proj", "d_in=64"]),
    ({"method": "magnitude", "overrides": [{"targets": ["down_proj"], "pattern": "1:3"}]},
     ["model.layers.0.mlp.down_proj", "d_in=128"]),
])
def test_plan_errors_come_before_any_change(recipe, words, input_ids):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(RecipeError) as info:
        oneshot(model, recipe, input_ids, progress=False)
    for word in words:
        assert word in str(info.value)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert no_hooks(model)


def test_non_finite_weight_is_refused_with_the_layer_named(input_ids):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.down_proj"):
        oneshot(model, {"method": "magnitude"}, input_ids, progress=False)
    assert no_hooks(model) and not model.training


def test_non_finite_weight_mid_block_is_named_itself_before_any_work(input_ids):
    model = tiny_model("llama")
    with torch.no_grad():  # feeds down_proj; solved stacked with gate_proj
        model.model.layers[0].mlp.up_proj.weight[2, 1] = float("inf")
    before = snapshot(model)
    with pytest.raises(NonFiniteError, match=r"layer model\.layers\.0\.mlp\.up_proj: the "
                                             r"weight holds NaN") as info:
        oneshot(model, {"method": "obs_blockwise", "block_size": 8}, input_ids, progress=False)
    assert "down_proj" not in str(info.value) and "gate_proj" not in str(info.value)
    for name, tensor in model.state_dict().items():  # refused before any weight changed
        assert torch.equal(tensor, before[name]), name
    assert no_hooks(model)


def test_non_finite_activations_are_refused_with_the_layer_named(input_ids):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[input_ids[0, 0]] = float("inf")
    with pytest.raises(NonFiniteError, match=r"layer model\.layers\.0\.self_attn\.q_proj"):
        oneshot(model, {"method": "magnitude"}, input_ids, progress=False)
    assert no_hooks(model)


def test_blocks_are_yielded_one_at_a_time(input_ids):
    model = tiny_model("llama", layers=3)
    plan = build_plan(model, {"method": "magnitude"})
    later = model.model.layers[2].mlp.up_proj.weight.detach().clone()
    blocks = prune_blocks(model, plan, input_ids, progress=False)
    first = next(blocks)
    assert first.index == 0 and first.name == "model.layers.0" and len(first.layers) == 7
    assert (model.model.layers[0].mlp.up_proj.weight == 0).any()
    assert torch.equal(model.model.layers[2].mlp.up_proj.weight, later)  # not reached yet
    blocks.close()  # stopping early leaves no hook behind
    assert no_hooks(model)


def test_prune_model_report(input_ids):
    model = tiny_model("bert")
    plan = build_plan(model, {"method": "magnitude", "sparsity": 0.25})
    report = prune_model(model, plan, input_ids, batch_size=3, progress=False, model_name="t")
    data = report.to_dict()
    assert data["model"] == "t" and data["n_layers"] == 12 and data["n_samples"] == 8
    assert data["global_sparsity"] == pytest.approx(0.25, abs=1e-3)
    assert data["recipe"]["sparsity"] == 0.25
    table = report.table()
    assert "encoder.layer.1.output.dense" in table and "global sparsity 0.2500" in table


def test_raised_dampening_is_reported_and_a_cap_refuses_it():
    """16 calibration tokens for inputs of width 64: H has rank 16, so Cholesky fails with
    dampening_frac 0 and the dampening is raised; the report says so per layer, and a cap
    equal to the requested value refuses the raise, naming it."""
    input_ids = torch.randint(4, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    recipe = {"method": "obs_blockwise", "block_size": 8, "dampening_frac": 0.0,
              "targets": ["layers\\.0\\.self_attn\\.q_proj"]}
    report = oneshot(tiny_model("llama"), recipe, input_ids, progress=False)
    (stats,) = report.layers
    assert stats.requested_dampening_frac == 0.0 and stats.dampening_frac > 0
    assert stats.dampening_raised
    data = report.to_dict()
    assert data["dampening_raised"] == [stats.name]
    assert data["layers"][0]["dampening_frac"] == stats.dampening_frac
    table = report.table()
    assert f"{stats.dampening_frac:g}*" in table
    assert "raised above the recipe's for 1 layer " in table
    assert f"{stats.name} 0 -> {stats.dampening_frac:g}" in table
    with pytest.raises(HessianNotPositiveDefinite, match="max_dampening_frac"):
        oneshot(tiny_model("llama"), {**recipe, "max_dampening_frac": 0.0}, input_ids,
                progress=False)
    unraised = oneshot(tiny_model("llama"), {**recipe, "dampening_frac": 0.01}, input_ids,
                       progress=False)
    assert unraised.layers[0].dampening_frac == 0.01 and not unraised.to_dict()["dampening_raised"]
    assert "raised above" not in unraised.table()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_magnitude_without_calibration_data_runs_no_forward(family, monkeypatch):
    """Source 'none': each target loses its smallest |W| by a threshold over the layer, kept
    weights are untouched, no forward runs, and the report has no losses."""
    model = tiny_model(family)
    before = snapshot(model)
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(module))
    monkeypatch.setattr(driver, "capture_block_inputs", lambda *a, **k: pytest.fail("captured"))
    report = oneshot(model, {"method": "magnitude", "sparsity": 0.5,
                             "calibration": {"source": "none"}}, progress=False)
    handle.remove()
    assert forwards == [] and no_hooks(model)
    assert report.n_samples == 0 and report.global_sparsity == pytest.approx(0.5, abs=1e-3)
    assert_pruned_exactly(model, before, report)
    for stats in report.layers:
        assert stats.predicted_loss is None and stats.reconstruction_loss is None
        assert stats.n_tokens == 0
    for layer_plan in build_plan(model, {"method": "magnitude"}).layers:
        pruned = layer_plan.layer.weight_matrix()
        original = before[layer_plan.layer.name + ".weight"].to(pruned.dtype)
        if family == "gpt2":  # Conv1D stores (d_in, d_out)
            original = original.T
        zeroed = pruned == 0
        assert torch.equal(pruned[~zeroed], original[~zeroed])
        assert original[zeroed].abs().max() <= original[~zeroed].abs().min()
    assert "  -  " in report.table()
    json.dumps(report.to_dict(), allow_nan=False)  # null losses, never NaN, in the JSON report
    assert_runs(model, torch.randint(4, 128, (2, 8)))


def test_no_calibration_data_is_refused_for_methods_that_need_it(input_ids):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(InvalidArgument, match="without calibration data: method obd needs the "
                                              "Hessian"):
        oneshot(model, {"method": "obd"}, "none", progress=False)
    plan = build_plan(model, {"method": "magnitude", "overrides": [
        {"targets": ["down_proj"], "method": "obs_blockwise"}]})
    with pytest.raises(InvalidArgument, match=r"overrides\[0\]\.method obs_blockwise needs"):
        list(prune_blocks(model, plan, None, progress=False))
    with pytest.raises(InvalidArgument, match="'none' gives no calibration data"):
        calibration_input_ids("none", tokenizer=object(), calibration=plan.recipe.calibration)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_oneshot_dataset_forms(tmp_path, input_ids):
    from _tiny_models import char_tokenizer, write_text_file

    recipe = {"method": "magnitude", "calibration": {"n_samples": 4, "seq_len": 48}}
    tokenizer = char_tokenizer()
    path = write_text_file(tmp_path / "cal.jsonl")
    texts = [line for line in path.read_text().splitlines()]
    for dataset in (str(path), texts):
        model = tiny_model("llama")
        report = oneshot(model, recipe, dataset, tokenizer=tokenizer, progress=False)
        assert report.n_samples == 4 and report.seq_len == 48
    with pytest.raises(Exception, match="vocabulary"):
        oneshot(tiny_model("llama"), recipe, torch.full((2, 8), 500), progress=False)


def test_minilm_obd_50(data_dir):
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    model = AutoModel.from_pretrained(folder, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    before = snapshot(model)
    recipe = {"method": "obd", "calibration": {"source": str(data_dir / "c4" /
                                                           "c4_validation_2k.parquet"),
                                               "n_samples": 4, "seq_len": 64}}
    report = oneshot(model, recipe, tokenizer=tokenizer, progress=False)
    assert len(report.layers) == 36
    assert_pruned_exactly(model, before, report)  # pooler, embeddings, LayerNorms untouched
    with torch.no_grad():
        encoded = tokenizer(["pruned sentence embeddings still run"], return_tensors="pt")
        assert torch.isfinite(model(**encoded).last_hidden_state).all()


def test_layers_sharing_inputs_and_settings_are_solved_together(input_ids, monkeypatch):
    calls = []
    solve = driver.prune_weight

    def counting(weight, curvature, **kwargs):
        calls.append((curvature.name, kwargs.get("row_groups")))
        return solve(weight, curvature, **kwargs)

    monkeypatch.setattr(driver, "prune_weight", counting)
    recipe = {"method": "obs_blockwise", "block_size": 8,
              "overrides": [{"targets": ["k_proj"], "sparsity": 0.25}]}
    model = tiny_model("llama")
    before = snapshot(model)
    report = oneshot(model, recipe, input_ids, progress=False)
    assert_pruned_exactly(model, before, report)
    block_calls = [(name.replace("model.layers.0.", ""), groups) for name, groups in calls
                   if name.startswith("model.layers.0.")]
    hidden, intermediate = model.config.hidden_size, model.config.intermediate_size
    kv_rows = model.config.num_key_value_heads * hidden // model.config.num_attention_heads
    # the widest Hessian (down_proj's, d_in = intermediate) is solved first and freed; the
    # others keep the forward's order; the report keeps the model's order
    assert block_calls == [
        ("mlp.down_proj", None),
        ("self_attn.q_proj, self_attn.v_proj", [hidden, kv_rows]),
        ("self_attn.k_proj", None),
        ("self_attn.o_proj", None),
        ("mlp.gate_proj, mlp.up_proj", [intermediate, intermediate])]
    sparsity = {s.name.replace("model.layers.0.", ""): s.sparsity for s in report.layers
                if s.block == 0}
    assert sparsity["self_attn.k_proj"] == pytest.approx(0.25, abs=1e-3)
    assert sparsity["self_attn.v_proj"] == pytest.approx(0.5, abs=1e-3)
    assert [s.name for s in report.layers if s.block == 0] == [
        f"model.layers.0.{name}" for name in ("self_attn.q_proj", "self_attn.k_proj",
                                             "self_attn.v_proj", "self_attn.o_proj",
                                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
