"""Run ``obs-compress`` in this process and report its wall time and peak memory.

``torch.cuda.max_memory_allocated`` only sees allocations of its own process, so the CLI is
called here (``obs_compress.cli.main``) rather than as a child. Everything after ``--`` is
the CLI's argument list:

    python tools/measure_prune.py -- prune --model M --recipe recipes/obs-50.yaml --out O ...

The last line printed is one ``key=value`` record that ``tools/gpu_check.sh`` reads:

    MEASURED rc=0 wall_s=83.2 peak_gpu_allocated_mib=5123.4 peak_gpu_reserved_mib=6144.0 peak_rss_mib=9876.5

``peak_gpu_*`` are ``-`` without CUDA; ``peak_rss_mib`` is the process's peak resident set
(``ru_maxrss``). The record is printed also when the CLI fails or is interrupted, and the
exit status is the CLI's.
"""

from __future__ import annotations

import resource
import sys
import time


def _record(rc: int, wall_s: float) -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        allocated = f"{torch.cuda.max_memory_allocated() / 2**20:.1f}"
        reserved = f"{torch.cuda.max_memory_reserved() / 2**20:.1f}"
    else:
        allocated = reserved = "-"
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return (f"MEASURED rc={rc} wall_s={wall_s:.1f} peak_gpu_allocated_mib={allocated} "
            f"peak_gpu_reserved_mib={reserved} peak_rss_mib={rss_mib:.1f}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    from obs_compress.cli import main as cli_main

    began = time.perf_counter()
    rc = 1
    try:
        rc = cli_main(argv)
    finally:
        print(_record(rc, time.perf_counter() - began), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
