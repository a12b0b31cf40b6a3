"""The command line: a full run, clear refusals that leave no output, and interrupted runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from _tiny_models import folder_digest, save_tiny, tiny_model, write_text_file
from obs_compress.cli import EXIT_ERROR, EXIT_INTERRUPTED, main

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
SMALL = ["--set", "calibration.n_samples=4", "--set", "calibration.seq_len=48", "--no-progress"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def workspace(tmp_path):
    source = save_tiny(tmp_path / "source", "llama", layers=2)
    calibration = write_text_file(tmp_path / "cal.jsonl")
    return tmp_path, source, calibration


def prune_args(source, out, calibration, recipe="magnitude-50.yaml", *extra):
    return ["prune", "--model", str(source), "--recipe", os.path.join(RECIPES, recipe),
            "--out", str(out), "--dataset", str(calibration), *SMALL, *extra]


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in ("prune", "eval", "inspect", "recipe", "examples:"):
        assert word in text
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    for word in ("--model", "--recipe", "--out", "--dataset", "--device", "--overwrite",
                 "--allow-pickle", "--trust-remote-code", "--set", "FIELD=VALUE", "self"):
        assert word in text


def test_prune_then_inspect_then_eval(workspace, capsys):
    from transformers import AutoModelForCausalLM

    tmp_path, source, calibration = workspace
    before = folder_digest(source)
    out = tmp_path / "out"
    assert main(prune_args(source, out, calibration, "obs-2of4.yaml",
                           "--set", "method=magnitude")) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "global sparsity 0.5000" in printed
    assert folder_digest(source) == before
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    assert json.loads((out / "config.json").read_text())["sparsity"]["pattern"] == "2:4"

    assert main(["inspect", str(out)]) == 0
    assert "2:4 holds in 14 of them" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["global_sparsity"] == 0.5

    text = tmp_path / "eval.txt"
    text.write_text("the model prunes weights with second order curvature " * 40)
    assert main(["eval", "--model", str(out), "--dataset", str(text), "--windows", "2",
                 "--window", "64", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)[str(text)]
    assert result["n_tokens"] == 2 * 63 and result["perplexity"] > 1


def test_eval_shows_a_progress_bar_below_its_log_lines(workspace):
    """eval runs for many minutes on a CPU: a bar with an ETA, log lines above it, as prune;
    --no-progress turns the bar off. Run as a user does, in its own process."""
    tmp_path, source, _ = workspace
    text = tmp_path / "eval.txt"
    text.write_text("the model prunes weights with second order curvature " * 40)
    command = [sys.executable, "-m", "obs_compress.cli", "eval", "--model", str(source),
               "--dataset", str(text), "--windows", "3", "--window", "64", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    shown = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert f"{text}: perplexity" in shown.stdout
    error = shown.stderr
    bar = error.rindex(f"perplexity {text}: 100%")
    assert "3/3 [" in error[bar:] and "window/s]" in error[bar:]  # count, elapsed<ETA, rate
    assert error.index("scoring 3 windows of 64 tokens") < bar  # the log line above the bar
    quiet = subprocess.run(command + ["--no-progress"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert quiet.returncode == 0 and quiet.stdout == shown.stdout
    assert "scoring 3 windows" in quiet.stderr and "%|" not in quiet.stderr


@pytest.mark.parametrize("case, words", [
    ("typo", ["unknown recipe field 'sparsty'", "allowed fields"]),
    ("sparsity", ["'sparsity'", "1.5"]),
    ("unknown-set", ["unknown recipe field 'spars'"]),
    ("nm-width", ["1:3", "d_in=64", "model.layers.0.self_attn.q_proj"]),
    ("missing-model", ["no such folder", "does-not-exist"]),
    ("missing-data", ["no-such.jsonl"]),
    ("pickle", ["--allow-pickle"]),
    ("no-data-obs", ["without calibration data",
                     "method obs_blockwise, refit true need the Hessian"]),
])
def test_errors_are_clear_and_leave_no_output(workspace, capsys, case, words):
    tmp_path, source, calibration = workspace
    before = folder_digest(source)
    out = tmp_path / "out"
    args = prune_args(source, out, calibration)
    if case == "typo":
        recipe = tmp_path / "typo.yaml"
        recipe.write_text("sparsty: 0.5\n")
        args[args.index("--recipe") + 1] = str(recipe)
    elif case == "sparsity":
        args += ["--set", "sparsity=1.5"]
    elif case == "unknown-set":
        args += ["--set", "spars=0.5"]
    elif case == "nm-width":
        args += ["--set", "pattern=1:3"]
    elif case == "missing-model":
        args[args.index("--model") + 1] = str(tmp_path / "does-not-exist")
    elif case == "missing-data":
        args[args.index("--dataset") + 1] = str(tmp_path / "no-such.jsonl")
    elif case == "no-data-obs":
        args[args.index("--recipe") + 1] = os.path.join(RECIPES, "obs-50.yaml")
        args[args.index("--dataset") + 1] = "none"
    elif case == "pickle":
        pickled = tmp_path / "pickled"
        model = tiny_model("llama")
        model.config.save_pretrained(pickled)
        torch.save(model.state_dict(), pickled / "pytorch_model.bin")
        args[args.index("--model") + 1] = str(pickled)
    assert main(args) == EXIT_ERROR
    error = capsys.readouterr().err
    assert error.splitlines()[-1].startswith("error: ")
    for word in words:
        assert word in error, error
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert folder_digest(source) == before


def test_report_names_its_loss_units_and_prune_eval_measures_perplexity(workspace, capsys):
    from obs_compress.evaluate import perplexity
    from obs_compress.report import LOSS_UNITS

    tmp_path, source, calibration = workspace
    text = tmp_path / "eval.txt"
    text.write_text("the model prunes weights with second order curvature " * 60)
    out, report = tmp_path / "out", tmp_path / "report.json"
    assert main(prune_args(source, out, calibration, "obs-50.yaml", "--eval", str(text),
                           "--eval-windows", "2", "--report", str(report))) == 0
    printed = capsys.readouterr().out
    assert "predicted dE" in printed and "measured dE" in printed
    assert "per calibration token, summed over the layer's output rows" in printed
    data = json.loads(report.read_text())
    assert data["loss_units"] == LOSS_UNITS and "calibration tokens" in LOSS_UNITS
    assert "predicted_loss" in data["layers"][0] and "reconstruction_loss" in data["layers"][0]
    figures = data["perplexity"][str(text)]
    assert figures["n_tokens"] == 2 * 1023 and figures["before"] != figures["after"]
    assert (f"{text} perplexity: {figures['before']:.4f} before pruning, "
            f"{figures['after']:.4f} after (2,046 tokens)") in printed
    assert json.loads((out / "obs_compress_report.json").read_text())["perplexity"] == {
        str(text): figures}

    # The figures are the perplexity of the source and of the written output.
    from obs_compress.data import evaluation_windows, protocol_texts
    from obs_compress.model.loading import load_model

    for folder, key in ((source, "before"), (out, "after")):
        loaded = load_model(folder)
        windows = evaluation_windows(loaded.tokenizer, protocol_texts(str(text)), n_windows=2)
        assert perplexity(loaded.model, windows).perplexity == pytest.approx(figures[key])


def test_inspect_of_an_unstructured_checkpoint_has_no_nm_line(workspace, capsys):
    tmp_path, source, calibration = workspace
    out = tmp_path / "out"
    assert main(prune_args(source, out, calibration, "magnitude-50.yaml")) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "global sparsity 0.5000" in printed and "holds" not in printed
    assert main(["inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pattern"] is None and all(t["nm"] is None for t in data["tensors"])
    assert main(["inspect", str(out), "--pattern", "2:4"]) == 0
    assert "2:4 holds in 0 of them" in capsys.readouterr().out


def test_recipe_schema_prints_the_shipped_schema_file(capsys):
    assert main(["recipe", "--schema"]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(RECIPES, "recipe.schema.json"), encoding="utf-8") as file:
        assert printed == file.read()
    assert json.loads(printed)["title"] == "Recipe"


def test_recipe_check_prints_the_resolved_recipe(tmp_path, capsys):
    from obs_compress.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("pattern: 2:4\noverrides: [{targets: [mlp], method: obd}]\n")
    assert main(["recipe", str(path)]) == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert (resolved["pattern"], resolved["sparsity"], resolved["max_dampening_frac"]) == (
        "2:4", 0.5, 1.0)
    assert resolved["overrides"] == [{"targets": ["mlp"], "method": "obd"}]
    assert load_recipe(resolved) == load_recipe(path)


@pytest.mark.parametrize("text, args, words", [
    ("overrides: [{targets: [mlp], sparsty: 0.3}]\n", [],
     ["unknown recipe field 'overrides[0].sparsty'", "did you mean 'sparsity'"]),
    ("calibration: {n_samples: 0}\n", [], ["'calibration.n_samples'", "0", "integer >= 1"]),
    ("", ["--schema"], ["not both"]),
    (None, [], ["give a recipe file"]),
])
def test_recipe_check_refuses_clearly(tmp_path, capsys, text, args, words):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["recipe", *([str(path)] if text is not None else []), *args]) == EXIT_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1].startswith("error: ")
    for word in words:
        assert word in captured.err, captured.err


def test_magnitude_recipe_prunes_without_data(workspace, capsys, monkeypatch):
    import obs_compress.api as api

    tmp_path, source, _ = workspace
    monkeypatch.setattr(api, "calibration_input_ids", lambda *a, **k: pytest.fail("read data"))
    out, report = tmp_path / "out", tmp_path / "report.json"
    assert main(["prune", "--model", str(source), "--recipe",
                 os.path.join(RECIPES, "magnitude-50.yaml"), "--out", str(out), "--report",
                 str(report), "--no-progress"]) == 0
    assert "global sparsity 0.5000" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["n_samples"] == 0 and data["global_sparsity"] == 0.5
    assert all(layer["predicted_loss"] is None and layer["reconstruction_loss"] is None
               for layer in data["layers"])


def test_dataset_none_with_a_recipe_that_needs_data_refuses_before_loading(
        workspace, capsys, caplog, monkeypatch):
    import obs_compress.api as api

    tmp_path, source, _ = workspace
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        assert main(["prune", "--model", str(source), "--recipe",
                     os.path.join(RECIPES, "obs-50.yaml"), "--out", str(out), "--dataset",
                     "none", "--no-progress"]) == EXIT_ERROR
    captured = capsys.readouterr()
    assert "without calibration data" in captured.err
    for text in (captured.out, captured.err, caplog.text):
        assert "from their weights alone" not in text
    assert not out.exists()


def test_existing_output_is_refused_before_the_work(workspace, capsys, monkeypatch):
    import obs_compress.api as api
    tmp_path, source, calibration = workspace
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    loads = []
    real_load = api.load_model
    monkeypatch.setattr(api, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    assert main(prune_args(source, out, calibration)) == EXIT_ERROR
    assert "--overwrite" in capsys.readouterr().err
    assert loads == []  # refused before loading or calibrating
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert main(prune_args(source, out, calibration, "magnitude-50.yaml", "--overwrite")) == 0
    assert (out / "config.json").exists() and not (out / "precious.txt").exists()


def test_out_inside_the_source_is_refused(workspace, capsys):
    tmp_path, source, calibration = workspace
    before = folder_digest(source)
    assert main(prune_args(source, source, calibration, "magnitude-50.yaml",
                           "--overwrite")) == EXIT_ERROR
    assert "overlap the source" in capsys.readouterr().err
    assert folder_digest(source) == before


def test_allow_pickle_loads_bin_weights(workspace):
    tmp_path, source, calibration = workspace
    pickled = tmp_path / "pickled"
    model = tiny_model("llama")
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    (pickled / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    (pickled / "tokenizer_config.json").write_bytes((source / "tokenizer_config.json").read_bytes())
    assert main(prune_args(pickled, tmp_path / "out", calibration, "magnitude-50.yaml",
                           "--allow-pickle")) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


SLOW_CLI = """
import sys
import time

