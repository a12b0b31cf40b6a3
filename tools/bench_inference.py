"""Benchmark sparse inference: the dense masked model against ``sparse_inference`` in one run.

For each pruning configuration (magnitude, ``--recipe`` with ``sparsity=0.5``, ``pattern=2:4``,
``sparsity=0.7``; speed does not depend on which weights are pruned, only on how many and
where), the model is loaded, pruned in place (the dense masked model), copied, and the copy
swapped by :func:`obs_compress.sparse_inference` (``--policy``, default ``auto``). Then, with
dense and sparse runs interleaved round by round (alternating which goes first, so a change
in the machine's load hits both alike; best round of each):

* decode: at each ``--decode-batches`` size (default 1 and 8), a 16-token prompt, then
  ``--decode-steps`` one-token calls through the KV cache, greedy; tokens per second of those
  calls (batch x steps / seconds), the whole model (embeddings, attention, ``lm_head``)
  included;
* prefill: one ``--prefill-tokens``-token forward, batch 1; tokens per second;
* per layer kind (``self_attn.q_proj`` ...): one call at 1 and 8 tokens and at ``--prefill-tokens``
  on every block's layer of that kind in turn (so the weights are not cache-resident, as in
  the model), the time per layer;
* memory: the bytes the model's weights hold (parameters + sparse storage), and the peak
  above the resident model during a decode and a prefill: allocated bytes on CUDA, the
  process's resident set on CPU (Linux; a lower bound, see :func:`_peak_extra_mb`).

Models: ``--model FOLDER`` (default: SmolLM2-135M-Instruct in ``.cache/models``), or
``--random-llama 8b`` (the Llama-3-8B shapes from ``tools/make_random_llama.py``, built on the
device with random weights, seed 0: nothing is read from disk).

    python tools/bench_inference.py --device cpu --markdown out/bench_inference_cpu.md
    python tools/bench_inference.py --device cuda --dtype bfloat16 --random-llama 8b

Prints the tables (Markdown) on stdout and, with ``--json``, writes every figure after each
configuration. Run it on an otherwise quiet machine and not ``nice``d; report ``uptime``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"50%": ["sparsity=0.5"], "2:4": ["pattern=2:4"], "70%": ["sparsity=0.7"]}
PROMPT_TOKENS = 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(function, device: torch.device) -> float:
    _sync(device)
    began = time.perf_counter()
    function()
    _sync(device)
    return time.perf_counter() - began


def load_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if args.random_llama:
        sys.path.insert(0, str(REPO / "tools"))
        from make_random_llama import llama_config

        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(args.random_llama, dtype)).to(dtype)
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    return model.to(device).eval()


@torch.no_grad()
def decode(model, device: torch.device, steps: int, vocab: int, batch: int = 1) -> float:
    """Tokens per second of ``steps`` one-token calls of ``batch`` rows after a prompt (greedy)."""
    prompt = torch.randint(0, vocab, (batch, PROMPT_TOKENS),
                           generator=torch.Generator().manual_seed(0))
    out = model(prompt.to(device), use_cache=True)

    def steps_():
        nonlocal out
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = model(token, past_key_values=out.past_key_values, use_cache=True)

    return batch * steps / _seconds(steps_, device)


@torch.no_grad()
def prefill(model, device: torch.device, tokens: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)
    return tokens / _seconds(lambda: model(ids, use_cache=False), device)


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_extra_mb(function, device: torch.device) -> float | None:
    """Peak memory above what was held when ``function`` started, in MB. CUDA: allocated
    bytes. CPU (Linux): the process's resident set, whose peak (VmHWM) is reset through
    ``/proc/self/clear_refs`` first; freed memory that the allocator reuses without returning
    it to the system is not counted, so it is a lower bound. None where neither is readable."""
    if device.type != "cuda":
        before = _rss_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
        except OSError:
            before = None
        function()
        peak = _rss_kib("VmHWM")
        return None if before is None or peak is None else (peak - before) * 1024 / 1e6
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    function()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - resident) / 1e6


def weight_mb(model, report=None) -> float:
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    if report is not None:
        held += sum(layer.weight_bytes for layer in report.swapped)
    return held / 1e6


@torch.no_grad()
def layer_times(dense, sparse, device: torch.device, dtype: torch.dtype, tokens: tuple[int, ...],
                rounds: int) -> list[dict]:
    """Per layer kind: milliseconds per layer, dense and sparse, each token count."""
    from obs_compress.model.blocks import find_block_stack, find_layers

    dense_stack = find_block_stack(dense)
    sparse_blocks = sparse.get_submodule(dense_stack.name)  # every Linear swapped: no "stack" left
    prefix = dense_stack.block_name(0) + "."
    kinds = [layer.name[len(prefix):] for layer in find_layers(dense_stack.modules[0],
                                                               dense_stack.block_name(0))]
    rows = []
    for kind in kinds:
        dense_layers = [block.get_submodule(kind) for block in dense_stack.modules]
        sparse_layers = [block.get_submodule(kind) for block in sparse_blocks]
        row = {"layer": kind, "shape": f"{dense_layers[0].out_features}x{dense_layers[0].in_features}",
               "sparse_path": type(sparse_layers[0]).__name__ == "SparseLinear"
               and sparse_layers[0].decode or "dense"}
        for count in tokens:
            x = torch.randn(count, dense_layers[0].in_features, dtype=dtype, device=device)
            best = {"dense": float("inf"), "sparse": float("inf")}
            for index in range(rounds):
                order = (("dense", dense_layers), ("sparse", sparse_layers))
                for name, layers in order if index % 2 == 0 else order[::-1]:
                    seconds = _seconds(lambda: [layer(x) for layer in layers], device)
                    best[name] = min(best[name], seconds * 1e3 / len(layers))
            row[f"dense_ms_{count}"], row[f"sparse_ms_{count}"] = best["dense"], best["sparse"]
        rows.append(row)
    return rows


def run_config(args, name: str, device: torch.device, dtype: torch.dtype) -> dict:
    from obs_compress import load_recipe, oneshot, sparse_inference

    dense = load_model(args, device, dtype)
    vocab = dense.config.vocab_size
    recipe = load_recipe(args.recipe).with_updates(CONFIGS[name])
    oneshot(dense, recipe, progress=False)
    sparse = copy.deepcopy(dense)
    began = time.perf_counter()
    report = sparse_inference(sparse, policy=args.policy)
    swap_s = time.perf_counter() - began
    print(report.table(), file=sys.stderr)
    best = {f"{model}_{phase}": 0.0 for model in ("dense", "sparse")
            for phase in [f"decode_b{batch}" for batch in args.decode_batches] + ["prefill"]}
    peaks: dict[str, float | None] = {}
    for model in (dense, sparse):  # warm-up: one-time allocations out of the peaks
        decode(model, device, 2, vocab)
        prefill(model, device, args.prefill_tokens, vocab)
    for model_name, model in (("dense", dense), ("sparse", sparse)):
        peaks[f"{model_name}_decode"] = _peak_extra_mb(
            lambda: decode(model, device, 2, vocab), device)
        peaks[f"{model_name}_prefill"] = _peak_extra_mb(
            lambda: prefill(model, device, args.prefill_tokens, vocab), device)
    for index in range(args.rounds):
        order = (("dense", dense), ("sparse", sparse))
        for batch in args.decode_batches:
            for model_name, model in order if index % 2 == 0 else order[::-1]:
                key = f"{model_name}_decode_b{batch}"
                best[key] = max(best[key], decode(model, device, args.decode_steps, vocab, batch))
        for model_name, model in order if index % 2 == 0 else order[::-1]:
            if index < args.prefill_rounds:
                best[f"{model_name}_prefill"] = max(
                    best[f"{model_name}_prefill"], prefill(model, device, args.prefill_tokens, vocab))
        print(f"[{name}] round {index + 1}/{args.rounds}: {best}", file=sys.stderr, flush=True)
    layers = layer_times(dense, sparse, device, dtype, (1, 8, args.prefill_tokens), args.layer_rounds)
    paths: dict[str, int] = {}
    for layer in report.layers:
        key = f"{layer.decode}/{layer.prefill}"
        paths[key] = paths.get(key, 0) + 1
    result = {"config": name, **best,
              **{f"decode_b{batch}_ratio": best[f"sparse_decode_b{batch}"] / best[f"dense_decode_b{batch}"]
                 for batch in args.decode_batches},
              "prefill_ratio": best["sparse_prefill"] / best["dense_prefill"],
              "dense_weight_mb": weight_mb(dense), "sparse_weight_mb": weight_mb(sparse, report),
              "peak_extra_mb": peaks, "paths": paths, "swap_s": swap_s, "layers": layers,
              "reasons": sorted({layer.reason for layer in report.layers})[:8]}
    del dense, sparse
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def machine(device: torch.device) -> dict:
    def command(*argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "(unavailable)"

    cpu = next((line.split(":", 1)[1].strip() for line in command("lscpu").splitlines()
                if line.startswith("Model name")), platform.processor())
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "uptime_before": command("uptime"),
            "commit": command("git", "-C", str(REPO), "rev-parse", "--short", "HEAD"),
            "dirty": bool(command("git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"))}


def markdown(meta: dict, results: list[dict], args) -> str:
    lines = [f"Device: {meta['device']} ({meta['cpu_threads']} torch threads), torch {meta['torch']}, "
             f"{args.dtype}, commit {meta['commit']}{' (dirty)' if meta['dirty'] else ''}; "
             f"model {meta['model']}; policy {args.policy}.",
             f"Load before: `{meta['uptime_before']}`; after: `{meta.get('uptime_after', '')}`.",
             f"Decode: batch {', '.join(map(str, args.decode_batches))}, {args.decode_steps} tokens "
             f"after a {PROMPT_TOKENS}-token prompt, best of {args.rounds} interleaved rounds; "
             f"prefill: {args.prefill_tokens} tokens, best of {args.prefill_rounds}. Tokens/s.", ""]
    decode_heads = [f"decode b{batch} dense / sparse / ratio" for batch in args.decode_batches]
    lines += ["| pruned | layers (decode/prefill path: count) | " + " | ".join(decode_heads)
              + " | prefill dense / sparse / ratio | weights MB dense / sparse "
              "| peak extra MB decode d/s | peak extra MB prefill d/s |",
              "| --- | --- | " + " | ".join("---" for _ in decode_heads) + " | --- | --- | --- | --- |"]

    def peak(result, phase):
        values = [result["peak_extra_mb"][f"{model}_{phase}"] for model in ("dense", "sparse")]
        return "n/a" if values[0] is None else f"{values[0]:.0f} / {values[1]:.0f}"

    for result in results:
        paths = ", ".join(f"{key}: {count}" for key, count in sorted(result["paths"].items()))
        decodes = [f"{result[f'dense_decode_b{batch}']:.2f} / {result[f'sparse_decode_b{batch}']:.2f} / "
                   f"**{result[f'decode_b{batch}_ratio']:.2f}x**" for batch in args.decode_batches]
        lines.append(f"| {result['config']} | {paths} | " + " | ".join(decodes)
                     + f" | {result['dense_prefill']:.1f} / {result['sparse_prefill']:.1f} / "
                     f"{result['prefill_ratio']:.2f}x | {result['dense_weight_mb']:.0f} / "
                     f"{result['sparse_weight_mb']:.0f} | {peak(result, 'decode')} | "
                     f"{peak(result, 'prefill')} |")
    count = args.prefill_tokens
    lines += ["", f"Per layer (ms per layer, each block's layer in turn; best of {args.layer_rounds}; "
              "dense / sparse / ratio):", "",
              "| pruned | layer | shape | sparse path | 1 tok | 8 tok | " f"{count} tok |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        for row in result["layers"]:
            cells = [f"{row[f'dense_ms_{n}']:.3f} / {row[f'sparse_ms_{n}']:.3f} / "
                     f"{row[f'dense_ms_{n}'] / row[f'sparse_ms_{n}']:.2f}x" for n in (1, 8, count)]
            lines.append(f"| {result['config']} | {row['layer']} | {row['shape']} | "
                         f"{row['sparse_path']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / ".cache/models/SmolLM2-135M-Instruct")
    parser.add_argument("--random-llama", choices=("8b", "1b", "tiny"), default=None,
                        help="build this tools/make_random_llama.py preset on the device instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes/magnitude-50.yaml")
    parser.add_argument("--configs", default="50%,2:4,70%", help=f"from {list(CONFIGS)}")
    parser.add_argument("--policy", choices=("auto", "always"), default="auto")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--decode-batches", default="1,8", help="decode batch sizes (default 1,8)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved decode rounds")
    parser.add_argument("--prefill-rounds", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--layer-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    try:
        args.decode_batches = [int(batch) for batch in args.decode_batches.split(",") if batch.strip()]
    except ValueError:
        parser.error(f"--decode-batches must be integers separated by commas, got {args.decode_batches!r}")
    if not args.decode_batches or min(args.decode_batches) < 1:
        parser.error("--decode-batches needs at least one batch size >= 1")
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {unknown}: choose from {list(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    meta = machine(device)
    meta["model"] = f"random Llama preset {args.random_llama}" if args.random_llama else args.model.name
    results = []
    for name in configs:
        results.append(run_config(args, name, device, dtype))
        meta["uptime_after"] = machine(device)["uptime_before"]
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"machine": meta, "args": {k: str(v) for k, v in vars(args).items()},
                                             "results": results}, indent=1))
    table = markdown(meta, results, args)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
