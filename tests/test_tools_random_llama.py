"""tools/make_random_llama.py: the preset sizes it states, and a folder the CLI can calibrate on."""

import json

import pytest
import torch


@pytest.fixture(scope="module")
def tool():
    import make_random_llama  # tools/, on the path through conftest.py

    return make_random_llama


def test_1b_preset_has_the_stated_parameter_count(tool):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(tool.llama_config("1b", torch.bfloat16))
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(p.numel() for p in model.parameters()) == 1_104_218_112
    assert len(linears) == 112 and sum(m.weight.numel() for m in linears) == 973_078_528


def test_tiny_folder_loads_and_its_calibration_text_tokenizes(tool, tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "tiny"
    assert tool.main([str(out), "--preset", "tiny", "--seed", "3", "--documents", "3",
                      "--words", "600"]) == 0
    assert "139,584 parameters" in capsys.readouterr().out
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = [json.loads(line)["text"] for line in
             (out / tool.CALIBRATION_FILE).read_text().splitlines()]
    assert len(texts) == 3
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 600  # one token per word, none unknown
        assert min(ids) >= len(tool.SPECIAL_TOKENS) and max(ids) < model.config.vocab_size
    # The same seed gives the same weights.
    again = tmp_path / "again"
    assert tool.main([str(again), "--preset", "tiny", "--seed", "3", "--documents", "3",
                      "--words", "600"]) == 0
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert (out / "calibration.jsonl").read_bytes() == (again / "calibration.jsonl").read_bytes()
