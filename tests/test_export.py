"""Export: save -> load round-trips bit for bit, atomic output, refusals, inspection."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from _tiny_models import char_tokenizer, folder_digest, minilm_folder, save_tiny, tiny_model
from obs_compress.api import oneshot, save_pretrained
from obs_compress.errors import InvalidArgument, OutputExistsError
from obs_compress.errors import InvalidArgument as BadArgument
from obs_compress.export.checkpoint import (PARTIAL_INFIX, REPORT_NAME, atomic_output_dir,
                                            check_shard_size, load_pretrained)
from obs_compress.export.inspection import inspect_checkpoint, nm_holds
from obs_compress.math.masks import Pattern
from obs_compress.recipe import load_recipe


@pytest.fixture
def input_ids():
    return torch.randint(4, 128, (4, 32), generator=torch.Generator().manual_seed(2))


def pruned(family, input_ids, recipe=None):
    model = tiny_model(family)
    recipe = load_recipe(recipe or {"method": "magnitude", "sparsity": 0.5})
    report = oneshot(model, recipe, input_ids, progress=False)
    return model, recipe, report


def assert_same_tensors(model, loaded):
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs)
    for name, tensor in mine.items():
        assert tensor.dtype == theirs[name].dtype
        assert torch.equal(tensor, theirs[name]), name


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("family, auto", [("llama", "AutoModelForCausalLM"),
                                          ("gpt2", "AutoModelForCausalLM"),
                                          ("bert", "AutoModel")])
def test_round_trip_bit_for_bit(tmp_path, input_ids, family, auto):
    import transformers

    source = save_tiny(tmp_path / "source", family)
    before = folder_digest(source)
    model, recipe, report = pruned(family, input_ids)
    out = save_pretrained(model, tmp_path / "out", tokenizer=char_tokenizer(), source=source,
                          recipe=recipe, report=report)
    assert folder_digest(source) == before
    loaded = getattr(transformers, auto).from_pretrained(out)  # stock transformers, unchanged
    assert_same_tensors(model, loaded)
    with torch.no_grad():
        output = loaded(input_ids=input_ids)
    assert torch.isfinite(output[0]).all()
    if family == "gpt2":  # tied lm_head stays tied, written once
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()

    config = json.loads((out / "config.json").read_text())
    section = config["sparsity"]
    assert section["method"] == "magnitude" and section["pattern"] == "unstructured"
    assert section["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert section["targets"] == [layer.name for layer in report.layers]
    assert config["architectures"] == [type(model).__name__]
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert load_recipe(out / "recipe.yaml") == recipe
    assert json.loads((out / REPORT_NAME).read_text())["n_layers"] == len(report.layers)
    assert siblings(out) == ["out", "source"]  # no temporary folder left


def test_sharded_output_loads_back(tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    model, recipe, report = pruned("llama", input_ids)
    out = save_pretrained(model, tmp_path / "out", recipe=recipe, report=report,
                          max_shard_size="40KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())  # untied: every tensor once
    assert_same_tensors(model, AutoModelForCausalLM.from_pretrained(out))
    assert load_pretrained(out).tokenizer is None  # none was given and the model had none


def test_existing_output_is_refused_unless_overwrite(tmp_path, input_ids):
    model, recipe, report = pruned("llama", input_ids)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_pretrained(model, out, recipe=recipe, report=report)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert siblings(out) == ["out"]
    save_pretrained(model, out, recipe=recipe, report=report, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert siblings(out) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        save_pretrained(model, tmp_path / "file")


def test_empty_existing_output_is_fine(tmp_path, input_ids):
    model, recipe, report = pruned("bert", input_ids)
    (tmp_path / "out").mkdir()
    save_pretrained(model, tmp_path / "out", report=report)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_output_may_not_overlap_the_source(tmp_path, input_ids):
    source = save_tiny(tmp_path / "source", "llama")
    before = folder_digest(source)
    model, recipe, report = pruned("llama", input_ids)
    for out in (source, source / "pruned", tmp_path):
        with pytest.raises(InvalidArgument, match="overlap the source"):
            save_pretrained(model, out, source=source, overwrite=True)
    assert folder_digest(source) == before


def test_failure_leaves_nothing_behind(tmp_path, input_ids, monkeypatch):
    import obs_compress.export.checkpoint as checkpoint

    model, recipe, report = pruned("llama", input_ids)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "carry_over_source_files", broken)
    source = tmp_path / "source"
    source.mkdir()
    out = tmp_path / "deep" / "er" / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, out, source=source, recipe=recipe, report=report)
    assert not (tmp_path / "deep").exists()  # parents made for it are gone too
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(tmp_path / "out2") as partial:
            (partial / "half.safetensors").write_bytes(b"x")
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["source"]


def test_stale_partials_of_dead_runs_are_removed(tmp_path, input_ids):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out{PARTIAL_INFIX}{dead.pid}-abcdef12"
    stale.mkdir()
    alive = tmp_path / f".out{PARTIAL_INFIX}{os.getpid()}-abcdef12"
    alive.mkdir()
    model, recipe, report = pruned("bert", input_ids)
    save_pretrained(model, tmp_path / "out", report=report)
    assert not stale.exists() and alive.exists()


def test_inspect_reports_sparsity_and_nm(tmp_path, input_ids):
    model, recipe, report = pruned("llama", input_ids, {"method": "magnitude", "pattern": "2:4"})
    out = save_pretrained(model, tmp_path / "out", recipe=recipe, report=report)
    result = inspect_checkpoint(out)
    assert str(result.pattern) == "2:4"
    targets = [t for t in result.tensors if t.target]
    assert len(targets) == 14 and all(t.nm_axis == 1 and t.sparsity == 0.5 for t in targets)
    assert result.global_sparsity == pytest.approx(0.5)
    embed = next(t for t in result.tensors if "embed_tokens" in t.name)
    assert embed.nm_axis is None and not embed.target
    assert "2:4 holds in 14 of them" in result.table()


def test_inspect_checks_only_the_pattern_the_checkpoint_records(tmp_path, input_ids):
    model, recipe, report = pruned("llama", input_ids)  # unstructured
    out = save_pretrained(model, tmp_path / "unstructured", recipe=recipe, report=report)
    result = inspect_checkpoint(out)
    assert result.pattern is None and result.recorded == {}
    assert all(t.nm_axis is None for t in result.tensors)
    table = result.table()
    assert "holds" not in table and "2:4" not in table  # no N:M line at all
    assert "14 target tensors: global sparsity 0.5000" in table
    forced = inspect_checkpoint(out, pattern="2:4")  # still possible when asked for
    assert str(forced.pattern) == "2:4" and "2:4 holds in 0 of them" in forced.table()

    mixed = {"method": "magnitude", "overrides": [{"targets": ["mlp"], "pattern": "2:4"}]}
    model, recipe, report = pruned("llama", input_ids, mixed)
    out = save_pretrained(model, tmp_path / "mixed", recipe=recipe, report=report)
    result = inspect_checkpoint(out)
    assert str(result.pattern) == "2:4" and result.recorded == {"2:4": 6}
    assert "2:4 holds in 6 of them (config.json: 6 layers pruned 2:4)" in result.table()


def test_nm_holds():
    weight = torch.tensor([[0.0, 1, 0, 2, 3, 0, 0, 4]])
    assert nm_holds(weight, Pattern(2, 4), 1)
    assert not nm_holds(weight, Pattern(1, 4), 1)
    assert not nm_holds(weight, Pattern(2, 3), 1)  # 3 does not divide 8
    assert nm_holds(weight.T.contiguous(), Pattern(2, 4), 0)


def tensor_bytes(tensor):
    """The raw bytes of a tensor as stored (any dtype, bf16 too)."""
    return tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def file_tensor_bytes(folder):
    from safetensors import safe_open

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                found[name] = tensor_bytes(handle.get_tensor(name))
    return found


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_exported_tensors_equal_the_model_byte_for_byte(tmp_path, input_ids, family):
    """Every tensor in the files has the bytes of the pruned model's tensor: a pruned zero
    is +0.0 as the solver wrote it (a writer writing -0.0 passes torch.equal, not this)."""
    model, recipe, report = pruned(family, input_ids)
    out = save_pretrained(model, tmp_path / "out", recipe=recipe, report=report)
    written = file_tensor_bytes(out)
    state = model.state_dict()
    assert set(written) <= set(state) and written
    for name, data in written.items():
        assert data == tensor_bytes(state[name]), name
    targets = [f"{layer.name}.weight" for layer in report.layers]
    for name in targets:
        zeros = state[name] == 0
        assert zeros.any() and not torch.signbit(state[name][zeros]).any(), name
    # The comparison is one that a -0.0 writer fails while torch.equal passes.
    negative = state[targets[0]].clone()
    negative[negative == 0] = -0.0
    assert torch.equal(negative, state[targets[0]])
    assert tensor_bytes(negative) != written[targets[0]]


def test_files_get_umask_permissions_and_shard_sizes_are_checked(tmp_path, input_ids):
    model, recipe, report = pruned("llama", input_ids)
    out = save_pretrained(model, tmp_path / "out", recipe=recipe, report=report)
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask
    for path in out.iterdir():
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path.name
    assert check_shard_size("2GB") == 2 * 10**9 and check_shard_size("1MiB") == 2**20
    assert check_shard_size(5) == 5
    for bad in ("lots", 0, -3, True):
        with pytest.raises(BadArgument, match="max shard size"):
            check_shard_size(bad)


def test_minilm_two_of_four_round_trip(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    before = folder_digest(folder)
    model = AutoModel.from_pretrained(folder, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["Sentence embeddings map text to vectors. " * 20] * 4
    recipe = load_recipe({"method": "magnitude", "pattern": "2:4",
                          "calibration": {"n_samples": 2, "seq_len": 64}})
    report = oneshot(model, recipe, texts, tokenizer=tokenizer, progress=False)
    out = save_pretrained(model, tmp_path / "minilm-2of4", tokenizer=tokenizer, source=folder,
                          recipe=recipe, report=report)
    assert folder_digest(folder) == before
    loaded = AutoModel.from_pretrained(out)
    assert_same_tensors(model, loaded)
    assert all(t.nm_axis == 1 for t in inspect_checkpoint(out).tensors if t.target)
    assert (out / "vocab.txt").read_bytes() == (folder / "vocab.txt").read_bytes()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    assert reloaded_tokenizer("hello")["input_ids"] == tokenizer("hello")["input_ids"]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["pattern"] == "2:4"


def test_model_card_says_what_was_pruned_how_with_which_data_and_keeps_the_source_card(
        tmp_path, input_ids):
    model, recipe, report = pruned("llama", input_ids,
                                   {"method": "obs_exact", "sparsity": 0.5, "block_size": 8})
    source = tmp_path / "source"
    source.mkdir()
    (source / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- old\n---\n\n# Tiny\n\n"
                                      "A source card, kept.\n", encoding="utf-8")
    out = save_pretrained(model, tmp_path / "out", source=source, recipe=recipe, report=report)
    card = (out / "README.md").read_text(encoding="utf-8")
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["license"] == "apache-2.0" and "obs_compress" in metadata["tags"]
    assert metadata["library_name"] == "transformers"
    assert "14 layers of the block stack" in card
    assert "Sparsity asked: 50.00%, pattern `unstructured`; reached over those layers: 50.00%" in card
    assert "Method `obs_exact`" in card and "`block_size`: 8" in card
    assert "Source `c4`, 128 samples of 512 tokens" in card  # the recipe's calibration fields
    mean = sum(layer.reconstruction_loss for layer in report.layers) / len(report.layers)
    assert f"over 14 layers: {mean:.6g}" in card
    assert card.rstrip().endswith("## Source model card\n\n# Tiny\n\nA source card, kept.")


def test_model_card_of_a_model_saved_without_recipe_or_report(tmp_path):
    model = tiny_model("gpt2")
    out = save_pretrained(model, tmp_path / "out")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "Not recorded (the model was saved without its recipe)" in card
    assert "- Nothing: no perplexity was measured" in card and "Source model card" not in card
