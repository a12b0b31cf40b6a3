"""Tests of tools/bench_quality.py, the quality benchmark against llm-compressor.

The fast tests check the harness's own logic on synthetic results (patterns, the job plan,
the best-recipe choice, the report, the targets, the plot, resuming, the memory meter). The
``slow`` test runs ``--quick`` end to end on SmolLM2-135M with llm-compressor's SparseGPT and
our ``obs_blockwise``; it is excluded from the default run (``-m 'not slow'``)::

    pytest -m slow tests/test_bench_quality.py --basetemp /tmp/bench_quick

Its time budget is ``OBS_COMPRESS_BENCH_QUICK_BUDGET_S`` seconds (default 600, the issue's
"under 10 minutes" on the 2-core development CPU when nobody else uses it); the run is killed
after ``OBS_COMPRESS_BENCH_QUICK_TIMEOUT_S`` seconds (default 1800).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tools" / "bench_quality.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _row(method: str, pattern: str, wikitext2: float, c4: float, seconds: float | None = None):
    return {"method": method, "pattern": pattern, "wikitext2_ppl": wikitext2, "c4_ppl": c4,
            "prune_seconds": seconds, "prune_cpu_seconds": seconds, "peak_rss_mib": 1000.0,
            "peak_rss_delta_mib": 400.0, "sparsity": 0.5, "loadavg_during": 1.0}


def _meta(bench, *, is_protocol: bool = True) -> dict:
    return {
        "started": "2026-01-01T00:00:00+00:00", "updated": "2026-01-01T01:00:00+00:00",
        "model": "SmolLM2-135M-Instruct", "quick": not is_protocol,
        "machine": {"cpu": "Test CPU", "cores": 2, "cores_usable": 2, "torch_threads": 2,
                    "memory_gib": 8.0, "platform": "Linux"},
        "versions": {"obs_compress": "0.1.0", "obs_compress_git": "abc", "torch": "2.13",
                     "transformers": "5.17.0", "llmcompressor": "0.14.0.1",
                     "compressed_tensors": "0.19.0"},
        "protocol": {"calibration": {"source": "c4", "documents": [0, 1000], "n_samples": 128,
                                     "seq_len": 512, "seed": 0, "digest": "c8664533313406d0"},
                     "evaluation": {"wikitext2": {"n_windows": 40, "window": 1024,
                                                  "digest": "f9431c1508d7d212"},
                                    "c4": {"n_windows": 20, "window": 1024,
                                           "digest": "612e66f88def2961"}},
                     "is_protocol": is_protocol},
        "memory_method": "VmHWM",
    }


def test_patterns_parse(bench):
    assert bench.parse_bench_pattern("50%") == bench.Pattern("50%", 0.5)
    two_four = bench.parse_bench_pattern("2:4")
    assert (two_four.n, two_four.m, two_four.sparsity, two_four.is_nm) == (2, 4, 0.5, True)
    assert two_four.recipe_pattern == "2:4"
    assert bench.parse_bench_pattern("70%").recipe_pattern == "unstructured"
    for bad in ("0%", "100%", "4:2", "half"):
        with pytest.raises(bench.BenchError):
            bench.parse_bench_pattern(bad)


def test_plan_runs_dense_once_and_the_sweep_without_repeats(bench):
    patterns = tuple(bench.parse_bench_pattern(p) for p in ("50%", "2:4", "70%"))
    sweep = tuple(bench.parse_bench_pattern(p) for p in bench.SWEEP_SPARSITIES)
    jobs = bench.plan_jobs(bench.METHOD_ORDER, patterns, sweep, ("sparsegpt", "best"))
    keys = [(job.method, job.pattern.name if job.pattern else "dense") for job in jobs]
    assert keys[0] == ("dense", "dense")
    assert len(keys) == len(set(keys))
    assert len(keys) == 1 + 6 * 3 + 2 * 2  # dense, six methods x three patterns, sweep 60/80%
    assert ("sparsegpt", "80%") in keys and ("obd", "80%") not in keys


def test_best_recipe_per_pattern(bench):
    recipes = bench.parse_best_recipes(None)
    for name, file in (("50%", "obs-50.yaml"), ("2:4", "obs-2of4.yaml"),
                       ("70%", "obs-70.yaml"), ("80%", "obs-70.yaml")):
        path, recipe = bench.resolve_best_recipe(bench.parse_bench_pattern(name), recipes)
        assert path.name == file
        pattern = bench.parse_bench_pattern(name)
        assert recipe.pattern == pattern.recipe_pattern
        if not pattern.is_nm:
            assert math.isclose(recipe.sparsity, pattern.sparsity)
        # The file's own fields come through (80% takes the nearest file, 70%'s).
        assert recipe.block_sparsity.method == "uniform"
        assert (recipe.block_size, recipe.refit) == (32, True)
    spaced = bench.parse_best_recipes([f"2 : 4={bench.RECIPES_DIR / 'obs-2of4.yaml'}"])
    assert list(spaced) == ["2:4"]


def test_magnitude_is_timed_without_calibration_data(bench):
    from _tiny_models import tiny_model  # tests/ is on the path (conftest.py)

    recipe = bench.our_recipe("magnitude", bench.parse_bench_pattern("2:4"))
    assert recipe.calibration.source == "none" and recipe.pattern == "2:4"
    model = tiny_model("llama")
    out_of_vocabulary = torch.full((2, 8), 10 ** 6)  # refused, were it read
    result = bench.prune_ours(model, recipe, out_of_vocabulary, batch_size=1)
    assert result["report_global_sparsity"] == 0.5
    with pytest.raises(Exception, match="vocabulary"):
        bench.prune_ours(model, bench.our_recipe("obd", bench.parse_bench_pattern("2:4")),
                         out_of_vocabulary, batch_size=1)


def test_obs_blockwise_runs_the_shipped_recipe_and_best_reuses_it(bench):
    fifty, seventy = bench.parse_bench_pattern("50%"), bench.parse_bench_pattern("70%")
    shipped = bench.our_recipe("obs_blockwise", fifty)
    assert (shipped.block_size, shipped.refit, shipped.sparsity) == (32, True, 0.5)
    best_recipes = bench.parse_best_recipes(None)
    stored = shipped.to_dict()
    stored.pop("calibration")
    del stored["block_sparsity"]  # a row written before the field existed still matches
    results = [{**_row("obs_blockwise", "50%", 45.0, 55.0, 500.0), "recipe": stored},
               {**_row("obs_blockwise", "70%", 200.0, 180.0, 500.0),
                "recipe": {**stored, "sparsity": 0.7}}]
    reused = bench.reused_row(bench.Job("best", fifty), results, best_recipes)
    assert reused["same_as"] == "obs_blockwise" and reused["method"] == "best"
    assert reused["wikitext2_ppl"] == 45.0 and reused["recipe_file"].endswith("obs-50.yaml")
    assert bench.reused_row(bench.Job("best", seventy), results, best_recipes)["same_as"] \
        == "obs_blockwise"
    # A best recipe that differs from the shipped one (OWL) runs on its own.
    owl = bench.parse_best_recipes([f"70%={bench.RECIPES_DIR / 'obs-70-owl.yaml'}"])
    assert bench.reused_row(bench.Job("best", seventy), results, owl) is None
    assert bench.reused_row(bench.Job("obd", fifty), results, best_recipes) is None


def test_report_table_reference_check_and_targets(bench):
    results = [
        _row("dense", "dense", 24.14, 30.80),
        _row("sparsegpt", "50%", 48.60, 57.50, 600.0),
        {**_row("obs_blockwise", "50%", 45.0, 55.0, 500.0), "obs_compress_git": "abc1234"},
        _row("best", "50%", 44.0, 54.0, 700.0),  # increase 19.86 vs 24.46: 18.8% smaller
        _row("sparsegpt", "2:4", 94.233, 107.4, 600.0),  # 1% above the README's 93.30
        _row("best", "2:4", 90.0, 100.0, 700.0),  # 4.8% smaller: missed
        {**_row("obd", "50%", 65.0, 86.0, 900.0), "note": "copied from the log"},
    ]
    text = bench.markdown_report(_meta(bench), results)
    assert "| dense | – | 24.14 | +0.0% | 30.80 |" in text
    obs_row = next(line for line in text.splitlines() if line.startswith("| obs_blockwise"))
    assert obs_row.endswith("| abc1234 |")  # the row's own commit, not the latest run's
    assert "| SparseGPT (llm-compressor) | 50% | 48.60 | +101.3% |" in text
    assert "Check against the README's reference figures" in text
    assert "48.60 (48.60, +0.0%)" in text
    assert "94.23 (93.30, +1.0%)" in text
    targets = {row["target"].split(":")[0] + row["ours"]: row for row in bench.target_rows(results)}
    assert targets["50%best"]["met"] is True
    assert targets["2best"]["met"] is False
    assert targets["50%obs_blockwise"]["met"] is True  # 500 s <= 600 s
    assert "| NO |" in text and "| yes |" in text
    assert "| OBD (ours) † | 50% |" in text and "† OBD (ours) 50%: copied from the log" in text
    quick = bench.markdown_report(_meta(bench, is_protocol=False), results)
    assert "Quick / non-protocol run" in quick and "## Check against" not in quick


def test_plot_sweep_writes_a_png(bench, tmp_path):
    pytest.importorskip("matplotlib")
    results = [_row("dense", "dense", 24.0, 30.0)]
    for i, pattern in enumerate(("50%", "60%", "70%", "80%")):
        results += [_row("sparsegpt", pattern, 48.0 * 2**i, 57.0 * 2**i),
                    _row("obs_blockwise", pattern, 45.0 * 2**i, 55.0 * 2**i)]
    path = tmp_path / "sweep.png"
    assert bench.plot_sweep(results, path, ("sparsegpt", "obs_blockwise", "wanda"))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not bench.plot_sweep(results[:1], tmp_path / "none.png", ("sparsegpt",))


def test_store_appends_resumes_and_refuses(bench, tmp_path):
    path = tmp_path / "out.json"
    meta = _meta(bench)
    store = bench.ResultStore.open(path, meta, resume=False, overwrite=False)
    store.add(_row("dense", "dense", 24.0, 30.0))
    store.add(_row("sparsegpt", "50%", 48.0, 57.0, 1.0))
    assert json.loads(path.read_text())["results"][1]["method"] == "sparsegpt"
    with pytest.raises(bench.BenchError, match="--resume"):
        bench.ResultStore.open(path, meta, resume=False, overwrite=False)
    resumed = bench.ResultStore.open(path, dict(meta, started="later"), resume=True,
                                     overwrite=False)
    assert resumed.done() == {("dense", "dense"), ("sparsegpt", "50%")}
    assert resumed.meta["resumed"] == ["later"]
    other = _meta(bench)
    other["protocol"]["calibration"]["digest"] = "0000000000000000"
    with pytest.raises(bench.BenchError, match="other tokens"):
        bench.ResultStore.open(path, other, resume=True, overwrite=False)
    assert bench.ResultStore.open(path, meta, resume=False, overwrite=True).done() == set()


def test_peak_rss_sees_an_allocation(bench):
    with bench.PeakRss() as meter:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        del block
    assert meter.method
    assert meter.peak_mib is not None and meter.before_mib is not None
    assert meter.peak_mib - meter.before_mib >= 48


def test_sparsity_check_sees_conv1d_layers(bench):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                       n_positions=32))
    layers = bench.decoder_linears(model)
    assert len(layers) == 4 and all("transformer.h.0" in name for name in layers)
    model.transformer.h[0].attn.c_attn.weight.data.zero_()  # Conv1D, stored (d_in, d_out)
    check = bench.sparsity_check(model, None)
    total = sum(m.weight.numel() for m in layers.values())
    assert check["n_layers"] == 4
    assert math.isclose(check["sparsity"], 16 * 48 / total)


def test_sparsity_check_on_a_tiny_llama(bench):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    linears = bench.decoder_linears(model)
    assert len(linears) == 14 and not any("lm_head" in name for name in linears)
    for module in linears.values():
        module.weight.data.view(-1, 4)[:, :2] = 0  # 2 zeros in every group of 4: 2:4 holds
    check = bench.sparsity_check(model, bench.parse_bench_pattern("2:4"))
    assert check["nm_ok"] and math.isclose(check["sparsity"], 0.5)
    next(iter(linears.values())).weight.data[0, :4] = 1.0
    assert not bench.sparsity_check(model, bench.parse_bench_pattern("2:4"))["nm_ok"]


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    pytest.importorskip("llmcompressor")
    from obs_compress.errors import ModelLoadError
    from convert_gguf import ensure_smollm2

    try:
        ensure_smollm2()
    except ModelLoadError as exc:
        pytest.skip(f"SmolLM2 is not available: {exc}")
    budget = float(os.environ.get("OBS_COMPRESS_BENCH_QUICK_BUDGET_S", "600"))
    out = tmp_path / "bench_quick.json"
    command = [sys.executable, str(SCRIPT), "--quick", "--out", str(out)]
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=float(os.environ.get("OBS_COMPRESS_BENCH_QUICK_TIMEOUT_S",
                                                            "1800")))
    seconds = time.perf_counter() - start
    (tmp_path / "stderr.log").write_text(completed.stderr)
    assert completed.returncode == 0, completed.stderr[-4000:]

    data = json.loads(out.read_text())
    assert data["meta"]["quick"] and not data["meta"]["protocol"]["is_protocol"]
    calibration = data["meta"]["protocol"]["calibration"]
    assert (calibration["n_samples"], calibration["seq_len"]) == (16, 256)
    rows = {(r["method"], r["pattern"]): r for r in data["results"]}
    assert set(rows) == {("dense", "dense"), ("sparsegpt", "50%"), ("obs_blockwise", "50%")}
    dense = rows["dense", "dense"]
    for key in (("sparsegpt", "50%"), ("obs_blockwise", "50%")):
        row = rows[key]
        assert abs(row["sparsity"] - 0.5) < 1e-3, row
        assert row["n_layers"] == 210  # 30 blocks x 7 Linears; lm_head untouched
        assert row["prune_seconds"] > 0 and row["peak_rss_mib"] > 0
        for name in ("wikitext2", "c4"):
            assert math.isfinite(row[f"{name}_ppl"])
            assert dense[f"{name}_ppl"] < row[f"{name}_ppl"] < 10 * dense[f"{name}_ppl"]
    assert "SparseGPT (llm-compressor)" in out.with_suffix(".md").read_text()

    # Nothing is left to do: --resume only rebuilds the data and rewrites the report.
    again = subprocess.run(command + ["--resume"], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads(out.read_text())["results"] == data["results"]
    assert seconds < budget, (f"--quick took {seconds:.0f} s, over the {budget:.0f} s budget "
                              f"(load average {os.getloadavg()[0]:.1f})")


def test_structured_benchmark_table_names_the_commit_it_ran_at():
    import bench_structured  # tools/, on the path through conftest.py

    meta = {"model_name": "SmolLM2-135M-Instruct", "started": "2026-12-07 13:15:27",
            "machine": {"cpu": "AMD EPYC", "cores_usable": 2},
            "versions": {"obs_compress_git": "06cd2f7"}}
    row = {"variant": "mlp30-obs", "wikitext2_ppl": 42.89, "c4_ppl": 47.56,
           "parameters": 110_616_768, "file_bytes": 442_497_448, "prune_seconds": 313.6,
           "recipe": {"structured": {"score": "obs", "shots": 1},
                      "curvature": {"kind": "hessian"}}}
    table = bench_structured.markdown(meta, [row])
    assert "2 cores; commit 06cd2f7; started 2026-12-07 13:15:27" in table
    assert "| mlp30-obs | obs (hessian) | 1 | 42.89 | 47.56 | 110,616,768 | 442.5 |" in table


def test_width_benchmark_counts_the_smaller_configs(tmp_path, capsys):
    import bench_widths  # tools/, on the path through conftest.py
    from _tiny_models import tiny_config

    tiny_config("llama", layers=2).save_pretrained(tmp_path)
    assert bench_widths.main(["--model", str(tmp_path), "--rounds", "1", "--prefill-tokens",
                              "8", "--decode-steps", "2", "--widths", "intermediate_size=96",
                              "intermediate_size=96,num_attention_heads=2"]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    # hidden 64, 4 query heads of 16 over 2 key/value heads, vocab 128 untied, 2 layers
    attention = lambda heads: 64 * 16 * heads * 2 + 64 * 16 * 2 * 2  # q, o; k, v
    mlp = lambda width: 3 * 64 * width
    norms = 2 * 2 * 64 + 64
    dense = 2 * (attention(4) + mlp(128)) + 2 * 128 * 64 + norms
    smaller = 2 * (attention(4) + mlp(96)) + 2 * 128 * 64 + norms
    assert rows["dense"][1] == f"{dense:,}" and rows["intermediate_size=96"][1] == f"{smaller:,}"
    # prefill bound: multiply-adds per token, the linears plus 4 heads x 16 x 2 x 8/2 scores
    scores = lambda heads: 2 * heads * 16 * 2 * 4
    linear = lambda heads, width: 2 * (attention(heads) + mlp(width)) + 128 * 64
    bound = (linear(4, 128) + scores(4)) / (linear(2, 96) + scores(2))
    assert f"({bound:.3f})" in rows["intermediate_size=96,num_attention_heads=2"][3]
    assert f"({dense / smaller:.3f})" in rows["intermediate_size=96"][5]


def test_width_benchmark_refuses_unknown_and_malformed_widths(tmp_path):
    import bench_widths
    from _tiny_models import tiny_config

    tiny_config("llama", layers=1).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="expected key=integer"):
        bench_widths.main(["--model", str(tmp_path), "--widths", "intermediate_size=wide"])
    with pytest.raises(SystemExit, match="the config has no mlp_width"):
        bench_widths.main(["--model", str(tmp_path), "--widths", "mlp_width=96"])
