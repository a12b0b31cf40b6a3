"""Tiny models built from configs, saved as Hugging Face folders, for the plumbing tests.

Each has a character-level tokenizer whose 128 ids are the ASCII characters, so any text
(the shared C4 file, a .txt written by a test) calibrates it without a download.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 128
HIDDEN = 64


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(VOCAB)}
    vocab["\x00"] = 0  # id 0 doubles as the unknown token
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="\x00"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="\x00", eos_token="\x03",
                                   bos_token="\x02", pad_token="\x01")


def tiny_config(family: str, layers: int = 2):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if family == "llama":
        return LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                           max_position_embeddings=256, tie_word_embeddings=False,
                           bos_token_id=2, eos_token_id=3, pad_token_id=1)
    if family == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_layer=layers, n_head=4, vocab_size=VOCAB,
                          n_positions=256, bos_token_id=2, eos_token_id=3)
    if family == "bert":
        return BertConfig(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=4,
                          intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256)
    raise ValueError(family)


def tiny_model(family: str, layers: int = 2, seed: int = 0):
    from transformers import BertModel, GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(seed)
    model_class = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel, "bert": BertModel}[family]
    model = model_class(tiny_config(family, layers))
    # Norms start at exactly 1 and biases at 0: perturb them so "untouched" is a real check.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name or "LayerNorm" in name or name.endswith("bias"):
                param.add_(0.01 * torch.randn_like(param))
    return model.eval()


def save_tiny(folder: Path, family: str, layers: int = 2) -> Path:
    model = tiny_model(family, layers)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def write_text_file(path: Path, n_documents: int = 40, length: int = 600, seed: int = 0) -> Path:
    """A .jsonl of ASCII documents long enough for the tests' seq_len."""
    generator = torch.Generator().manual_seed(seed)
    words = ["the", "model", "prunes", "weights", "with", "second", "order", "curvature",
             "and", "a", "block", "of", "text", "runs", "through", "layers"]
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(n_documents):
            picks = torch.randint(len(words), (length // 4,), generator=generator).tolist()
            handle.write(json.dumps({"text": " ".join(words[i] for i in picks)}) + "\n")
    return path


def minilm_folder() -> Path:
    from convert_gguf import minilm_path  # tools/, on the path through conftest.py

    return minilm_path()


def folder_digest(folder: Path) -> dict[str, bytes]:
    """Every file's bytes under ``folder`` (to check a source is left untouched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def hook_snapshot(model) -> dict[str, tuple[frozenset, frozenset]]:
    """The forward hooks and pre-hooks of every module (transformers installs some of its own
    on a first ``output_hidden_states`` forward, so tests compare against a snapshot)."""
    return {name: (frozenset(m._forward_hooks), frozenset(m._forward_pre_hooks))
            for name, m in model.named_modules()}


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
