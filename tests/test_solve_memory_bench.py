"""tools/bench_solve_memory.py: a tiny run writes its phases and the plan's figure."""

import json

from obs_compress.algorithms import solve_bytes


def test_tiny_run_writes_each_phase_and_the_planned_figure(tmp_path):
    import bench_solve_memory  # tools/, on the path through conftest.py

    out = tmp_path / "solve.json"
    assert bench_solve_memory.main(["--d-out", "24", "--d-in", "320", "--tokens", "400",
                                    "--out", str(out)]) == 0
    figures = json.loads(out.read_text(encoding="utf-8"))
    assert [phase["phase"] for phase in figures["phases"]] == ["prepare", "solve", "refit"]
    assert figures["planned_mib"] == round(
        solve_bytes(24, 320, method="obs_blockwise", refit=True, block_size=32) / 2**20)
    assert figures["measured_peak_mib"] >= 0 and figures["shape"] == [24, 320]
