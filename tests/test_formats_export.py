"""The compressed formats through the one writer: round trips bit-identical (bytes compared)
on the tiny Llama, tiny GPT-2 and all-MiniLM-L6-v2; streaming == in-memory bytes in a
compressed format; convert dense -> bitmask -> dense gives the original bytes; nm refuses a
weight that breaks the pattern; config.json's quantization_config; inspect of a compressed
folder."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from _tiny_models import folder_digest, save_tiny, tiny_model
from obs_compress.api import prune_checkpoint, save_pretrained
from obs_compress.cli import EXIT_ERROR, main
from obs_compress.errors import CheckpointFormatError
from obs_compress.export import formats
from obs_compress.export.checkpoint import REPORT_NAME
from obs_compress.export.convert import convert_checkpoint, read_stored_tensors

MAGNITUDE = {"method": "magnitude", "sparsity": 0.5}
MAGNITUDE_24 = {"method": "magnitude", "pattern": "2:4"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def header(path):
    with path.open("rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        return json.loads(handle.read(length))


def tensors_bytes(folder):
    """Every tensor of the folder, decoded, as (dtype, shape, bytes)."""
    return {name: (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
            for name, t, _ in read_stored_tensors(folder)}


def model_bytes(model):
    return {name: t.detach().contiguous().view(torch.uint8).numpy().tobytes()
            for name, t in model.state_dict().items()}


def prune(source, out, recipe, **kwargs):
    return prune_checkpoint(source, recipe, out, dataset="none", device="cpu", progress=False,
                            **kwargs)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("format,recipe", [("bitmask", MAGNITUDE), ("nm", MAGNITUDE_24)])
def test_streaming_equals_in_memory_and_decodes_to_the_pruned_weights(tmp_path, family,
                                                                      format, recipe):
    source = save_tiny(tmp_path / "source", family, layers=3)
    for shard in ("2GB", "40KB"):
        streamed = prune(source, tmp_path / f"streamed-{shard}", recipe, format=format,
                         max_shard_size=shard)
        loaded = prune(source, tmp_path / f"loaded-{shard}", recipe, format=format,
                       max_shard_size=shard, streaming=False)
        assert streamed.report.path == "streaming" and loaded.report.path.startswith("in-memory")
        a = {k: v for k, v in folder_digest(tmp_path / f"streamed-{shard}").items()
             if k != REPORT_NAME}
        b = {k: v for k, v in folder_digest(tmp_path / f"loaded-{shard}").items()
             if k != REPORT_NAME}
        assert a == b
    # decoded tensors, byte for byte, are the in-memory pruned model's state dict
    decoded = tensors_bytes(tmp_path / "loaded-2GB")
    state = model_bytes(loaded.model)
    for name, (_, _, data) in decoded.items():
        assert data == state[name], name
    # the index names the stored tensors; the layout is the dense one
    index = json.loads((tmp_path / "loaded-40KB" / "model.safetensors.index.json").read_text())
    dense = prune(source, tmp_path / "dense", recipe, max_shard_size="40KB")
    dense_index = json.loads((tmp_path / "dense" / "model.safetensors.index.json").read_text())
    assert dense.report.global_sparsity == loaded.report.global_sparsity
    config = json.loads((tmp_path / "loaded-2GB" / "config.json").read_text())
    section = config[formats.QUANTIZATION_CONFIG_KEY]
    assert section[formats.QUANT_METHOD_KEY] == "obs_sparse"
    assert section["format"] == format and config["sparsity"]["format"] == format
    assert section["pattern"] == ("2:4" if format == "nm" else None)
    assert section["targets"] == sorted(f"{layer.name}.weight" for layer in loaded.report.layers)
    assert section["global_sparsity"] == config["sparsity"]["global_sparsity"]
    for weight in section["targets"]:
        names = formats.stored_names(weight, format).values()
        files = {index["weight_map"][n] for n in names}
        assert files == {dense_index["weight_map"][weight]}  # the dense layout's file
        assert weight not in index["weight_map"]
    shard = header(tmp_path / "loaded-2GB" / "model.safetensors")
    if family == "gpt2" and format == "nm":  # Conv1D: groups along the rows (its input dim)
        pattern = shard["transformer.h.0.mlp.c_fc.weight.pattern"]
        assert pattern["shape"] == [3]
    total = sum(e["data_offsets"][1] - e["data_offsets"][0]
                for f in set(index["weight_map"].values())
                for n, e in header(tmp_path / "loaded-40KB" / f).items() if n != "__metadata__")
    assert index["metadata"]["total_size"] == total < dense_index["metadata"]["total_size"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dense_output_has_no_quantization_section(tmp_path, family):
    source = save_tiny(tmp_path / "source", family)
    prune(source, tmp_path / "out", MAGNITUDE)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert formats.QUANTIZATION_CONFIG_KEY not in config
    assert config["sparsity"]["format"] == "dense"


def _prune_in_memory(model, pattern=None):
    from obs_compress.api import oneshot

    return oneshot(model, {"method": "magnitude", **({"pattern": pattern} if pattern
                                                     else {"sparsity": 0.6})},
                   "none", progress=False)


@pytest.mark.parametrize("format", ["bitmask", "nm"])
def test_minilm_round_trip_bytes(tmp_path, minilm_path, format):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(minilm_path)).eval()
    report = _prune_in_memory(model, "2:4" if format == "nm" else None)
    save_pretrained(model, tmp_path / "out", source=minilm_path, report=report, format=format)
    decoded = tensors_bytes(tmp_path / "out")
    state = model_bytes(model)
    assert set(decoded) == set(state)
    for name, (_, _, data) in decoded.items():
        assert data == state[name], name
    assert (tmp_path / "out" / "modules.json").is_file()  # side files carried over
    size = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert size < 0.8 * (minilm_path / "model.safetensors").stat().st_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convert_dense_to_bitmask_to_dense_gives_the_original_bytes(tmp_path, dtype, capsys):
    model = tiny_model("llama", layers=2).to(dtype)
    report = _prune_in_memory(model)
    dense = save_pretrained(model, tmp_path / "dense", report=report)
    before = folder_digest(dense)
    assert main(["convert", str(dense), str(tmp_path / "bitmask"), "--format", "bitmask"]) == 0
    assert main(["convert", str(tmp_path / "bitmask"), str(tmp_path / "back"),
                 "--format", "dense"]) == 0
    assert folder_digest(dense) == before  # never written
    back = folder_digest(tmp_path / "back")
    assert back["model.safetensors"] == before["model.safetensors"]
    assert json.loads(back["config.json"]) == json.loads(before["config.json"])
    card = (tmp_path / "bitmask" / "README.md").read_text()
    assert "Converted by `obs-compress convert`" in card and "format `bitmask`" in card
    assert (tmp_path / "back" / REPORT_NAME).read_bytes() == before[REPORT_NAME]
    # dense -> nm needs a pattern: this model is unstructured
    assert main(["convert", str(dense), str(tmp_path / "nm"), "--format", "nm"]) == EXIT_ERROR
    assert "N:M pattern" in capsys.readouterr().err and not (tmp_path / "nm").exists()


def test_nm_refuses_a_weight_that_breaks_the_pattern_naming_it(tmp_path, capsys):
    source = save_tiny(tmp_path / "source", "llama")
    prune(source, tmp_path / "unstructured", MAGNITUDE)
    code = main(["convert", str(tmp_path / "unstructured"), str(tmp_path / "nm"),
                 "--format", "nm", "--pattern", "2:4"])
    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert "model.layers.0." in err and "breaks the 2:4 pattern" in err
    assert not (tmp_path / "nm").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(CheckpointFormatError, match="unknown weight format"):
        prune(source, tmp_path / "x", MAGNITUDE, format="csr")


def test_prune_cli_format_nm_and_a_corrupt_file_is_refused(tmp_path, capsys):
    source = save_tiny(tmp_path / "source", "gpt2")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: magnitude\npattern: '2:4'\n")
    assert main(["prune", "--model", str(source), "--recipe", str(recipe), "--out",
                 str(tmp_path / "nm"), "--dataset", "none", "--format", "nm",
                 "--no-progress"]) == 0
    capsys.readouterr()
    path = tmp_path / "nm" / "model.safetensors"
    data = bytearray(path.read_bytes())
    entry = header(path)["transformer.h.1.mlp.c_proj.weight.values"]
    offset = 8 + struct.unpack("<Q", bytes(data[:8]))[0] + entry["data_offsets"][0]
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["convert", str(tmp_path / "nm"), str(tmp_path / "d"), "--format",
                 "dense"]) == EXIT_ERROR
    assert "transformer.h.1.mlp.c_proj.weight: checksum mismatch" in capsys.readouterr().err


def test_inspect_shows_format_and_sizes(tmp_path, capsys):
    source = save_tiny(tmp_path / "source", "llama")
    prune(source, tmp_path / "dense", MAGNITUDE)
    prune(source, tmp_path / "bitmask", MAGNITUDE, format="bitmask")
    assert main(["inspect", str(tmp_path / "bitmask"), "--json"]) == 0
    compressed = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(tmp_path / "dense"), "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert compressed["format"] == "bitmask" and dense["format"] == "dense"
    assert compressed["global_sparsity"] == dense["global_sparsity"] > 0.45
    by_name = {t["name"]: t for t in compressed["tensors"]}
    for t in dense["tensors"]:
        assert by_name[t["name"]]["sparsity"] == t["sparsity"]
        assert by_name[t["name"]]["dense_bytes"] == t["stored_bytes"] == t["dense_bytes"]
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    numel = q["shape"][0] * q["shape"][1]
    kept = numel - round(q["sparsity"] * numel)
    assert q["stored_bytes"] == kept * 4 + q["shape"][0] * q["shape"][1] // 8 + 8 * 3
    assert compressed["stored_bytes"] < dense["stored_bytes"]
    assert compressed["dense_bytes"] == dense["dense_bytes"]
    assert main(["inspect", str(tmp_path / "bitmask")]) == 0
    text = capsys.readouterr().out
    assert "format bitmask" in text and "stored" in text


def test_a_restored_writer_finishes_a_compressed_checkpoint_to_the_same_bytes(tmp_path):
    """A resumed run: the staged (encoded) tensors of a first writer are picked up by a
    second one, whose shapes come from the staging files' headers."""
    from obs_compress.export.checkpoint import resolve_nm_pattern
    from obs_compress.export.encoding import plan_encodings
    from obs_compress.export.shards import STAGING_DIR, ShardWriter, checkpoint_layout

    model = tiny_model("gpt2", layers=3)
    report = _prune_in_memory(model, "2:4")
    layout = checkpoint_layout(model, 40_000)
    encodings = plan_encodings(model, layout.sources, "nm", [s.name for s in report.layers],
                               resolve_nm_pattern("nm", ["2:4"]))
    state = model.state_dict()
    names = list(state)
    whole = tmp_path / "whole"
    whole.mkdir()
    writer = ShardWriter(whole, layout, encodings)
    writer.add(state, label="all")
    writer.finish()
    parts = tmp_path / "parts"
    parts.mkdir()
    first = ShardWriter(parts, layout, encodings)
    first.add({n: state[n] for n in names[: len(names) // 2 + 1]}, label="a")
    assert first.staged and first.written != {}
    second = ShardWriter(parts, layout, encodings)
    second.restore(first.staged, first.written)
    second.add({n: state[n] for n in names[len(names) // 2 + 1:]}, label="b")
    second.finish()
    for file in layout.files:
        assert (parts / file).read_bytes() == (whole / file).read_bytes()
    assert ((parts / "model.safetensors.index.json").read_bytes()
            == (whole / "model.safetensors.index.json").read_bytes())
    assert (parts / STAGING_DIR).is_dir()  # the caller deletes the consumed staging files
