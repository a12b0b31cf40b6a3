"""tools/bench_kernels.py: its SparseGPT-style baseline against oracles, and a tiny smoke run."""

import json

import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    import bench_kernels  # tools/, on the path through conftest.py

    return bench_kernels


def test_sparsegpt_reference_with_identity_hessian_is_magnitude(bench):
    # H = I (undamped: dampening 0): U = I, no compensation, mask = lowest |w| per block.
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 32, generator=g)
    pruned, mask = bench.sparsegpt_reference(weight, torch.eye(32), sparsity=0.5, nm=None,
                                             block_size=16, dampening_frac=0.0)
    for start in (0, 16):
        block = weight[:, start:start + 16].abs().flatten()
        expected = torch.zeros_like(block, dtype=torch.bool)
        expected[torch.topk(block, 48, largest=False).indices] = True
        assert torch.equal(mask[:, start:start + 16].flatten(), expected)
    torch.testing.assert_close(pruned, weight.masked_fill(mask, 0))
    pruned, mask = bench.sparsegpt_reference(weight, torch.eye(32), sparsity=0.5, nm=(2, 4),
                                             dampening_frac=0.0)
    groups = weight.abs().view(6, 8, 4)
    expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(
        2, torch.topk(groups, 2, dim=2, largest=False).indices, True)
    assert torch.equal(mask, expected.view(6, 32))


def test_sparsegpt_reference_compensation_is_least_squares_for_one_column(bench):
    # Pruning only the first column (later columns all free): SparseGPT's update is the
    # exact OBS, i.e. least-squares, one.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    hessian = 2 * x.T @ x / 64
    weight = torch.randn(1, 8, generator=g, dtype=torch.float64)
    weight[0, 0] = 1e-3  # the smallest score by far
    pruned, mask = bench.sparsegpt_reference(weight, hessian, sparsity=1 / 8, nm=None,
                                             dampening_frac=0.0)
    assert mask[0].nonzero().flatten().tolist() == [0]
    # min ||(w' - w) X^T|| with w'_0 = 0, solved directly.
    target = (weight @ x.T).T
    solution = torch.linalg.lstsq(x[:, 1:], target).solution.T
    torch.testing.assert_close(pruned[0, 1:], solution[0], atol=1e-10, rtol=1e-8)
    assert pruned[0, 0] == 0


def test_bench_smoke_run_on_cpu(bench, monkeypatch, tmp_path, capsys):
    pytest.importorskip("obs_compress")
    monkeypatch.setitem(bench.SHAPES, "smol", [(8, 32)])
    output = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--shapes", "smol", "--json", str(output),
                       "--kernel-step", "--exact-rows", "4"]) == 0
    table = capsys.readouterr().out
    assert "| 8x32 | 2:4 | sparsegpt | torch |" in table
    rows = json.loads(output.read_text())["rows"]
    solvers = {(row["pattern"], row["solver"]) for row in rows}
    assert {("50%", "sparsegpt"), ("50%", "in-block step"), ("2:4", "obs_exact")} <= solvers
    for row in rows:
        assert row["time_s"] > 0
        if row["solver"] != "in-block step":
            assert row["error"] >= 0


def test_bench_shape_option_markdown_and_budget(bench, tmp_path, capsys):
    pytest.importorskip("obs_compress")
    output, table = tmp_path / "bench.json", tmp_path / "bench.md"
    assert bench.main(["--device", "cpu", "--shape", "8x32", "--patterns", "50%",
                       "--exact-rows", "0", "--json", str(output), "--markdown", str(table),
                       "--budget-s", "600", "--repeats", "2", "--torch-repeats", "1"]) == 0
    assert "| 8x32 | 50% | obs_blockwise | torch |" in table.read_text()
    payload = json.loads(output.read_text())
    assert payload["not_run"] == [] and payload["torch_repeats"] == 1
    # Only torch rows on CPU: each timed once, as --torch-repeats says.
    assert [len(row["times_s"]) for row in payload["rows"]] == [1, 1]
    capsys.readouterr()
    # A spent budget starts nothing and says what was left out.
    assert bench.main(["--device", "cpu", "--shape", "8x32", "--shape", "16x32",
                       "--patterns", "50%", "--json", str(output), "--markdown", str(table),
                       "--budget-s", "0"]) == 0
    payload = json.loads(output.read_text())
    assert payload["rows"] == [] and payload["not_run"] == ["8x32 50%", "16x32 50%"]
    assert "Not run (past --budget-s): 8x32 50%, 16x32 50%." in table.read_text()
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--shape", "8by32"])