import obs_compress.driver as driver

blocks = driver._prune_blocks_with_data


def slow_blocks(*args, **kwargs):
    for block in blocks(*args, **kwargs):
        yield block
        time.sleep(120)


driver._prune_blocks_with_data = slow_blocks
from obs_compress.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_leaves_source_untouched_and_no_output(tmp_path, sig):
    source = save_tiny(tmp_path / "source", "llama", layers=3)
    calibration = write_text_file(tmp_path / "cal.jsonl")
    before = folder_digest(source)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # The CLI with a slow block loop injected: each block takes 120 s more, so the signal
    # comes mid-run (the library itself has no test-only switch).
    runner = tmp_path.parent / f"{tmp_path.name}-slow_cli.py"
    runner.write_text(SLOW_CLI, encoding="utf-8")
    command = [sys.executable, str(runner), *prune_args(source, out, calibration)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            seen.append(line)
            if "block 1/3" in line or not line:
                break
        assert "block 1/3" in seen[-1], "".join(seen)
        process.send_signal(sig)
        _, error = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if sig == signal.SIGTERM:
        assert process.returncode == EXIT_INTERRUPTED and "interrupted" in error
    else:
        assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    # Only the streaming run's resumable progress, hidden and named as such (test_streaming
    # resumes from it).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.in-progress", "cal.jsonl",
                                                          "source"]
    assert (tmp_path / ".out.in-progress" / "progress.json").is_file()
    assert folder_digest(source) == before


