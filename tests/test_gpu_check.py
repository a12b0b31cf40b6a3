"""tools/gpu_check.sh --dry-run: every step runs or says why not, on CPU, in seconds.

The GPU run itself needs a GPU machine; this keeps the script, and the code paths it drives
(make_random_llama, measure_prune -> obs-compress prune, inspect, bench_kernels), working.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"
# What the device tool brings back from $OUT: at most 8 files.
MAX_FILES = 8
STEPS = ("bash -n tools/gpu_check.sh", "setup: wheels, imports", "environment", "gpu tests:",
         "kernel tests:", "model: tools/make_random_llama.py --preset tiny",
         "prune: recipes/obs-50.yaml", "inspect: the pruned checkpoint",
         "inference: bench_inference.py", "bench:")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    # A generous budget: the test checks what each step does, not how fast a loaded machine
    # runs it (the dry run takes about 45 s on an idle 2-core CPU).
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(out.parent),
               GPU_CHECK_BUDGET_S="400")
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=480)
    return done, out


def test_dry_run_passes_and_the_summary_names_each_step(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1]
            for line in summary.splitlines() if line.startswith("| ") and " | " in line}
    for step in STEPS:
        matches = [status for name, status in rows.items() if name.startswith(step)]
        assert matches, f"no row for {step!r} in summary.md:\n{summary}"
        status = matches[0]
        if step in ("gpu tests:", "kernel tests:"):
            assert status == "skipped (no GPU)"
        else:
            assert status.startswith("ok"), f"{step}: {status}"
    assert "global sparsity 0.5000" in rows["inspect: the pruned checkpoint"]
    assert "MEASURED rc=0 wall_s=" in summary and "peak_gpu_allocated_mib=-" in summary
    assert "| 8x32 | 2:4 | obs_blockwise | torch |" in summary
    assert "| 70% | self_attn.q_proj | 64x64 |" in summary  # the inference bench's per-layer table


def test_dry_run_outputs_fit_what_the_device_tool_returns(dry_run):
    _, out = dry_run
    names = sorted(path.name for path in out.iterdir())
    assert names == ["bench.json", "bench.log", "bench.md", "env.txt", "prune.log",
                     "prune_report.json", "summary.md", "tests.log"]
    assert len(names) <= MAX_FILES and all(path.is_file() for path in out.iterdir())
    report = json.loads((out / "prune_report.json").read_text())
    assert report["global_sparsity"] == pytest.approx(0.5) and report["n_layers"] == 14
    assert "commit:" in (out / "env.txt").read_text()
    bench = (out / "bench.md").read_text()
    assert "# Sparse inference (tools/bench_inference.py)" in bench and "# Kernels" in bench


def test_dry_run_leaves_nothing_behind(dry_run):
    _, out = dry_run
    # The scratch folder (model, pruned model, wheels) went with the exit trap.
    assert not list(out.parent.glob("gpu_check.*"))


def test_usage_errors():
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 2 and "usage:" in done.stderr
    done = subprocess.run(["bash", str(SCRIPT), "/tmp/x", "--dry"], capture_output=True,
                          text=True)
    assert done.returncode == 2
