"""Write a randomly initialised Llama, a word-level tokenizer and calibration text to a folder.

For checks that need a model of a real size and no download (``tools/gpu_check.sh``): the
folder loads with ``obs-compress prune --model OUT --dataset OUT/calibration.jsonl`` like any
Hugging Face checkpoint. Nothing in it is trained; the weights are ``transformers``' own
initialisation (normal, std ``initializer_range``) under ``torch.manual_seed(seed)`` on CPU,
so the same seed and library versions give the same tensors.

Presets (``LlamaConfig`` fields; untied embeddings, vocabulary 32,000 unless said):

* ``1b``: the Llama-3.2-1B body (hidden 2048, intermediate 8192, 16 layers, 32 heads,
  8 key/value heads) with a 32,000-word vocabulary: 1,104,218,112 parameters, of which
  973,078,528 in the 112 prunable Linear layers (16 blocks x q, k, v, o, gate, up, down).
* ``1.5b``: the same body with 24 layers: 1,590,790,144 parameters (6.4 GB in fp32), the
  size ``tools/bench_streaming.py`` compares the streaming and in-memory paths on.
* ``8b``: the Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 layers, 32 heads,
  8 key/value heads, vocabulary 128,256): 8,030,261,248 parameters. For
  ``tools/bench_inference.py``, which builds it on the GPU with :func:`llama_config` instead of
  writing 16 GB to disk.
* ``tiny``: hidden 64, intermediate 128, 2 layers, 4 heads, 2 key/value heads, 512 words:
  for a CPU dry run in seconds.

Stored in bfloat16 by default, as released Llama checkpoints are: half the bytes of fp32
(2.2 GB for ``1b``), and the pruning path then runs its block forwards in bf16 while the
solver works in fp32 (``prune_weight`` upcasts), which is the case to exercise. ``--dtype
float32`` for the other one.

The tokenizer (``tokenizers`` WordLevel, whitespace split, ``<unk>``/``<s>``/``</s>`` = 0/1/2)
has one token per generated pseudo-word, so no training is needed; ``calibration.jsonl``
holds ``--documents`` documents of ``--words`` words drawn Zipf-like from that vocabulary
(``{"text": ...}`` per line, the file format ``--dataset`` reads).

    python tools/make_random_llama.py /tmp/llama-1b --preset 1b --seed 0
    python tools/make_random_llama.py /tmp/llama-tiny --preset tiny
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

PRESETS = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "1.5b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
CALIBRATION_FILE = "calibration.jsonl"
# Zipf-like word frequencies, p(rank) ~ 1 / (rank + ZIPF_OFFSET): a few frequent words and
# a long tail, so the calibration text reaches many embedding rows unevenly, as text does.
ZIPF_OFFSET = 10
_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"


def llama_config(preset: str, dtype: torch.dtype):
    from transformers import LlamaConfig

    return LlamaConfig(**PRESETS[preset], max_position_embeddings=2048,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       dtype=dtype)


def pseudo_words(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct lowercase words of 2 to 4 consonant-vowel syllables."""
    words: dict[str, None] = {}
    while len(words) < count:
        syllables = rng.randint(2, 4)
        words["".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS)
                      for _ in range(syllables))] = None
    return list(words)


def word_tokenizer(words: list[str]):
    """A fast tokenizer with one id per word after the special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({word: len(SPECIAL_TOKENS) + i for i, word in enumerate(words)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def documents(words: list[str], *, count: int, length: int, rng: random.Random) -> list[str]:
    """``count`` documents of ``length`` words, lines of 12 words."""
    weights = [1.0 / (rank + ZIPF_OFFSET) for rank in range(len(words))]
    texts = []
    for _ in range(count):
        drawn = rng.choices(words, weights=weights, k=length)
        lines = [" ".join(drawn[i:i + 12]) for i in range(0, length, 12)]
        texts.append("\n".join(lines))
    return texts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, metavar="OUT_FOLDER")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--layers", type=int, default=None,
                        help="override the preset's num_hidden_layers (e.g. 2 for a quick "
                             "per-block memory profile of the preset's shapes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--documents", type=int, default=16,
                        help="calibration documents (default 16)")
    parser.add_argument("--words", type=int, default=2048,
                        help="words (= tokens) per calibration document (default 2048)")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} exists and is not empty")

    from transformers import LlamaForCausalLM

    began = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    config = llama_config(args.preset, dtype)
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    parameters = sum(p.numel() for p in model.parameters())
    prunable = sum(module.weight.numel() for module in model.model.layers.modules()
                   if isinstance(module, torch.nn.Linear))
    model.save_pretrained(args.out)

    rng = random.Random(args.seed)
    words = pseudo_words(config.vocab_size - len(SPECIAL_TOKENS), rng)
    word_tokenizer(words).save_pretrained(args.out)
    texts = documents(words, count=args.documents, length=args.words, rng=rng)
    with (args.out / CALIBRATION_FILE).open("w", encoding="utf-8") as file:
        for text in texts:
            file.write(json.dumps({"text": text}) + "\n")

    stored = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
    print(f"wrote {args.out}: LlamaForCausalLM preset {args.preset}, {parameters:,} parameters "
          f"({prunable:,} in the block Linears), {args.dtype}, {stored / 1e9:.2f} GB of "
          f"safetensors; tokenizer of {config.vocab_size:,} words; {CALIBRATION_FILE} "
          f"({args.documents} documents x {args.words} words); "
          f"{time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
