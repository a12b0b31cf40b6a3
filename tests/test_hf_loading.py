"""Stock ``from_pretrained`` of a compressed folder (issue 12): after ``import obs_compress``
the tiny Llama, the tiny GPT-2 and all-MiniLM-L6-v2 load from ``bitmask`` and ``nm``
folders with weights whose bytes are the pruned model's; the loaded model is a plain dense
model that saves dense; ``obs_compress.load_pretrained`` takes the same path; bad files are
refused with a :class:`CheckpointFormatError` naming the tensor and the problem."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import obs_compress
from _tiny_models import save_tiny
from obs_compress.api import oneshot, prune_checkpoint, save_pretrained
from obs_compress.cli import EXIT_ERROR, main
from obs_compress.errors import CheckpointFormatError
from obs_compress.export import formats
from obs_compress.export.convert import read_stored_tensors

MAGNITUDE = {"method": "magnitude", "sparsity": 0.5}
MAGNITUDE_24 = {"method": "magnitude", "pattern": "2:4"}
WEIGHT = "model.layers.0.mlp.up_proj.weight"  # a target of the tiny Llama


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def state_bytes(model):
    return {name: (t.dtype, tuple(t.shape), t.detach().contiguous().view(torch.uint8).numpy().tobytes())
            for name, t in model.state_dict().items()}


def prune(source, out, recipe, **kwargs):
    return prune_checkpoint(source, recipe, out, dataset="none", device="cpu", progress=False,
                            **kwargs)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("format,recipe", [("bitmask", MAGNITUDE), ("nm", MAGNITUDE_24)])
def test_stock_from_pretrained_gives_the_pruned_weights_bit_for_bit(tmp_path, family, format,
                                                                    recipe):
    from transformers import AutoModelForCausalLM

    source = save_tiny(tmp_path / "source", family)
    pruned = prune(source, tmp_path / "compressed", recipe, format=format, max_shard_size="40KB",
                   streaming=False)
    assert len(list((tmp_path / "compressed").glob("*.safetensors"))) > 1  # shard by shard
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "compressed"))
    assert state_bytes(loaded) == state_bytes(pruned.model)
    # a plain dense model: nothing says quantized, so it saves dense with the same bytes
    assert not getattr(loaded, "is_quantized", False)
    assert getattr(loaded.config, "quantization_config", None) is None
    assert loaded.config.sparsity["format"] == format  # our section stays
    loaded.save_pretrained(tmp_path / "resaved")
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "quantization_config" not in config
    resaved = {name: t.contiguous().view(torch.uint8).numpy().tobytes()
               for name, t in load_file(tmp_path / "resaved" / "model.safetensors").items()}
    dense = {name: t.contiguous().view(torch.uint8).numpy().tobytes()
             for name, t, _ in read_stored_tensors(tmp_path / "compressed")}
    assert resaved == dense
    # our loader is the same path
    ours = obs_compress.load_pretrained(tmp_path / "compressed")
    assert state_bytes(ours.model) == state_bytes(pruned.model)


@pytest.mark.parametrize("format", ["bitmask", "nm"])
def test_minilm_loads_through_automodel(tmp_path, minilm_path, format):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(minilm_path)).eval()
    recipe = MAGNITUDE_24 if format == "nm" else MAGNITUDE
    report = oneshot(model, recipe, "none", progress=False)
    save_pretrained(model, tmp_path / "out", source=minilm_path, report=report, format=format)
    loaded = AutoModel.from_pretrained(str(tmp_path / "out"))
    assert state_bytes(loaded) == state_bytes(model)


def test_a_loaded_compressed_folder_prunes_again(tmp_path):
    source = save_tiny(tmp_path / "source", "llama")
    prune(source, tmp_path / "compressed", MAGNITUDE, format="bitmask")
    again = prune(tmp_path / "compressed", tmp_path / "again", {"method": "magnitude",
                                                               "sparsity": 0.7})
    assert again.report.path.startswith("in-memory (the checkpoint is stored compressed")
    assert again.report.global_sparsity > 0.6


def test_registration_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    from obs_compress.export import hf_quantizer

    before = AUTO_QUANTIZER_MAPPING[formats.QUANT_METHOD]
    hf_quantizer.register()
    hf_quantizer.register()
    assert AUTO_QUANTIZER_MAPPING[formats.QUANT_METHOD] is before


# ------------------------------------------------------------------- refusals


@pytest.fixture
def compressed(tmp_path):
    """A one-file bitmask folder of the tiny Llama, and its tensors."""
    source = save_tiny(tmp_path / "source", "llama")
    prune(source, tmp_path / "compressed", MAGNITUDE, format="bitmask")
    folder = tmp_path / "compressed"
    return folder, load_file(folder / "model.safetensors")


def rewrite(folder, tensors):
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_config(folder, change):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def refused(folder, match):
    from transformers import AutoModelForCausalLM

    with pytest.raises(CheckpointFormatError, match=match):
        AutoModelForCausalLM.from_pretrained(str(folder))


def test_truncated_file_is_refused_naming_the_tensor(compressed):
    folder, _ = compressed
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    refused(folder, r"model\.safetensors: tensor .* ends at byte \d+ of the data, the file "
                    r"holds \d+ \(truncated file\)")


def test_a_header_claiming_more_than_the_file_allocates_nothing(compressed):
    """A header whose values claim 10^12 floats is refused from the header alone."""
    folder, _ = compressed
    path = folder / "model.safetensors"
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    entry = header[f"{WEIGHT}.values"]
    entry["shape"] = [10 ** 12]
    entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0] + 4 * 10 ** 12]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    refused(folder, rf"tensor {WEIGHT}\.values ends at byte 4000000\d+ of the data")


def test_mask_and_values_disagreeing_in_count_are_refused(compressed):
    folder, tensors = compressed
    tensors[f"{WEIGHT}.values"] = tensors[f"{WEIGHT}.values"][:-1].clone()
    rewrite(folder, tensors)
    refused(folder, rf"{WEIGHT}: the mask keeps \d+ entries but {WEIGHT}\.values holds \d+")


def test_a_wrong_shape_is_refused(compressed):
    folder, tensors = compressed
    rows, cols = tensors[f"{WEIGHT}.shape"].tolist()
    tensors[f"{WEIGHT}.shape"] = torch.tensor([rows, cols * 2])
    rewrite(folder, tensors)
    refused(folder, rf"{WEIGHT}\.bitmask is uint8 \({rows}, {cols // 8}\), the shape "
                    rf"{rows}x{cols * 2} needs uint8 \({rows}, {cols // 4}\)")


def test_a_shape_the_config_does_not_give_is_refused(compressed):
    folder, tensors = compressed
    edit_config(folder, lambda c: c.update(intermediate_size=256))
    refused(folder, r"model\.layers\.0\.mlp\.down_proj\.weight: stored shape \(64, 128\), the "
                    r"model built from config\.json needs \(64, 256\)")


@pytest.mark.parametrize("name", ["zstd", "dense", "__import__('os')"])
def test_an_unknown_format_name_is_refused(compressed, name):
    folder, _ = compressed
    edit_config(folder, lambda c: c["quantization_config"].update(format=name))
    refused(folder, r"quantization_config names format .*; an obs_sparse folder is one of "
                    r"bitmask, nm")


def test_an_unknown_field_is_refused(compressed):
    folder, _ = compressed
    edit_config(folder, lambda c: c["quantization_config"].update(loader="evil.module"))
    refused(folder, r"unknown fields \['loader'\]")


def test_a_checksum_mismatch_is_refused(compressed):
    folder, tensors = compressed
    values = tensors[f"{WEIGHT}.values"].clone()
    values[3] = values[3] * 2
    tensors[f"{WEIGHT}.values"] = values
    rewrite(folder, tensors)
    refused(folder, rf"1 weight\(s\) of the obs_sparse folder failed to decode: {WEIGHT}: "
                    r"checksum mismatch")


def test_a_missing_stored_tensor_is_refused(compressed):
    folder, tensors = compressed
    del tensors[f"{WEIGHT}.crc32"]
    rewrite(folder, tensors)
    refused(folder, rf"{WEIGHT}: its stored tensors {WEIGHT}\.crc32 are missing")


def test_a_stored_tensor_for_a_weight_the_model_lacks_is_refused(compressed):
    folder, tensors = compressed
    ghost = "model.layers.7.mlp.up_proj.weight"
    for suffix in formats.stored_names("w", "bitmask"):
        tensors[f"{ghost}.{suffix}"] = tensors[f"{WEIGHT}.{suffix}"].clone()
    rewrite(folder, tensors)
    refused(folder, rf"{ghost}\.\w+: a stored bitmask tensor of {ghost}, which config\.json's "
                    "quantization_config does not list")
    edit_config(folder, lambda c: c["quantization_config"]["targets"].append(ghost))
    refused(folder, rf"{ghost}: stored in bitmask, but the model built from config\.json has no "
                    "such weight")


def test_compressed_tensors_without_the_section_are_refused_by_our_loader(compressed):
    folder, _ = compressed
    edit_config(folder, lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointFormatError, match="config.json has no quantization_config"):
        obs_compress.load_pretrained(folder)


def test_the_cli_prints_one_line_naming_the_tensor(compressed, capsys):
    folder, tensors = compressed
    del tensors[f"{WEIGHT}.values"]
    rewrite(folder, tensors)
    code = main(["eval", "--model", str(folder), "--dataset", "wikitext2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert err.startswith(f"error: {WEIGHT}: its stored tensors {WEIGHT}.values are missing")
    assert "Traceback" not in err and err.count("\n") == 1


def test_read_header_takes_every_safetensors_dtype_and_checks_its_size(tmp_path):
    from obs_compress.export.shards import read_header

    path = tmp_path / "other.safetensors"
    save_file({"fp8": torch.zeros(3, 5, dtype=torch.float8_e4m3fn),
               "u32": torch.zeros(2, dtype=torch.uint32)}, path)
    assert read_header(path)["fp8"]["shape"] == [3, 5]  # another tool's FP8 checkpoint
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    header["u32"]["shape"] = [3]  # 12 bytes claimed over an 8-byte span
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    with pytest.raises(CheckpointFormatError, match=r"tensor u32: shape \[3\] of U32 needs 12 "
                                                    r"bytes, its offsets span 8"):
        read_header(path)