def test_sentence_transformers_model_keeps_its_own_files(tmp_path, minilm_path, capsys):
    """A pruned sentence-transformers folder is still one: every file of the source that the
    tool does not rewrite (modules.json, 1_Pooling/, the card...) is carried over unchanged."""
    before = folder_digest(minilm_path)
    recipe = tmp_path / "magnitude-none.yaml"
    recipe.write_text(yaml.safe_dump({"method": "magnitude", "sparsity": 0.5,
                                      "calibration": {"source": "none"}}))
    out = tmp_path / "minilm-50"
    assert main(["prune", "--model", str(minilm_path), "--recipe", str(recipe), "--out", str(out),
                 "--no-progress"]) == 0
    assert "global sparsity 0.5000" in capsys.readouterr().out
    assert folder_digest(minilm_path) == before
    written = folder_digest(out)
    weights = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
    carried = {name: data for name, data in before.items()
               if name not in ("config.json", "generation_config.json")
               and not name.endswith(weights) and not name.startswith(".")}
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
                 "config_sentence_transformers.json", "README.md", "vocab.txt"):
        assert name in carried  # the source really has them: the check below is not empty
    for name, data in carried.items():
        if name != "README.md":  # the card: ours, with the source's folded in (below)
            assert written.get(name) == data, name  # present, byte for byte
    card = (out / "README.md").read_text(encoding="utf-8")
    source_card = (minilm_path / "README.md").read_text(encoding="utf-8")
    source_body = source_card.split("\n---\n", 1)[1].strip() if source_card.startswith("---") \
        else source_card.strip()
    assert "## What was pruned" in card and "Method `magnitude`" in card
    assert card.rstrip().endswith(source_body)  # the source's card text, whole, at the end
    assert json.loads(written["config.json"])["sparsity"]["global_sparsity"] == 0.5
    assert written["model.safetensors"] != before["model.safetensors"]

    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    embeddings = model.encode(["a pruned model still embeds", "sentences"])
    assert embeddings.shape == (2, 384)
    assert abs(float((embeddings[0] ** 2).sum()) - 1) < 1e-4  # 2_Normalize is still there


