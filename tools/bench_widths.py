"""CPU prefill and decode speed of a model's config at smaller widths, with random weights.

Speed does not depend on training, so the widths a structured recipe would leave can be timed
without pruning: each ``--widths`` entry (``key=value[,key=value]`` config overrides, such as
``intermediate_size=1229`` or ``intermediate_size=1229,num_attention_heads=6``) is built
from ``--model``'s ``config.json`` with random weights (seed 0) beside the unchanged config,
and timed against it interleaved round by round (best of ``--rounds``,
``bench_structured.speeds``), so load on the machine hits both alike. Beside each ratio
the table gives the bound that the arithmetic allows: the ratio of multiply-adds per token
(linear layers, plus attention scores over a causal prompt of ``--prefill-tokens``) for
prefill, and of parameters for decode, which at batch 1 reads every weight once per token.

    python tools/bench_widths.py --widths intermediate_size=1229 intermediate_size=1216 \\
        intermediate_size=1229,num_attention_heads=6 intermediate_size=1216,num_attention_heads=6
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from bench_structured import DEFAULT_MODEL, speeds  # noqa: E402


def parse_widths(text: str) -> dict[str, int]:
    """``"a=1,b=2"`` -> ``{"a": 1, "b": 2}``; refuses anything else."""
    overrides = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip().isdigit():
            raise SystemExit(f"--widths entry {text!r}: expected key=integer[,key=integer]")
        overrides[key.strip()] = int(value)
    return overrides


def multiply_adds(model, prompt_tokens: int) -> float:
    """Multiply-adds per token of a causal prompt: every Linear's weight, plus the attention
    scores and weighted values over ``prompt_tokens / 2`` keys on average per query head."""
    config = model.config
    linear = sum(module.weight.numel() for module in model.modules()
                 if isinstance(module, torch.nn.Linear))
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size
                                                     // config.num_attention_heads)
    scores = (config.num_hidden_layers * config.num_attention_heads * head_dim * 2
              * prompt_tokens / 2)
    return linear + scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="a folder with config.json (its weights are not read)")
    parser.add_argument("--widths", nargs="+", required=True, metavar="KEY=N[,KEY=N]")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=64)
    args = parser.parse_args(argv)
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoConfig.from_pretrained(args.model)
    variants = {"dense": {}, **{text: parse_widths(text) for text in args.widths}}
    models = {}
    for name, overrides in variants.items():
        unknown = [key for key in overrides if not hasattr(base, key)]
        if unknown:
            raise SystemExit(f"--widths {name!r}: the config has no {', '.join(unknown)}")
        config = AutoConfig.from_pretrained(args.model, **overrides)
        torch.manual_seed(0)
        models[name] = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    measured = speeds(models, args, base.vocab_size)
    dense = models["dense"]
    print(f"{args.model.name} config, random weights; {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f} at the end; prefill {args.prefill_tokens} "
          f"tokens, decode {args.decode_steps} steps, best of {args.rounds}\n")
    print("| widths | parameters | prefill tok/s | x dense (bound) | decode tok/s | "
          "x dense (bound) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, model in models.items():
        parameters = sum(p.numel() for p in model.parameters())
        prefill_ratio = measured[f"{name}_prefill"] / measured["dense_prefill"]
        decode_ratio = measured[f"{name}_decode"] / measured["dense_decode"]
        prefill_bound = (multiply_adds(dense, args.prefill_tokens)
                         / multiply_adds(model, args.prefill_tokens))
        decode_bound = sum(p.numel() for p in dense.parameters()) / parameters
        print(f"| {name} | {parameters:,} | {measured[f'{name}_prefill']:.1f} | "
              f"{prefill_ratio:.3f} ({prefill_bound:.3f}) | {measured[f'{name}_decode']:.2f} | "
              f"{decode_ratio:.3f} ({decode_bound:.3f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
