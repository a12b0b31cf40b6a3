"""Streaming vs in-memory prune of one checkpoint: peak RSS, wall time, and byte equality.

Runs ``obs-compress prune`` twice on the same model, recipe and calibration, each in its own
process (so each peak resident set size, ``ru_maxrss`` from ``wait4``, is that path's alone):
once streaming (the default for a safetensors folder) and once with ``--in-memory``. The
source files are read once beforehand so both runs find them in the page cache. Then every
output file but the report (whose timings differ) is compared byte for byte. Prints a
Markdown table row per path, for ``docs/benchmarks.md``.

    python tools/bench_streaming.py --model .cache/models/SmolLM2-135M-Instruct \\
        --recipe recipes/obs-50.yaml --dataset c4 --data-dir /work/shared/data \\
        --set calibration.n_samples=16 --work /tmp/bench-streaming
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPORT_NAME = "obs_compress_report.json"


def folder_hashes(folder: Path) -> dict[str, str]:
    hashes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != REPORT_NAME:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(chunk)
            hashes[str(path.relative_to(folder))] = digest.hexdigest()
    return hashes


def run(command: list[str], log: Path) -> tuple[float, int, int]:
    """Wall seconds, peak RSS in bytes and exit status of ``command``."""
    start = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    return seconds, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--dataset")
    parser.add_argument("--data-dir")
    parser.add_argument("--set", action="append", default=[], dest="assignments")
    parser.add_argument("--work", required=True, type=Path,
                        help="folder for the two outputs and logs (emptied first)")
    parser.add_argument("--keep", action="store_true", help="keep the two outputs")
    args = parser.parse_args(argv)

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    source_bytes = sum(p.stat().st_size for p in args.model.glob("*.safetensors"))
    for path in sorted(args.model.glob("*.safetensors")):  # warm the page cache for both
        with path.open("rb") as handle:
            while handle.read(1 << 26):
                pass
    common = [sys.executable, "-m", "obs_compress.cli", "prune", "--model", str(args.model),
              "--recipe", args.recipe, "--no-progress", "--device", "cpu"]
    if args.dataset:
        common += ["--dataset", args.dataset]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    for assignment in args.assignments:
        common += ["--set", assignment]
    rows = {}
    for name, extra in (("streaming", []), ("in-memory", ["--in-memory"])):
        out = args.work / name
        seconds, peak, status = run(common + ["--out", str(out), *extra],
                                    args.work / f"{name}.log")
        if status != 0:
            print(f"{name} run failed (exit {status}); see {args.work / (name + '.log')}")
            return 1
        rows[name] = (seconds, peak)
        print(f"{name}: {seconds:.1f} s, peak RSS {peak / 2**20:.0f} MiB", flush=True)
    equal = folder_hashes(args.work / "streaming") == folder_hashes(args.work / "in-memory")
    print(f"\nsource safetensors: {source_bytes / 2**20:.0f} MiB; outputs equal byte for byte "
          f"(all files but the report): {equal}; load: {os.getloadavg()}\n")
    print("| path | wall s | peak RSS MiB | peak RSS / model size |")
    print("| --- | --- | --- | --- |")
    for name, (seconds, peak) in rows.items():
        print(f"| {name} | {seconds:.1f} | {peak / 2**20:.0f} | {peak / source_bytes:.2f} |")
    ratio = rows["streaming"][0] / rows["in-memory"][0]
    print(f"\nstreaming wall time / in-memory: {ratio:.3f}")
    if not args.keep:
        for name in rows:
            shutil.rmtree(args.work / name, ignore_errors=True)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
