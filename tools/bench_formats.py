"""File sizes of the weight formats on SmolLM2-135M, and the time to read each folder back.

SmolLM2-135M-Instruct (``.cache/models/SmolLM2-135M-Instruct``) is pruned by MAGNITUDE from
the weights alone (``--dataset none``: the sizes depend only on how many entries are kept,
not on which, so the seconds-long magnitude prune gives the same sizes as OBS would) at 50%
unstructured, 2:4 and 70% unstructured, in fp32 and bf16, each written in ``dense`` and
``bitmask`` (and ``nm`` for 2:4) through the one writer. Reported per folder: the stored
bytes of the pruned Linear weights (the targets) against their dense bytes, the whole
folder's bytes (every file) against the dense folder's, and the load through stock
``AutoModelForCausalLM.from_pretrained`` after ``import obs_compress`` (a compressed folder
decoded by the obs_sparse quantizer, a dense one as transformers loads any), each load in a
fresh process: the seconds of the ``from_pretrained`` call and the process's peak resident
set (``VmHWM``: the peak of this process image; ``ru_maxrss`` would carry over the bench's
own peak across the fork) above its resident set just before the call, counted after every
parameter has been read once (a dense model's parameters are views of the memory-mapped
file, resident only once used), medians of interleaved
repeats, the files in the page cache (just written).

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


_LOAD_CHILD = """
import json, sys, time
import obs_compress  # registers the obs_sparse format
from transformers import AutoModelForCausalLM
def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
before = status_kib("VmRSS:")
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
seconds = time.perf_counter() - start
# A dense model's parameters are views of the memory-mapped file, read on first use: touch
# every one so that both kinds count the model once resident.
for parameter in model.parameters():
    parameter.detach().sum()
peak = status_kib("VmHWM:")
print(json.dumps({"seconds": seconds, "before_MiB": before / 1024,
                  "peak_above_MiB": (peak - before) / 1024,
                  "anon_MiB": status_kib("RssAnon:") / 1024,
                  "file_MiB": status_kib("RssFile:") / 1024}))
"""


def load_in_child(folder: Path) -> dict:
    """One stock ``from_pretrained`` of ``folder`` in a fresh process: its seconds and the
    peak resident set above the process's before the call."""
    import sys

    result = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(folder)], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp)")
    parser.add_argument("--repeats", type=int, default=3)
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
            loads = {format: [] for format in folders}
            for _ in range(args.repeats):  # interleaved
                for format, folder in folders.items():
                    loads[format].append(load_in_child(folder))
            dense_folder = folder_bytes(folders["dense"])
            dense_s = statistics.median(x["seconds"] for x in loads["dense"])
            dense_rss = statistics.median(x["peak_above_MiB"] for x in loads["dense"])
            for format, folder in folders.items():
                result = inspect_checkpoint(folder)
                stored = sum(t.stored_bytes for t in result.targets)
                dense = sum(t.dense_bytes for t in result.targets)
                whole = folder_bytes(folder)
                seconds = statistics.median(x["seconds"] for x in loads[format])
                rss = statistics.median(x["peak_above_MiB"] for x in loads[format])
                rows.append({"dtype": dtype, "pruning": label, "format": format,
                             "global_sparsity": round(result.global_sparsity, 4),
                             "targets_stored_MB": stored / 1e6, "targets_dense_MB": dense / 1e6,
                             "targets_ratio": stored / dense, "folder_MB": whole / 1e6,
                             "folder_ratio": whole / dense_folder,
                             "load_s": seconds, "load_ratio": seconds / dense_s,
                             "load_peak_MiB": rss, "load_peak_ratio": rss / dense_rss,
                             "loads": loads[format]})
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"commit {commit}, load {' '.join(load)}, {args.repeats} interleaved repeats")
    print("| dtype | pruning | format | sparsity | pruned Linear weights MB (x dense) | "
          "whole folder MB (x dense folder) | from_pretrained s (x dense) | "
          "load peak RSS MiB above start (x dense) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['pruning']} | {r['format']} | {r['global_sparsity']:.3f} | "
              f"{r['targets_stored_MB']:.1f} ({r['targets_ratio']:.3f}x) | "
              f"{r['folder_MB']:.1f} ({r['folder_ratio']:.3f}x) | "
              f"{r['load_s']:.2f} ({r['load_ratio']:.2f}x) | "
              f"{r['load_peak_MiB']:.0f} ({r['load_peak_ratio']:.2f}x) |")
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "load": load, "rows": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
