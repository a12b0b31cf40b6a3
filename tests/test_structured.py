"""Structured OBS (issue 14): whole MLP channels and attention heads out, a smaller dense model.

Math against independent references (least squares, the full Kronecker product); on the tiny
Llama (4 query heads in 2 key/value groups): the shrunk model computes what the masked one
did, loads with stock ``from_pretrained`` in a process that never imports obs_compress, has
the parameter count and file size the removal predicts, never drops a key/value head a kept
query head reads; recipes and models the method cannot take are refused with the reason.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _tiny_models import save_tiny, tiny_model, write_text_file
from obs_compress.api import oneshot, prune_checkpoint
from obs_compress.driver import prune_model
from obs_compress.errors import InvalidArgument, RecipeError
from obs_compress.math.structured import (activation_scores, greedy_group_obs, lowest,
                                          obs_group_saliency, remove_column_groups,
                                          weight_norm_scores)
from obs_compress.model.structure import (BlockRemoval, block_structure, model_widths,
                                          shrink_model_)
from obs_compress.plan import build_plan
from obs_compress.recipe import load_recipe
from obs_compress.structured import shrink_pruned_model_


def _problem(seed, n=60, d_out=5, d_in=8):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, dtype=torch.float64, generator=g)
    X[:, 3] += 0.8 * X[:, 1]  # correlated inputs, so compensation matters
    W = torch.randn(d_out, d_in, dtype=torch.float64, generator=g)
    return X, W, 2 * X.T @ X / n


def test_group_removal_is_the_least_squares_optimum_and_its_predicted_loss():
    X, W, H = _problem(0)
    columns = torch.tensor([1, 4, 6])
    new_W = remove_column_groups(W, columns, torch.linalg.inv(H))
    kept = [j for j in range(W.shape[1]) if j not in columns.tolist()]
    reference = torch.zeros_like(W)  # min ||(W' - W) X^T|| over W'_K, W'_Q = 0
    reference[:, kept] = torch.linalg.lstsq(X[:, kept], X @ W.T).solution.T
    torch.testing.assert_close(new_W, reference)
    assert (new_W[:, columns] == 0).all()
    measured = ((new_W - W) @ X.T).pow(2).sum() / X.shape[0]
    predicted = obs_group_saliency(W, torch.linalg.inv(H), columns[None])
    torch.testing.assert_close(predicted[0], measured)
    # without compensation only the columns go
    zeroed = remove_column_groups(W, columns)
    torch.testing.assert_close(zeroed[:, kept], W[:, kept])
    assert (zeroed[:, columns] == 0).all()


def test_kronecker_group_saliency_is_the_full_kronecker_loss_of_the_optimal_update():
    X, W, A = _problem(1)
    g = torch.Generator().manual_seed(2)
    Y = torch.randn(30, W.shape[0], dtype=torch.float64, generator=g)
    G = Y.T @ Y / 30
    columns = torch.tensor([2, 3])
    kept = [j for j in range(W.shape[1]) if j not in columns.tolist()]
    # brute force: minimise 1/2 vec(dW)^T (G (x) A) vec(dW) with dW[:, Q] = -W[:, Q]
    F = torch.kron(G, A)
    index = lambda cols: torch.tensor([i * W.shape[1] + j for i in range(W.shape[0]) for j in cols])
    free, fixed = index(kept), index(columns.tolist())
    fixed_delta = -W[:, columns].reshape(-1)
    free_delta = -torch.linalg.solve(F[free][:, free], F[free][:, fixed] @ fixed_delta)
    delta = torch.zeros(W.numel(), dtype=torch.float64)
    delta[free], delta[fixed] = free_delta, fixed_delta
    loss = 0.5 * delta @ F @ delta
    A_inv = torch.linalg.inv(A)
    torch.testing.assert_close(obs_group_saliency(W, A_inv, columns[None], G)[0], loss)
    # the optimal update does not depend on G: the layer-wise one
    torch.testing.assert_close(W + delta.reshape(W.shape), remove_column_groups(W, columns, A_inv))
    # G = I is the layer-wise saliency
    eye = torch.eye(W.shape[0], dtype=torch.float64)
    groups = torch.tensor([[0, 1], [2, 3], [5, 7]])
    torch.testing.assert_close(obs_group_saliency(W, A_inv, groups, eye),
                               obs_group_saliency(W, A_inv, groups))


def test_batched_saliency_equals_each_group_alone_and_the_baseline_scores():
    X, W, H = _problem(3)
    H_inv = torch.linalg.inv(H)
    groups = torch.tensor([[0, 5], [1, 2], [4, 7]])
    batched = obs_group_saliency(W, H_inv, groups)
    for position, group in enumerate(groups):
        new_W = remove_column_groups(W, group, H_inv)
        torch.testing.assert_close(batched[position],
                                   ((new_W - W) @ X.T).pow(2).sum() / X.shape[0])
    singles = obs_group_saliency(W, H_inv, torch.arange(8)[:, None])
    torch.testing.assert_close(singles, (W ** 2).sum(0) / (2 * H_inv.diagonal()))
    x_norms = X.norm(dim=0)
    torch.testing.assert_close(activation_scores(W, H, groups),
                               (W.norm(dim=0) * x_norms)[groups].sum(1) * (2 / X.shape[0]) ** 0.5)
    torch.testing.assert_close(weight_norm_scores(W, groups),
                               torch.stack([W[:, group].norm() for group in groups]))


def test_greedy_removal_ends_at_the_optimum_of_its_set_and_predicts_its_loss():
    X, W, H = _problem(4, n=80, d_out=6, d_in=12)
    X[:, 7] = X[:, 2] + 0.05 * torch.randn(80, generator=torch.Generator().manual_seed(5),
                                           dtype=torch.float64)  # one can stand in for the other
    H = 2 * X.T @ X / X.shape[0]
    H_inv = torch.linalg.inv(H)
    groups = torch.arange(12)[:, None]
    new_W, chosen, predicted = greedy_group_obs(W, H_inv, groups, 4)
    assert chosen.shape == (4,) and (new_W[:, chosen] == 0).all()
    # the sequence of exact steps is the joint optimum for the set it chose ...
    torch.testing.assert_close(new_W, remove_column_groups(W, chosen, H_inv))
    joint = obs_group_saliency(W, H_inv, chosen[None])[0]
    assert predicted == pytest.approx(joint.item(), rel=1e-9)
    # ... and no worse than the set the saliencies of one moment pick
    once = lowest(obs_group_saliency(W, H_inv, groups), 4)
    assert joint <= obs_group_saliency(W, H_inv, once[None])[0] + 1e-12
    # groups of columns, the same number from every part, G weighing the choice
    heads = torch.arange(12).reshape(6, 2)
    parts = torch.tensor([[0, 1, 2], [3, 4, 5]])
    G = torch.diag(torch.linspace(0.1, 3.0, 6, dtype=torch.float64))
    new_W, chosen, predicted = greedy_group_obs(W, H_inv, heads, 1, parts=parts, output_factor=G)
    assert sorted(int(c) // 3 for c in chosen) == [0, 1]
    columns = heads[chosen].flatten()
    torch.testing.assert_close(new_W, remove_column_groups(W, columns, H_inv))
    assert predicted == pytest.approx(obs_group_saliency(W, H_inv, columns[None], G)[0].item(),
                                      rel=1e-9)


def test_lowest_takes_the_same_number_from_every_part():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0, 2.0])
    assert lowest(scores, 2).tolist() == [1, 3]
    parts = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert lowest(scores, 1, parts=parts).tolist() == [1, 3]
    assert lowest(scores, 2, parts=parts).tolist() == [1, 2, 3, 5]
    with pytest.raises(InvalidArgument, match="per group"):
        lowest(scores, 4, parts=parts)
    with pytest.raises(InvalidArgument, match="disjoint"):
        obs_group_saliency(torch.ones(2, 3), torch.eye(3), torch.tensor([[0, 1], [1, 2]]))


# --------------------------------------------------------------------------- tiny Llama

IDS = torch.randint(0, 128, (16, 48), generator=torch.Generator().manual_seed(0))


def recipe(**structured):
    return {"sparsity": 0, "structured": structured,
            "calibration": {"n_samples": 16, "seq_len": 48}}


def masked_and_shrunk(structured, curvature=None):
    model = tiny_model("llama")
    data = recipe(**structured)
    if curvature:
        data["curvature"] = curvature
    plan = build_plan(model, data)
    report = prune_model(model, plan, IDS, progress=False)
    masked = copy.deepcopy(model)
    shrink_pruned_model_(model, plan, report.structure)
    return masked, model, report


@pytest.mark.parametrize("structured", [
    {"mlp_fraction": 0.25, "heads": "per_group", "heads_removed": 2},
    {"mlp_fraction": 0.3, "heads": "whole_group", "heads_removed": 2, "shots": 2},
    {"mlp_fraction": 0.1, "score": "activation"},
    {"heads": "per_group", "heads_removed": 2, "score": "weight_norm"},
])
def test_the_shrunk_model_computes_what_the_masked_one_did(structured):
    masked, shrunk, report = masked_and_shrunk(structured)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(IDS).logits, masked(IDS).logits, atol=1e-5, rtol=1e-5)
    config = shrunk.config
    channels = round(structured.get("mlp_fraction", 0) * 128)
    heads = structured.get("heads_removed", 0)
    assert config.intermediate_size == 128 - channels
    assert config.num_attention_heads == 4 - heads
    assert config.num_key_value_heads == (1 if structured.get("heads") == "whole_group" else 2)
    for stats in report.structure:
        assert len(stats.mlp_channels) == channels and len(stats.heads) == heads
        # grouped-query attention: a removed key/value head takes all its query heads, and
        # per_group takes one from each of the 2 groups
        if structured.get("heads") == "whole_group":
            assert list(stats.heads) == [2 * g + i for g in stats.kv_heads for i in range(2)]
        elif heads:
            assert sorted(h // 2 for h in stats.heads) == [0, 1] and not stats.kv_heads


def test_obs_compensation_beats_removal_without_it_and_kronecker_runs():
    structured = {"mlp_fraction": 0.25, "heads": "whole_group", "heads_removed": 2}
    losses = {}
    for name, extra, curvature in (("obs", {"reference": "pruned"}, None),
                                   ("activation", {"score": "activation"}, None),
                                   ("kronecker", {"reference": "pruned"}, {"kind": "kronecker"})):
        _, _, report = masked_and_shrunk({**structured, **extra}, curvature)
        losses[name] = sum(s.reconstruction_loss for s in report.structure)
        if name == "obs":
            for s in report.structure:  # the joint prediction is under the damped H: above
                assert s.reconstruction_loss <= s.predicted_loss <= 1.1 * s.reconstruction_loss
    assert losses["obs"] < 0.5 * losses["activation"]
    assert losses["kronecker"] < losses["activation"]


def test_the_dense_reference_brings_the_last_hidden_state_closer_to_the_dense_model():
    dense = tiny_model("llama")
    with torch.no_grad():
        target = dense(IDS, output_hidden_states=True).hidden_states[-1]
    errors = {}
    for reference in ("pruned", "dense"):
        masked, _, report = masked_and_shrunk({"mlp_fraction": 0.4, "heads": "per_group",
                                               "heads_removed": 2, "reference": reference})
        with torch.no_grad():
            hidden = masked(IDS, output_hidden_states=True).hidden_states[-1]
        errors[reference] = (hidden - target).pow(2).mean().item()
    assert errors["dense"] < errors["pruned"]


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    source = save_tiny(root / "source", "llama")
    text = write_text_file(root / "text.jsonl")
    data = recipe(mlp_fraction=0.25, heads="per_group", heads_removed=2)
    run = prune_checkpoint(source, data, root / "out", dataset=str(text), device="cpu",
                           progress=False)
    return source, root / "out", run, text, data


def test_the_folder_loads_with_stock_transformers_and_matches_the_pruned_model(pruned_folder):
    source, out, run, _, _ = pruned_folder
    assert "structured removal" in run.report.path or run.report.path.startswith("in-memory")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        "assert 'obs_compress' not in sys.modules\n"
        f"ids = torch.tensor({IDS[:2].tolist()})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(ids).logits, {str(out / 'logits.pt')!r})\n"
        "print(sum(p.numel() for p in model.parameters()))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        expected = run.model(IDS[:2]).logits
    torch.testing.assert_close(torch.load(out / "logits.pt"), expected)
    # the parameters the removal predicts: per block 3 x 32 MLP weights of 64 (gate, up rows;
    # down columns), 2 query heads of 16 in q_proj rows and o_proj columns
    dense = sum(p.numel() for p in tiny_model("llama").parameters())
    predicted = dense - 2 * (3 * 32 * 64 + 2 * 2 * 16 * 64)
    assert int(done.stdout.split()[-1]) == predicted
    assert run.report.parameters == {"before": dense, "after": predicted}
    # the file holds exactly those fp32 parameters (lm_head untied), plus its header
    stored = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    header = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in out.glob("*.safetensors"))
    assert stored - header == 4 * predicted
    config = json.loads((out / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (96, 2, 2, 16)


def test_the_report_says_what_each_block_lost(pruned_folder):
    _, _, run, _, _ = pruned_folder
    table = run.report.table()
    assert "-32/128" in table and "-2/4" in table and "parameters" in table
    data = run.report.to_dict()
    assert [len(s["mlp_channels"]) for s in data["structure"]] == [32, 32]
    assert data["structure"][0]["score"] == "obs"


def test_structured_runs_refuse_what_they_cannot_do(pruned_folder, tmp_path):
    source, _, _, text, data = pruned_folder
    with pytest.raises(InvalidArgument, match="format bitmask .* smaller dense model"):
        prune_checkpoint(source, data, tmp_path / "a", dataset=str(text), format="bitmask",
                         device="cpu", progress=False)
    with pytest.raises(InvalidArgument, match="cannot stream this run: structured removal"):
        prune_checkpoint(source, data, tmp_path / "b", dataset=str(text), streaming=True,
                         device="cpu", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("structured,match", [
    ({"heads": "per_group", "heads_removed": 1}, "multiple of 2 below 4"),
    ({"heads": "whole_group", "heads_removed": 3}, "multiple of 2 below 4"),
    ({"heads": "whole_group", "heads_removed": 4}, "multiple of 2 below 4"),
    ({"mlp_fraction": 0.001}, "at least one"),
])
def test_counts_the_model_cannot_take_are_refused(structured, match):
    with pytest.raises(RecipeError, match=match):
        build_plan(tiny_model("llama"), recipe(**structured))


@pytest.mark.parametrize("data,match", [
    ({"sparsity": 0.5, "structured": {"mlp_fraction": 0.2}}, "set sparsity: 0"),
    ({"sparsity": 0, "structured": {"heads": "per_group"}}, "set both"),
    ({"sparsity": 0, "structured": {"heads_removed": 3}}, "set both"),
    ({"sparsity": 0, "structured": {"mlp_fraction": 0.2, "score": "activation"},
      "curvature": {"kind": "kronecker"}}, "weighs the obs saliency"),
    ({"sparsity": 0, "structured": {"mlp_fraction": 0.2}, "curvature": {"kind": "kronecker",
      "loss": "next_token"}}, "block-output loss"),
    ({"sparsity": 0, "structured": {"mlp_fraction": 1.0}}, "mlp_fraction"),
])
def test_recipes_that_cannot_run_are_refused(data, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(data)


def test_a_model_without_llama_style_blocks_is_refused_naming_what_is_missing():
    with pytest.raises(RecipeError, match="Llama-style blocks.*mlp.gate_proj"):
        build_plan(tiny_model("gpt2"), recipe(mlp_fraction=0.2))


def test_shrinking_refuses_a_key_value_head_whose_query_heads_stay():
    model = tiny_model("llama")
    widths = model_widths(model.config)
    structures = [block_structure(block, f"model.layers.{i}", widths)
                  for i, block in enumerate(model.model.layers)]
    bad = [BlockRemoval(block=i, heads=(0,), kv_heads=(0,)) for i in range(2)]
    with pytest.raises(InvalidArgument, match=r"query heads \[1\] read them"):
        shrink_model_(copy.deepcopy(model), structures, bad)
    uneven = [BlockRemoval(block=0, heads=(0, 1)), BlockRemoval(block=1, heads=(0, 2))]
    with pytest.raises(InvalidArgument, match="same number in every group"):
        shrink_model_(copy.deepcopy(model), structures, uneven)
    differ = [BlockRemoval(block=0, mlp_channels=(1,)), BlockRemoval(block=1, mlp_channels=(1, 2))]
    with pytest.raises(InvalidArgument, match="same numbers"):
        shrink_model_(copy.deepcopy(model), structures, differ)


def test_oneshot_shrinks_the_model_in_place():
    model = tiny_model("llama")
    report = oneshot(model, recipe(mlp_fraction=0.25), IDS, progress=False)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (64, 96)
    assert report.parameters["after"] == sum(p.numel() for p in model.parameters())
