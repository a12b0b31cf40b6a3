"""Structured removal benchmark (issue 14): perplexity, size and CPU speed of the smaller models.

Every variant runs in one process on SmolLM2-135M-Instruct (or ``--model``), each from a
fresh copy of the dense model, with the protocol's calibration tensors and evaluation
windows (``../shared/data/README.md``; built once by ``tools/bench_quality.py``'s
``build_protocol_data``, digests checked):

* prune with :func:`obs_compress.oneshot` and the variant's recipe (``sparsity: 0`` and a
  ``structured`` section), which shrinks the model in place;
* WikiText-2 and C4 perplexity of the shrunk model (40 and 20 windows of 1024 tokens);
* its parameter count and the bytes of its safetensors files (written with
  :func:`obs_compress.save_pretrained` to a temporary folder, then deleted);
* with ``--speed``: prefill (one ``--prefill-tokens`` forward, batch 1) and decode (16-token
  prompt, then ``--decode-steps`` one-token steps through the KV cache, batch 1) tokens per
  second of the shrunk model and of the dense one, interleaved round by round (best of
  ``--rounds``), so load on the machine hits both alike.

Variants are named ``<units>-<score>[-s<shots>]``: units ``mlp10``/``mlp20``/``mlp30`` (that
percentage of every block's MLP channels), ``hpg`` (3 of 9 query heads, one per key/value
group), ``hwg`` (one whole key/value group: 3 query heads and their key/value head), or
``mlp20+hpg``; score ``norm`` (weight norm, no compensation), ``act`` (``||W_:,j||
||X_j||``, no compensation), ``obs`` (layer-wise structured OBS), ``kron`` (Kronecker
structured OBS, ``G`` of the block output); ``-s3``: in 3 shots. ``dense`` is the
unpruned model.

    python tools/bench_structured.py --out /tmp/bench-structured \\
        --variants dense,mlp20-act,mlp20-obs,mlp20+hpg-obs --speed

Writes ``OUT.json`` after every variant (a killed run loses one) and ``OUT.md`` (the table).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from bench_inference import decode, prefill  # noqa: E402
from bench_quality import (EVAL_SETS, PROTOCOL_N_SAMPLES, PROTOCOL_SEQ_LEN,  # noqa: E402
                           PROTOCOL_WINDOWS, build_protocol_data, evaluate, load_dense,
                           machine_info, versions)

logger = logging.getLogger("bench_structured")
DEFAULT_MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
UNITS = {"mlp10": {"mlp_fraction": 0.1}, "mlp20": {"mlp_fraction": 0.2},
         "mlp30": {"mlp_fraction": 0.3},
         "hpg": {"heads": "per_group", "heads_removed": 3},
         "hwg": {"heads": "whole_group", "heads_removed": 3},
         "mlp20+hpg": {"mlp_fraction": 0.2, "heads": "per_group", "heads_removed": 3}}
SCORES = {"norm": ("weight_norm", "hessian"), "act": ("activation", "hessian"),
          "obs": ("obs", "hessian"), "kron": ("obs", "kronecker")}
DEFAULT_VARIANTS = ("dense,mlp20-norm,mlp20-act,mlp20-obs,mlp20-kron,mlp20-obs-s3,"
                    "hpg-act,hpg-obs,hwg-act,hwg-obs,mlp20+hpg-obs")


def variant_recipe(name: str) -> dict:
    """The recipe of variant ``name`` (see the module docstring)."""
    match = re.fullmatch(r"(?P<units>[a-z0-9+]+)-(?P<score>[a-z]+)(?:-s(?P<shots>\d+))?", name)
    if not match or match["units"] not in UNITS or match["score"] not in SCORES:
        raise SystemExit(f"unknown variant {name!r}: <units>-<score>[-s<shots>] with units "
                         f"{', '.join(UNITS)} and score {', '.join(SCORES)}")
    score, curvature = SCORES[match["score"]]
    return {"sparsity": 0, "dampening_frac": 0.01,
            "structured": {**UNITS[match["units"]], "score": score,
                           "shots": int(match["shots"] or 1)},
            "curvature": {"kind": curvature},
            "calibration": {"source": "c4", "n_samples": PROTOCOL_N_SAMPLES,
                            "seq_len": PROTOCOL_SEQ_LEN}}


def file_bytes(model) -> int:
    from obs_compress import save_pretrained

    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, Path(folder) / "out")
        return sum(f.stat().st_size for f in (Path(folder) / "out").glob("*.safetensors"))


def speeds(models: dict, args, vocab: int) -> dict[str, float]:
    """Best-of-rounds prefill and decode tokens/s of each model, interleaved by round."""
    best = {f"{name}_{phase}": 0.0 for name in models for phase in ("prefill", "decode")}
    device = torch.device("cpu")
    for model in models.values():  # warm-up
        prefill(model, device, 64, vocab)
        decode(model, device, 2, vocab)
    for index in range(args.rounds):
        order = list(models.items())
        for name, model in order if index % 2 == 0 else order[::-1]:
            best[f"{name}_prefill"] = max(best[f"{name}_prefill"],
                                          prefill(model, device, args.prefill_tokens, vocab))
            best[f"{name}_decode"] = max(best[f"{name}_decode"],
                                         decode(model, device, args.decode_steps, vocab))
    return best


def markdown(meta: dict, rows: list[dict]) -> str:
    dense = next((row for row in rows if row["variant"] == "dense"), None)
    lines = [f"Structured removal on {meta['model_name']} ({meta['machine']['cpu']}, "
             f"{meta['machine']['cores_usable']} cores; "
             f"commit {meta['versions'].get('obs_compress_git')}; "
             f"started {meta['started']}). Perplexity by the shared protocol.", "",
             "| variant | score | shots | WikiText-2 | C4 | parameters | file MB | "
             "prefill tok/s (x dense) | decode tok/s (x dense) | prune s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        structured = row.get("recipe", {}).get("structured", {})
        curvature = row.get("recipe", {}).get("curvature", {}).get("kind", "")
        score = (f"{structured.get('score')}" + (f" ({curvature})" if structured.get("score") == "obs"
                                                 else "")) if structured else "-"
        speed = ""
        for phase in ("prefill", "decode"):
            value = row.get(f"{phase}_tok_s")
            ratio = row.get(f"{phase}_vs_dense")
            speed += (f" {value:.1f} ({ratio:.3f}x) |" if value and ratio else
                      f" {value:.1f} |" if value else " - |")
        lines.append(f"| {row['variant']} | {score} | {structured.get('shots', '-')} | "
                     f"{row['wikitext2_ppl']:.2f} | {row['c4_ppl']:.2f} | {row['parameters']:,} | "
                     f"{row['file_bytes'] / 1e6:.1f} |{speed} "
                     f"{row.get('prune_seconds', 0):.0f} |")
    if dense:
        lines += ["", f"dense: WikiText-2 {dense['wikitext2_ppl']:.2f}, C4 {dense['c4_ppl']:.2f}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--speed", action="store_true", help="time prefill and decode against dense")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--resume", action="store_true", help="skip variants OUT.json has")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import obs_compress
    from transformers import AutoTokenizer

    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    recipes = {name: variant_recipe(name) for name in names if name != "dense"}  # checks all first
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = build_protocol_data(tokenizer, n_samples=PROTOCOL_N_SAMPLES, seq_len=PROTOCOL_SEQ_LEN,
                               n_windows=dict(PROTOCOL_WINDOWS), check_digests=True)
    json_path = args.out.with_suffix(".json")
    rows = json.loads(json_path.read_text())["results"] if args.resume and json_path.exists() else []
    meta = {"model": str(args.model), "model_name": args.model.name, "machine": machine_info(),
            "versions": versions(), "protocol": data.description,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    dense = load_dense(args.model)
    vocab = dense.config.vocab_size
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        if any(row["variant"] == name for row in rows):
            continue
        logger.info("variant %s", name)
        model = dense if name == "dense" else copy.deepcopy(dense)
        row: dict = {"variant": name}
        if name != "dense":
            row["recipe"] = recipes[name]
            start = time.perf_counter()
            report = obs_compress.oneshot(model, recipes[name], data.calibration, progress=False)
            row["prune_seconds"] = time.perf_counter() - start
            row["reconstruction_loss"] = sum(s.reconstruction_loss for s in report.structure)
            # each block's removed units and predicted loss, to compare two variants' choices
            row["removed"] = [stats.to_dict() for stats in report.structure]
            row["config"] = {key: getattr(model.config, key) for key in (
                "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")}
        row.update(evaluate(model, data.windows))
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["file_bytes"] = file_bytes(model)
        if args.speed:
            measured = speeds({"dense": dense} if name == "dense" else
                              {"dense": dense, "model": model}, args, vocab)
            key = "dense" if name == "dense" else "model"
            for phase in ("prefill", "decode"):
                row[f"{phase}_tok_s"] = measured[f"{key}_{phase}"]
                row[f"dense_{phase}_tok_s"] = measured[f"dense_{phase}"]
                row[f"{phase}_vs_dense"] = measured[f"{key}_{phase}"] / measured[f"dense_{phase}"]
            row["load_average"] = list(os.getloadavg())
        rows.append(row)
        logger.info("%s: %s", name, {k: v for k, v in row.items() if k not in ("recipe",)})
        json_path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        args.out.with_suffix(".md").write_text(markdown(meta, rows))
        if model is not dense:
            del model
            gc.collect()
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
