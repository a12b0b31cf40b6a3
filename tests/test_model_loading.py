"""Loading: missing paths named, pickle refused unless allowed, remote code never run unasked."""

from __future__ import annotations

import json

import pytest
import torch

from _tiny_models import minilm_folder, save_tiny, tiny_model
from obs_compress.errors import ModelLoadError
from obs_compress.model.loading import load_model


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub access in tests (huggingface_hub reads HF_HUB_OFFLINE once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_missing_local_path_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="no such folder") as info:
        load_model(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model("./relative/missing/folder")


def test_hub_id_goes_to_the_hub_and_fails_clearly_offline():
    with pytest.raises(ModelLoadError, match="'obs-compress-test/no-such-model'"):
        load_model("obs-compress-test/no-such-model")


def test_folder_without_config_or_weights(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "a")
    (tmp_path / "a" / "x.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="convert_gguf"):
        load_model(tmp_path / "a")
    folder = tmp_path / "b"
    tiny_model("llama").config.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="holds no weights"):
        load_model(folder)


def test_pickle_weights_need_allow_pickle(tmp_path):
    model = tiny_model("llama")
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(folder)
    loaded = load_model(folder, allow_pickle=True, load_tokenizer=False).model
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_remote_code_is_not_run_without_trust(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    sentinel = tmp_path / "code-ran"
    code = f"open({str(sentinel)!r}, 'w').write('x')\n"
    (folder / "configuration_custom.py").write_text(code)
    (folder / "modeling_custom.py").write_text(code)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "obs-compress-custom",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomModel"}}))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(folder)
    assert not sentinel.exists()


def test_loads_the_saved_architecture(tmp_path):
    folder = save_tiny(tmp_path / "gpt2", "gpt2")
    loaded = load_model(folder)
    assert type(loaded.model).__name__ == "GPT2LMHeadModel"
    assert loaded.tokenizer is not None and loaded.local_folder == folder.resolve()
    assert not loaded.model.training


def test_minilm_loads_as_its_base_model():
    loaded = load_model(minilm_folder())
    assert type(loaded.model).__name__ == "BertModel"
    assert loaded.tokenizer("hello")["input_ids"][0] == loaded.tokenizer.cls_token_id
