"""File sizes of the weight formats on SmolLM2-135M, and the time to read each folder back.

SmolLM2-135M-Instruct (``.cache/models/SmolLM2-135M-Instruct``) is pruned by MAGNITUDE from
the weights alone (``--dataset none``: the sizes depend only on how many entries are kept,
not on which, so the seconds-long magnitude prune gives the same sizes as OBS would) at 50%
unstructured, 2:4 and 70% unstructured, in fp32 and bf16, each written in ``dense`` and
``bitmask`` (and ``nm`` for 2:4) through the one writer. Reported per folder: the stored
bytes of the pruned Linear weights (the targets) against their dense bytes, the whole
folder's bytes (every file) against the dense folder's, and the time to read every tensor
back decoded (``obs_compress.export.convert.read_stored_tensors``: the file read and the
decode; the dense folder through the same reader; each tensor copied once, so a dense
folder's memory-mapped bytes are really read), median of interleaved repeats, the files in
the page cache (just written).

Usage (the timings under the shared lock)::

    flock /work/bench.lock nice -n 5 .venv/bin/python tools/bench_formats.py --out /tmp/bf
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
CASES = (("50%", {"method": "magnitude", "sparsity": 0.5}, ("dense", "bitmask")),
         ("2:4", {"method": "magnitude", "pattern": "2:4"}, ("dense", "bitmask", "nm")),
         ("70%", {"method": "magnitude", "sparsity": 0.7}, ("dense", "bitmask")))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def read_seconds(folder: Path) -> float:
    from obs_compress.export.convert import read_stored_tensors

    start = time.perf_counter()
    for _, tensor, _ in read_stored_tensors(folder):
        tensor.clone()  # a dense tensor is memory-mapped: copy it so its bytes are read
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    from obs_compress.api import prune_checkpoint
    from obs_compress.export.inspection import inspect_checkpoint

    work = args.out or Path(tempfile.mkdtemp(prefix="bench_formats-"))
    rows = []
    for dtype in ("float32", "bfloat16"):
        for label, recipe, formats in CASES:
            folders = {}
            for format in formats:
                out = work / f"{dtype}-{label.replace(':', '_').replace('%', '')}-{format}"
                if not out.exists():
                    prune_checkpoint(MODEL, recipe, out, dataset="none", device="cpu",
                                     progress=False, dtype=dtype, format=format)
                folders[format] = out
            times = {format: [] for format in folders}
            for _ in range(args.repeats):  # interleaved
                for format, folder in folders.items():
                    times[format].append(read_seconds(folder))
            dense_folder = folder_bytes(folders["dense"])
            for format, folder in folders.items():
                result = inspect_checkpoint(folder)
                stored = sum(t.stored_bytes for t in result.targets)
                dense = sum(t.dense_bytes for t in result.targets)
                whole = folder_bytes(folder)
                rows.append({"dtype": dtype, "pruning": label, "format": format,
                             "global_sparsity": round(result.global_sparsity, 4),
                             "targets_stored_MB": stored / 1e6, "targets_dense_MB": dense / 1e6,
                             "targets_ratio": stored / dense, "folder_MB": whole / 1e6,
                             "folder_ratio": whole / dense_folder,
                             "read_s": statistics.median(times[format]),
                             "read_ratio": (statistics.median(times[format])
                                            / statistics.median(times["dense"]))})
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"commit {commit}, load {' '.join(load)}, {args.repeats} interleaved repeats")
    print("| dtype | pruning | format | sparsity | pruned Linear weights MB (x dense) | "
          "whole folder MB (x dense folder) | read+decode s (x dense) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['pruning']} | {r['format']} | {r['global_sparsity']:.3f} | "
              f"{r['targets_stored_MB']:.1f} ({r['targets_ratio']:.3f}x) | "
              f"{r['folder_MB']:.1f} ({r['folder_ratio']:.3f}x) | "
              f"{r['read_s']:.3f} ({r['read_ratio']:.2f}x) |")
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "load": load, "rows": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
