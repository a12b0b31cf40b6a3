"""Tests of obs_compress.evaluate: perplexity against a hand computation, and the protocol.

The ``slow`` test checks the dense SmolLM2-135M figures of ``../shared/data/README.md``
(WikiText-2 24.14, C4 30.80); run it with ``pytest -m slow tests/test_evaluate.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from obs_compress.data import evaluation_windows, protocol_texts
from obs_compress.errors import InvalidArgument, NonFiniteError
from obs_compress.evaluate import PerplexityResult, evaluate_protocol, perplexity


def tiny_llama(vocab_size: int = 97, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def hand_mean_nll(model: LlamaForCausalLM, windows: torch.Tensor) -> float:
    """Mean next-token NLL, one window at a time, in float64 from the logits."""
    nlls = []
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0].double()  # (T, V)
            log_probs = torch.log_softmax(logits[:-1], dim=-1)  # position t predicts t + 1
            nlls.append(-log_probs[torch.arange(len(window) - 1), window[1:]])
    return torch.cat(nlls).mean().item()


@pytest.fixture
def windows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 97, (5, 17), generator=generator)  # (n_windows, window)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_perplexity_matches_hand_computation(windows, batch_size):
    model = tiny_llama()
    expected = hand_mean_nll(model, windows)
    result = perplexity(model, windows, batch_size=batch_size)
    assert isinstance(result, PerplexityResult)
    assert result.n_tokens == 5 * 16
    assert result.mean_nll == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-6)


def test_perplexity_restores_training_mode(windows):
    model = tiny_llama()
    expected = perplexity(model, windows)
    model.train()
    assert perplexity(model, windows) == expected
    assert model.training


def test_perplexity_rejects_bad_windows_and_nan_models(windows):
    model = tiny_llama()
    with pytest.raises(InvalidArgument, match=r"got \(17,\)"):
        perplexity(model, windows[0])
    with pytest.raises(InvalidArgument, match="integer token ids"):
        perplexity(model, windows.float())
    with pytest.raises(InvalidArgument, match="batch_size"):
        perplexity(model, windows, batch_size=0)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="NaN logits on windows 0..0"):
        perplexity(model, windows)


def test_evaluate_protocol_scores_each_data_set(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = tiny_llama(vocab_size=len(tokenizer))
    results = evaluate_protocol(
        model, tokenizer, n_windows={"wikitext2": 2, "c4": 1}, window=16
    )
    assert set(results) == {"wikitext2", "c4"}
    assert results["wikitext2"].n_tokens == 2 * 15 and results["c4"].n_tokens == 15
    direct = perplexity(
        model, evaluation_windows(tokenizer, protocol_texts("c4"), window=16, n_windows=1)
    )
    assert results["c4"] == direct


@pytest.mark.slow
def test_dense_smollm2_matches_readme_figures(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    results = evaluate_protocol(model, tokenizer)
    assert results["wikitext2"].n_tokens == 40_920 and results["c4"].n_tokens == 20_460
    assert results["wikitext2"].perplexity == pytest.approx(24.14, abs=0.02)
    assert results["c4"].perplexity == pytest.approx(30.80, abs=0.02)
