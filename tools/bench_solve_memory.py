"""Peak memory of one layer's solve, by phase, against the dry-run plan's figure (CPU).

A random correlated Hessian of a ``d_out x d_in`` layer (default: a 1.5B Llama's 2048 x 8192
``down_proj``) is built first; then the three phases of ``prune_weight`` run one after the
other, each measured as the rise of the process's resident memory above what it held before
(``bench_quality.PeakRss``: the high-water mark ``VmHWM``, reset through
``/proc/self/clear_refs``, or ``VmRSS`` sampled where the reset is refused):

* prepare: ``prepare_curvature`` (damped ``H``, ``H^-1`` and, for obs_blockwise, ``U``);
* solve: the method's mask and compensation;
* refit: the kept weights re-solved (when ``--refit``).

Memory does not depend on training, so random inputs serve; the figures need Linux's /proc.

    python tools/bench_solve_memory.py                       # obs_blockwise + refit, ~2.5 min
    python tools/bench_solve_memory.py --d-in 2048 --no-refit
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench_quality import (PeakRss, current_rss_mib, machine_info,  # noqa: E402
                           release_memory, versions)
from obs_compress.algorithms import solve_bytes  # noqa: E402
from obs_compress.algorithms.obs import obs_blockwise, obs_exact  # noqa: E402
from obs_compress.algorithms.refit import refit_kept_weights  # noqa: E402
from obs_compress.math.hessian import Curvature  # noqa: E402
from obs_compress.math.inverse import prepare_curvature  # noqa: E402
from obs_compress.math.masks import parse_pattern  # noqa: E402

MIB = 1024 ** 2


def _phase(name: str, run, results: list):
    """Runs ``run()`` and appends its peak and what it leaves held, in MiB above the RSS
    before it; returns what ``run`` returned."""
    release_memory()
    start = time.perf_counter()
    with PeakRss() as peak:
        value = run()
    seconds = time.perf_counter() - start
    results.append({"phase": name, "peak_mib": round(peak.peak_mib - peak.before_mib),
                    "held_after_mib": round(current_rss_mib() - peak.before_mib),
                    "seconds": round(seconds, 1), "memory_method": peak.method})
    print(f"{name:8s} peak +{results[-1]['peak_mib']:5d} MiB, held after "
          f"+{results[-1]['held_after_mib']:5d} MiB, {seconds:6.1f} s", flush=True)
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-out", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--method", choices=("obs_blockwise", "obs_exact"),
                        default="obs_blockwise")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_in) * torch.rand(args.d_in)
    hessian = 2 * x.T @ x / args.tokens
    del x
    weight = torch.randn(args.d_out, args.d_in) / args.d_in ** 0.5
    curvature = Curvature(hessian=hessian, n_tokens=args.tokens, name="bench.down_proj")
    pattern = parse_pattern("unstructured")
    upper = args.method == "obs_blockwise"
    results: list = []
    prepared = _phase("prepare", lambda: prepare_curvature(curvature, 0.01, upper_factor=upper),
                      results)
    if upper:
        solved = _phase("solve", lambda: obs_blockwise(
            weight, prepared, sparsity=0.5, pattern=pattern, allocation="layer",
            block_size=args.block_size), results)
    else:
        solved = _phase("solve", lambda: obs_exact(weight, prepared, sparsity=0.5,
                                                   pattern=pattern, allocation="layer"), results)
    pruned, mask, _ = solved
    if args.refit:
        _phase("refit", lambda: refit_kept_weights(weight, mask, prepared.hessian,
                                                   initial=pruned,
                                                   hessian_inverse=prepared.hessian_inverse),
               results)
    # The phases' peaks stack on what the earlier phases hold: prepare's results stay.
    held = results[0]["held_after_mib"]
    measured = max(results[0]["peak_mib"],
                   held + sum(r["held_after_mib"] for r in results[1:-1]) + results[-1]["peak_mib"])
    planned = solve_bytes(args.d_out, args.d_in, method=args.method, refit=args.refit,
                          block_size=args.block_size) / MIB
    print(f"whole solve: peak +{measured} MiB measured, {planned:.0f} MiB in the dry-run plan")
    if args.out:
        args.out.write_text(json.dumps({
            "shape": [args.d_out, args.d_in], "tokens": args.tokens, "method": args.method,
            "refit": args.refit, "phases": results, "measured_peak_mib": measured,
            "planned_mib": round(planned), "machine": machine_info(), "versions": versions()},
            indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
