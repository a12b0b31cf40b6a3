"""Benchmark the OBS kernels and solvers against a SparseGPT-style one-shot-threshold solver.

For each layer shape and pattern (50% unstructured, 2:4) it times, with the reconstruction
error ``trace(dW H dW^T) / 2`` (raw, undamped ``H``) beside each time:

* ``sparsegpt`` (torch): the peer baseline, written here (:func:`sparsegpt_reference`).
* ``obs_blockwise`` (torch / triton): the full solver, ``obs_compress.prune_weight(...,
  method="obs_blockwise", backend=...)``, block 128, ``--allocation`` (default ``layer``).
* ``in-block step`` (torch / triton): ``greedy_obs`` alone on every 128-column block of the
  layer with its conditional inverse (same prunes per row, no propagation): the kernel's
  share of ``obs_blockwise``. Default on CUDA; ``--kernel-step`` on CPU, where it is most of
  the torch solver's time anyway. Also used when ``prune_weight`` cannot be imported.
* ``obs_exact`` (batched torch, 32 rows a step / triton scratch kernel) on the first
  ``--exact-rows`` rows, where ``d_in <= --exact-max-width``; the error column compares
  with SparseGPT's on the same rows.

Shapes (``d_out x d_in``): SmolLM2-135M (576x576, 1536x576, 576x1536) and Llama-3-8B
(q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336; CUDA only), or any
``--shape DOUTxDIN``. Weights are synthetic; ``H = 2 X^T X / n``
from synthetic correlated inputs (low-rank factors, noise, uneven channel scales and a few
outlier channels, as in LLM activations). Timing: CUDA events after warm-up, median of
``--repeats``; on CPU ``time.perf_counter``, median. Triton rows run only on CUDA (the CPU
interpreter is for correctness tests, not timing).

    python tools/bench_kernels.py --device cpu --shapes smol          # a few minutes
    python tools/bench_kernels.py --device cuda --shapes all --json out/bench_h100.json

Prints a Markdown table on stdout, progress on stderr, and writes every figure to JSON
(and the table to ``--markdown``) after each shape and pattern, so a run stopped early keeps
what it measured. ``--budget-s`` starts no new shape and pattern past that many seconds; every
shape runs at the first pattern before any at the next.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger("bench_kernels")

SHAPES = {
    "smol": [(576, 576), (1536, 576), (576, 1536)],
    "llama": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
}
PATTERNS = ("50%", "2:4")
BLOCK_SIZE = 128
DAMPENING_FRAC = 0.01


@dataclass
class Row:
    shape: str
    pattern: str
    solver: str
    backend: str
    time_s: float | None = None
    error: float | None = None
    error_vs_sparsegpt: float | None = None
    peak_mib: float | None = None
    note: str = ""
    times_s: list = field(default_factory=list)


# ---- Problem ---------------------------------------------------------------------------------


def synthetic_layer(d_out: int, d_in: int, *, seed: int, device: torch.device):
    """Weights ``(d_out, d_in)`` and ``H = 2 X^T X / n`` from ``n = 2 d_in`` correlated tokens."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rank = max(8, d_in // 8)
    basis = (torch.randn(rank, d_in, generator=g) / math.sqrt(rank)).to(device)
    channel_scale = 0.2 + 3 * torch.rand(d_in, generator=g)
    outliers = torch.randperm(d_in, generator=g)[: max(1, d_in // 256)]
    channel_scale[outliers] *= 20  # a few massive-activation channels
    channel_scale = channel_scale.to(device)
    n_tokens, chunk = 2 * d_in, 2048
    hessian = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
    for start in range(0, n_tokens, chunk):
        size = min(chunk, n_tokens - start)
        factors = torch.randn(size, rank, generator=g).to(device)
        noise = torch.randn(size, d_in, generator=g).to(device)
        x = (factors @ basis + 0.3 * noise) * channel_scale
        hessian.addmm_(x.T.double(), x.double(), alpha=2.0 / n_tokens)
    weight = (0.02 * torch.randn(d_out, d_in, generator=g)).to(device)
    return weight, hessian.float()


def reconstruction_error(new_weight: torch.Tensor, weight: torch.Tensor,
                         hessian: torch.Tensor) -> float:
    """``trace(dW H dW^T) / 2`` in float64."""
    delta = (new_weight - weight).double()
    return 0.5 * ((delta @ hessian.double()) * delta).sum().item()


def _prune_count(total: int, sparsity: float) -> int:
    return int(math.floor(sparsity * total + 0.5))


def _upper_factor(hessian: torch.Tensor,
                  dampening_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped ``H^-1`` and upper ``U`` with ``H^-1 = U^T U``, in float64 then the input dtype."""
    damped = hessian.double().clone()
    diagonal = damped.diagonal()
    dead = diagonal == 0
    damped[dead, :] = 0
    damped[:, dead] = 0
    diagonal[dead] = 1.0
    diagonal.add_(dampening_frac * diagonal.mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
    upper = torch.linalg.cholesky(inverse, upper=True)
    return inverse.to(hessian.dtype), upper.to(hessian.dtype)


# ---- The peer baseline -----------------------------------------------------------------------


def sparsegpt_reference(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float,
                        nm: tuple[int, int] | None, block_size: int = BLOCK_SIZE,
                        dampening_frac: float = DAMPENING_FRAC):
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1) as a one-shot-threshold solver.

    Per block of ``block_size`` columns the mask is fixed before the block is touched: the
    lowest ``w^2 / U_jj^2`` over the whole block (every row; the block's share of the layer's
    count), or for N:M the ``M - N`` lowest of each group when its first column comes up.
    Columns are then zeroed left to right, each error ``w_j / U_jj`` spread over the rest of
    the block along ``U_j,:``, and the block's errors over later columns in one matmul.
    Returns ``(weight, mask)``.
    """
    rows, width = weight.shape
    _, upper = _upper_factor(hessian, dampening_frac)
    work = weight.clone()
    mask = torch.zeros_like(weight, dtype=torch.bool)
    for start in range(0, width, block_size):
        stop = min(start + block_size, width)
        block_upper = upper[start:stop, start:stop]
        pivots = block_upper.diagonal()
        block = work[:, start:stop]  # a view: updates land in ``work``
        block_mask = torch.zeros_like(block, dtype=torch.bool)
        if nm is None:
            count = _prune_count(rows * stop, sparsity) - _prune_count(rows * start, sparsity)
            if count:
                score = (block / pivots) ** 2
                lowest = torch.topk(score.flatten(), count, largest=False).indices
                block_mask.view(-1)[lowest] = True
        errors = torch.empty_like(block)
        for j in range(stop - start):
            if nm is not None and j % nm[1] == 0:
                group = slice(j, j + nm[1])
                score = (block[:, group] / pivots[group]) ** 2
                lowest = torch.topk(score, nm[1] - nm[0], dim=1, largest=False).indices
                block_mask[:, group].scatter_(1, lowest, True)
            target = block[:, j].masked_fill(block_mask[:, j], 0)
            error = (block[:, j] - target) / pivots[j]
            block[:, j:].sub_(error[:, None] * block_upper[j, j:])
            block[:, j] = target
            errors[:, j] = error
        mask[:, start:stop] = block_mask
        if stop < width:
            work[:, stop:].sub_(errors @ upper[start:stop, stop:])
    return work.masked_fill(mask, 0), mask


# ---- Timing ----------------------------------------------------------------------------------


def measure(fn, device: torch.device, *, warmup: int, repeats: int):
    """Median seconds over ``repeats`` calls after ``warmup``; returns (median, times, result,
    peak MiB above the memory in use before the calls, CUDA only)."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        for _ in range(repeats):
            began = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times), times, result, peak


def _import_prune_weight():
    try:
        from obs_compress import prune_weight
    except (ImportError, AttributeError) as error:
        logger.warning("obs_compress.prune_weight unavailable (%s): timing the kernel on blocks",
                       error)
        return None
    return prune_weight


def _block_step(weight, upper, nm, sparsity, backend):
    """greedy_obs on every block with its conditional inverse ``U_FF^T U_FF``; timing only."""
    from obs_compress_kernels import greedy_obs

    rows, width = weight.shape
    outputs = []
    for start in range(0, width, BLOCK_SIZE):
        stop = min(start + BLOCK_SIZE, width)
        block_upper = upper[start:stop, start:stop]
        inverse = block_upper.T @ block_upper
        columns = stop - start
        if nm is None:
            steps = _prune_count(columns, sparsity)
            groups = {}
        else:
            steps = columns // nm[1] * (nm[1] - nm[0])
            groups = dict(group_size=nm[1], group_prune=nm[1] - nm[0])
        counts = torch.full((rows,), steps, dtype=torch.long, device=weight.device)
        outputs.append(greedy_obs(weight[:, start:stop], inverse, counts, steps, backend=backend,
                                  **groups).weight)
    return torch.cat(outputs, dim=1)


def _exact_rows(weight, inverse, nm, sparsity, backend):
    """obs_exact on a few rows: batched torch (32-row chunks, bmm downdates) or Triton."""
    from obs_compress_kernels import greedy_obs, greedy_obs_torch

    rows, width = weight.shape
    if nm is None:
        steps, groups = _prune_count(width, sparsity), {}
    else:
        steps = width // nm[1] * (nm[1] - nm[0])
        groups = dict(group_size=nm[1], group_prune=nm[1] - nm[0])
    counts = torch.full((rows,), steps, dtype=torch.long, device=weight.device)
    if backend == "torch":
        return greedy_obs_torch(weight, inverse, counts, steps, row_chunk=32, **groups).weight
    return greedy_obs(weight, inverse, counts, steps, backend="triton", **groups).weight


# ---- Driver ----------------------------------------------------------------------------------


def bench_layer(d_out, d_in, pattern, args, device, prune_weight):
    shape = f"{d_out}x{d_in}"
    nm = (2, 4) if pattern == "2:4" else None
    sparsity = 0.5
    weight, hessian = synthetic_layer(d_out, d_in, seed=args.seed * 1_000_003 + 31 * d_out + d_in,
                                      device=device)
    backends = ["torch"] + (["triton"] if device.type == "cuda" else [])
    timing = dict(warmup=args.warmup, repeats=args.repeats)
    # The torch rows compile nothing; at Llama shapes on CUDA each call is seconds of kernel
    # launches, so --torch-repeats can time them fewer times and without a warm-up.
    torch_timing = (timing if args.torch_repeats is None
                    else dict(warmup=0, repeats=args.torch_repeats))
    rows: list[Row] = []

    def record(solver, backend, fn, *, error_of=None, baseline=None, note=""):
        logger.info("%s %s: %s (%s)", shape, pattern, solver, backend)
        median, times, result, peak = measure(
            fn, device, **(torch_timing if backend == "torch" else timing))
        error = error_of(result) if error_of is not None else None
        row = Row(shape, pattern, solver, backend, median, error,
                  error / baseline if error is not None and baseline else None, peak, note, times)
        rows.append(row)
        return row, result

    baseline, (sparse_weight, _) = record(
        "sparsegpt", "torch",
        lambda: sparsegpt_reference(weight, hessian, sparsity=sparsity, nm=nm),
        error_of=lambda out: reconstruction_error(out[0], weight, hessian))
    baseline.error_vs_sparsegpt = 1.0

    if prune_weight is not None:
        for backend in backends:
            record("obs_blockwise", backend,
                   lambda backend=backend: prune_weight(
                       weight, hessian, method="obs_blockwise", sparsity=sparsity,
                       pattern=pattern if nm else "unstructured", allocation=args.allocation,
                       block_size=BLOCK_SIZE, dampening_frac=DAMPENING_FRAC, backend=backend),
                   error_of=lambda out: reconstruction_error(out.weight, weight, hessian),
                   baseline=baseline.error,
                   note="" if nm else f"allocation={args.allocation}")

    if args.kernel_step or prune_weight is None:
        _, upper = _upper_factor(hessian, DAMPENING_FRAC)
        for backend in backends:
            record("in-block step", backend,
                   lambda backend=backend: _block_step(weight, upper, nm, sparsity, backend),
                   note="greedy_obs on every block, no propagation")

    if args.exact_rows and d_in <= args.exact_max_width:
        inverse, _ = _upper_factor(hessian, DAMPENING_FRAC)
        subset = weight[: args.exact_rows]
        sub_hessian_error = reconstruction_error(sparse_weight[: args.exact_rows], subset, hessian)
        for backend in backends:
            label = "batched torch, 32 rows a step" if backend == "torch" else "scratch kernel"
            record("obs_exact", backend,
                   lambda backend=backend: _exact_rows(subset, inverse, nm, sparsity, backend),
                   error_of=lambda out: reconstruction_error(out, subset, hessian),
                   baseline=sub_hessian_error,
                   note=f"first {subset.shape[0]} rows ({label})")
    del weight, hessian
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "",
             "| shape (d_out x d_in) | pattern | solver | backend | time (ms) | error "
             "tr(dW H dW^T)/2 | error / SparseGPT | peak extra (MiB) | note |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]

    def number(value, digits):
        if value is None:
            return "—"
        return f"{value:,.0f}" if abs(value) >= 10 ** digits else f"{value:.{digits}g}"

    for row in rows:
        time_ms = None if row.time_s is None else row.time_s * 1e3
        lines.append(f"| {row.shape} | {row.pattern} | {row.solver} | {row.backend} | "
                     f"{number(time_ms, 4)} | {number(row.error, 4)} | "
                     f"{number(row.error_vs_sparsegpt, 3)} | {number(row.peak_mib, 4)} | "
                     f"{row.note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--shapes", choices=("smol", "llama", "all"), default="smol")
    parser.add_argument("--patterns", default=",".join(PATTERNS),
                        help="comma-separated, from: " + ", ".join(PATTERNS).replace("%", "%%"))
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per figure, median reported (default 5 CUDA, 1 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="default 1 on CUDA, 0 on CPU")
    parser.add_argument("--torch-repeats", type=int, default=None,
                        help="timed runs of the torch rows, with no warm-up (default: as "
                             "--repeats and --warmup)")
    parser.add_argument("--kernel-step", action=argparse.BooleanOptionalAction, default=None,
                        help="also time greedy_obs alone on the blocks (default: on for CUDA)")
    parser.add_argument("--exact-rows", type=int, default=32,
                        help="rows for the obs_exact timing (0 skips it)")
    parser.add_argument("--exact-max-width", type=int, default=None,
                        help="largest d_in for obs_exact (default 4096 CUDA, 576 CPU)")
    parser.add_argument("--allocation", choices=("layer", "row"), default="layer",
                        help="obs_blockwise's allocation for unstructured sparsity (default layer, "
                             "the library's default; row is about 3x faster on the torch path)")
    parser.add_argument("--shape", action="append", default=[], metavar="DOUTxDIN",
                        help="a layer shape to run instead of --shapes (repeatable)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new shape and pattern once this many seconds have passed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None,
                        help="output file (default out/bench_kernels_<device>.json)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write the table here (rewritten after each shape and pattern)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    args.repeats = args.repeats or (5 if on_cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (1 if on_cuda else 0)
    args.kernel_step = on_cuda if args.kernel_step is None else args.kernel_step
    if args.torch_repeats is not None and args.torch_repeats < 1:
        parser.error("--torch-repeats must be at least 1")
    args.exact_max_width = args.exact_max_width or (4096 if on_cuda else 576)
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    unknown = set(patterns) - set(PATTERNS)
    if unknown:
        parser.error(f"--patterns: unknown {sorted(unknown)}; choose from {PATTERNS}")
    if args.shape:
        shapes = [_parse_shape(parser, text) for text in args.shape]
    elif args.shapes == "all":
        shapes = SHAPES["smol"] + SHAPES["llama"]
    else:
        shapes = SHAPES[args.shapes]
    if not on_cuda and not args.shape and any(shape in SHAPES["llama"] for shape in shapes):
        logger.warning("Llama-3-8B shapes run on CUDA only: skipped on CPU")
        shapes = [shape for shape in shapes if shape not in SHAPES["llama"]]
    if not shapes:
        parser.error("no shapes left to run: the Llama-3-8B shapes need --device cuda")

    prune_weight = _import_prune_weight()
    device_name = torch.cuda.get_device_name(device) if on_cuda else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    header = (f"Device: {device_name}; torch {torch.__version__}, triton {triton_version}; "
              f"median of {args.repeats} after {args.warmup} warm-up"
              + ("" if args.torch_repeats is None else
                 f" (torch rows: {args.torch_repeats} run(s), no warm-up)")
              + f"; block {BLOCK_SIZE}, "
              f"dampening_frac {DAMPENING_FRAC}; synthetic weights and correlated inputs."
              + ("" if on_cuda else " Triton rows need CUDA (not timed on CPU)."))
    path = args.json or Path("out") / f"bench_kernels_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)

    if on_cuda:
        # cuBLAS and cuSOLVER start on first use: here, not inside the first timed call
        # (which --torch-repeats leaves without a warm-up).
        probe = torch.eye(8, device=device)
        torch.cholesky_inverse(torch.linalg.cholesky((probe @ probe).double()))
        torch.cuda.synchronize()

    rows: list[Row] = []
    not_run: list[str] = []
    began = time.perf_counter()

    def write_outputs():
        payload = dict(device=device_name, torch=torch.__version__, triton=triton_version,
                       repeats=args.repeats, warmup=args.warmup,
                       torch_repeats=args.torch_repeats, block_size=BLOCK_SIZE,
                       dampening_frac=DAMPENING_FRAC,
                       prune_weight_available=prune_weight is not None,
                       rows=[asdict(row) for row in rows], not_run=not_run)
        path.write_text(json.dumps(payload, indent=2))
        if args.markdown is not None:
            args.markdown.write_text(_table_with_gaps(rows, header, not_run) + "\n")

    # Every shape at the first pattern before any at the next: a budget cut loses the
    # later patterns, not the larger shapes.
    for pattern in patterns:
        for d_out, d_in in shapes:
            elapsed = time.perf_counter() - began
            if args.budget_s is not None and elapsed > args.budget_s:
                not_run.append(f"{d_out}x{d_in} {pattern}")
                logger.warning("%dx%d %s: not run, %.0f s past the %.0f s budget", d_out, d_in,
                               pattern, elapsed, args.budget_s)
                continue
            rows.extend(bench_layer(d_out, d_in, pattern, args, device, prune_weight))
            write_outputs()
    write_outputs()
    print(_table_with_gaps(rows, header, not_run))
    logger.info("wrote %s%s", path, f" and {args.markdown}" if args.markdown else "")
    return 0


def _table_with_gaps(rows: list[Row], header: str, not_run: list[str]) -> str:
    table = markdown(rows, header)
    if not_run:
        table += "\n\nNot run (past --budget-s): " + ", ".join(not_run) + "."
    return table


def _parse_shape(parser: argparse.ArgumentParser, text: str) -> tuple[int, int]:
    try:
        d_out, d_in = (int(part) for part in text.lower().split("x"))
    except ValueError:
        parser.error(f"--shape {text!r}: expected DOUTxDIN, e.g. 4096x14336")
    if d_out < 1 or d_in < 1:
        parser.error(f"--shape {text!r}: both sizes must be positive")
    return d_out, d_in


if __name__ == "__main__":
    sys.exit(main())