def test_cli_and_python_api_write_the_same_folder(workspace):
    """Whichever door: the CLI's folder and oneshot + save_pretrained's (no recipe passed, the
    report carries it) hold the same files, byte for byte, but for the report's timings and
    model name."""
    import obs_compress
    from transformers import AutoModelForCausalLM

    tmp_path, source, calibration = workspace
    sizes = ["calibration.n_samples=4", "calibration.seq_len=48"]
    assert main(prune_args(source, tmp_path / "cli", calibration, "obs-50.yaml")) == 0
    model = AutoModelForCausalLM.from_pretrained(source)
    recipe = obs_compress.load_recipe(os.path.join(RECIPES, "obs-50.yaml")).with_updates(sizes)
    report = obs_compress.oneshot(model, recipe, str(calibration), progress=False)
    obs_compress.save_pretrained(model, tmp_path / "api", source=source, report=report)

    cli, api = folder_digest(tmp_path / "cli"), folder_digest(tmp_path / "api")
    assert sorted(cli) == sorted(api)
    assert "recipe.yaml" in api and "tokenizer.json" in api
    section = json.loads(api["config.json"])["sparsity"]
    assert (section["method"], section["pattern"], section["sparsity"]) == (
        "obs_blockwise", "unstructured", 0.5)

    def comparable(text):
        data = json.loads(text)
        for entry in (data, *data["layers"]):
            del entry["seconds"]
        del data["model"]
        del data["path"]  # how the weights were read: the files are the same either way
        return data

    assert json.loads(cli["obs_compress_report.json"])["path"] == "streaming"
    assert json.loads(api["obs_compress_report.json"])["path"] == "in-memory"

    for name in cli:
        if name == "obs_compress_report.json":
            assert comparable(cli[name]) == comparable(api[name])
        else:
            assert cli[name] == api[name], name
