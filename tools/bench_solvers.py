"""Solver benchmark on real SmolLM2-135M layer Hessians (CPU).

For three layer shapes of SmolLM2-135M (576x576 q_proj, 1536x576 up_proj, 576x1536 down_proj)
the Hessian H = 2 X^T X / n is accumulated from real activations (calibration by the shared
protocol: C4 documents [0:1000], seed 0). Each solver prunes the real weight at 50%, 2:4 and
70%; the table gives its reconstruction error trace(dW H dW^T) / 2 relative to magnitude
pruning, and its CPU time. obs_exact costs O(d_out d_in^3): it runs on the first
`--exact-rows` rows only (row allocation on both sides of the ratio) and its time is
extrapolated to the whole layer.

    python tools/bench_solvers.py --out docs/bench_solvers.json            # ~30-60 min on 2 cores
    python tools/bench_solvers.py --n-samples 16 --layers q_proj --quick   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from obs_compress import HessianAccumulator, prune_weight
from obs_compress.algorithms.sparsegpt import sparsegpt
from obs_compress.data import DATA_DIR_ENV, calibration_samples, load_texts
from obs_compress.math import parse_pattern, prepare_curvature
from convert_gguf import ensure_smollm2

LAYERS = {  # name -> (block, module path inside the block)
    "q_proj": (2, "self_attn.q_proj"),
    "up_proj": (25, "mlp.up_proj"),
    "down_proj": (25, "mlp.down_proj"),
}
PATTERNS = [("50%", "unstructured", 0.5), ("2:4", "2:4", 0.5), ("70%", "unstructured", 0.7)]


def layer_hessians(model, tokens, layer_names, batch_size=8):
    """Real H of each chosen layer from one forward over the calibration tokens."""
    accumulators, handles = {}, []
    last_block = max(LAYERS[name][0] for name in layer_names)
    for name in layer_names:
        block, path = LAYERS[name]
        module = model.model.layers[block].get_submodule(path)
        accumulators[name] = HessianAccumulator(module.in_features, name=name)
        handles.append(module.register_forward_pre_hook(
            lambda mod, args, acc=accumulators[name]: acc.add_batch(args[0].detach())))

    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop

    handles.append(model.model.layers[last_block].register_forward_hook(stop))
    try:
        with torch.inference_mode():
            for start in range(0, tokens.shape[0], batch_size):
                try:
                    model(tokens[start:start + batch_size], use_cache=False)
                except Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    weights = {name: model.model.layers[LAYERS[name][0]].get_submodule(LAYERS[name][1])
               .weight.detach().float().clone() for name in layer_names}
    return {name: acc.finalize() for name, acc in accumulators.items()}, weights


def error(new_weight, weight, hessian):
    delta = new_weight - weight
    return ((delta @ hessian) * delta).sum().item() / 2


def timed(function):
    start = time.perf_counter()
    out = function()
    return out, time.perf_counter() - start


def run_layer(name, weight, curvature, args):
    rows = []
    hessian = curvature.hessian
    for label, pattern, sparsity in PATTERNS:
        base, _ = timed(lambda: prune_weight(weight, curvature, method="magnitude",
                                             sparsity=sparsity, pattern=pattern))
        base_error = error(base.weight, weight, hessian)

        def add(method, new_weight, seconds, note=""):
            rows.append(dict(layer=name, shape=list(weight.shape), pattern=label, method=method,
                             relative_error=error(new_weight, weight, hessian) / base_error,
                             seconds=seconds, note=note))

        add("magnitude", base.weight, 0.0)
        result, seconds = timed(lambda: prune_weight(weight, curvature, method="obd",
                                                     sparsity=sparsity, pattern=pattern))
        add("obd", result.weight, seconds)
        prepared = prepare_curvature(curvature, 0.01, upper_factor=True)
        (one_shot, _, _), seconds = timed(lambda: sparsegpt(
            weight, prepared, sparsity=sparsity, pattern=parse_pattern(pattern), block_size=128))
        add("sparsegpt-style (B=128)", one_shot, seconds)
        for block_size in args.block_sizes:
            for refit in (False, True):
                result, seconds = timed(lambda: prune_weight(
                    weight, curvature, method="obs_blockwise", sparsity=sparsity, pattern=pattern,
                    block_size=block_size, refit=refit))
                add(f"obs_blockwise (B={block_size}{', refit' if refit else ''})",
                    result.weight, seconds)
        if args.exact_rows:
            subset = weight[:args.exact_rows]
            allocation = "row"
            magnitude_rows = prune_weight(subset, curvature, method="magnitude", sparsity=sparsity,
                                          pattern=pattern, allocation=allocation)
            result, seconds = timed(lambda: prune_weight(
                subset, curvature, method="obs_exact", sparsity=sparsity, pattern=pattern,
                allocation=allocation))
            ratio = error(result.weight, subset, hessian) / error(magnitude_rows.weight, subset, hessian)
            rows.append(dict(layer=name, shape=list(weight.shape), pattern=label,
                             method="obs_exact (row alloc.)", relative_error=ratio,
                             seconds=seconds * weight.shape[0] / subset.shape[0],
                             note=f"first {subset.shape[0]} rows, time extrapolated"))
    return rows


def markdown(rows):
    lines = ["| layer | shape | pattern | method | error / magnitude | CPU s | note |",
             "| --- | --- | --- | --- | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['pattern']} | "
                     f"{r['method']} | {r['relative_error']:.4f} | {r['seconds']:.2f} | {r['note']} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="SmolLM2 folder (default: convert once)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"folder holding the shared c4/ files (default: ${DATA_DIR_ENV})")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--exact-rows", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = args.model or ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    texts = load_texts("c4", start=0, stop=1000, data_dir=args.data_dir)
    tokens = calibration_samples(tokenizer, texts, n_samples=args.n_samples, seq_len=args.seq_len,
                                 seed=0)
    curvatures, weights = layer_hessians(model, tokens, args.layers)
    del model
    rows = []
    for name in args.layers:
        rows += run_layer(name, weights[name], curvatures[name], args)
        print(markdown([r for r in rows if r["layer"] == name]), flush=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\n{machine}; torch {torch.__version__}; {args.n_samples}x{args.seq_len} calibration tokens")
    print(markdown(rows))
    if args.out:
        args.out.write_text(json.dumps(dict(machine=machine, torch=torch.__version__,
                                            n_samples=args.n_samples, seq_len=args.seq_len,
                                            rows=rows), indent=1))


if __name__ == "__main__":
    main()
