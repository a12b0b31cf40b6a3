"""Solvers against independent oracles (least squares, hand cases, measured loss)."""

import math

import pytest
import torch

from obs_compress import Curvature, PruneResult, prune_weight
from obs_compress.algorithms.sparsegpt import sparsegpt
from obs_compress.errors import HessianNotPositiveDefinite, InvalidArgument, NonFiniteError
from obs_compress.math.inverse import prepare_curvature
from obs_compress.math.masks import parse_pattern

from _problems import correlated_inputs, layer_problem, reconstruction_error

SOLVERS = ["magnitude", "obd", "obs_exact", "obs_blockwise"]


def least_squares_kept(weight, x, mask):
    """Oracle: per row, the kept weights minimising ||(w' - w) X^T|| with pruned ones at 0."""
    target = weight @ x.T  # (d_out, n)
    out = torch.zeros_like(weight)
    for row in range(weight.shape[0]):
        kept = ~mask[row]
        solution = torch.linalg.lstsq(x[:, kept], target[row][:, None]).solution
        out[row, kept] = solution[:, 0]
    return out


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("allocation", ["row", "layer"])
@pytest.mark.parametrize("case", [
    dict(method="obs_exact"),
    dict(method="obs_blockwise", block_size=32),
    dict(method="obs_blockwise", block_size=64),
    dict(method="magnitude", refit=True),
    dict(method="obd", refit=True),
    dict(method="obs_blockwise", block_size=8, refit=True),
])
def test_kept_weights_are_the_least_squares_optimum(case, allocation, pattern):
    weight, x, hessian = layer_problem(0)
    result = prune_weight(weight, hessian, sparsity=0.5, pattern=pattern, allocation=allocation,
                          dampening_frac=0.0, **case)
    torch.testing.assert_close(result.weight, least_squares_kept(weight, x, result.mask),
                               rtol=1e-7, atol=1e-7)


def test_refit_by_conjugate_gradient_matches_direct_solve():
    from obs_compress.algorithms.refit import refit_kept_weights
    weight, x, hessian = layer_problem(3, d_in=48)
    mask = prune_weight(weight, hessian, method="magnitude", sparsity=0.6).mask
    direct = refit_kept_weights(weight, mask, hessian, solver="direct")
    iterative = refit_kept_weights(weight, mask, hessian, solver="cg")
    torch.testing.assert_close(iterative, direct, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(direct, least_squares_kept(weight, x, mask), rtol=1e-7, atol=1e-7)


def test_refit_by_conjugate_gradient_in_row_chunks_matches_direct_solve(monkeypatch):
    from obs_compress.algorithms import refit
    weight, x, hessian = layer_problem(4, d_out=13, d_in=48)
    mask = prune_weight(weight, hessian, method="magnitude", sparsity=0.6).mask
    direct = refit.refit_kept_weights(weight, mask, hessian, solver="direct")
    monkeypatch.setattr(refit, "CG_CHUNK_ELEMENTS", 4 * 48)  # chunks of 4 rows, the last 1
    chunked = refit.refit_kept_weights(weight, mask, hessian, solver="cg",
                                       initial=weight.masked_fill(mask, 0),
                                       hessian_inverse=torch.linalg.inv(hessian))
    torch.testing.assert_close(chunked, direct, rtol=1e-7, atol=1e-7)
    assert bool((chunked[mask] == 0).all())


def test_refit_warm_start_reaches_the_same_optimum():
    from obs_compress.algorithms.refit import refit_kept_weights
    weight, x, hessian = layer_problem(4, d_in=48)
    result = prune_weight(weight, hessian, method="obs_blockwise", sparsity=0.6, block_size=8,
                          dampening_frac=0.0)
    direct = refit_kept_weights(weight, result.mask, hessian, solver="direct")
    warm = refit_kept_weights(weight, result.mask, hessian, solver="cg", initial=result.weight)
    torch.testing.assert_close(warm, direct, rtol=1e-7, atol=1e-7)
    # Started at the optimum, one iteration is enough; from zero it is not.
    at_optimum = refit_kept_weights(weight, result.mask, hessian, solver="cg", initial=direct,
                                    max_iterations=1)
    torch.testing.assert_close(at_optimum, direct, rtol=1e-7, atol=1e-7)
    cold = refit_kept_weights(weight, result.mask, hessian, solver="cg", max_iterations=1)
    assert not torch.allclose(cold, direct, rtol=1e-4, atol=1e-4)


def test_refit_preconditioned_by_the_inverse_matches_direct_solve_in_fewer_iterations():
    from obs_compress.algorithms.refit import refit_kept_weights
    weight, x, hessian = layer_problem(5, d_in=64)
    mask = prune_weight(weight, hessian, method="magnitude", sparsity=0.5).mask
    direct = refit_kept_weights(weight, mask, hessian, solver="direct")
    inverse = torch.linalg.inv(hessian)
    preconditioned = refit_kept_weights(weight, mask, hessian, solver="cg",
                                        hessian_inverse=inverse)
    torch.testing.assert_close(preconditioned, direct, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(direct, least_squares_kept(weight, x, mask), rtol=1e-7, atol=1e-7)

    def error(solution):
        return (solution - direct).abs().max().item()

    # Same iteration budget: [H^-1]_KK gets far closer than Jacobi on correlated inputs.
    jacobi = refit_kept_weights(weight, mask, hessian, solver="cg", max_iterations=20)
    with_inverse = refit_kept_weights(weight, mask, hessian, solver="cg", max_iterations=20,
                                      hessian_inverse=inverse)
    assert error(with_inverse) < error(jacobi) / 1000

@pytest.mark.parametrize("pattern,allocation", [("unstructured", "row"), ("unstructured", "layer"),
                                                ("2:4", "layer"), ("1:4", "layer")])
def test_predicted_loss_equals_measured_without_damping(pattern, allocation):
    weight, x, hessian = layer_problem(1)
    for method, extra in [("obs_exact", {}), ("obs_blockwise", {"block_size": 8}),
                          ("magnitude", {}), ("obd", {})]:
        result = prune_weight(weight, hessian, method=method, sparsity=0.6, pattern=pattern,
                              allocation=allocation, dampening_frac=0.0, **extra)
        measured = reconstruction_error(result.weight, weight, x)
        assert result.loss.sum().item() == pytest.approx(measured, rel=1e-8), method


@pytest.mark.parametrize("pattern,allocation", [("unstructured", "row"), ("unstructured", "layer"),
                                                ("2:4", "layer")])
def test_blockwise_with_one_block_reproduces_exact(pattern, allocation):
    weight, _, hessian = layer_problem(2)
    exact = prune_weight(weight, hessian, method="obs_exact", sparsity=0.5, pattern=pattern,
                         allocation=allocation)
    blockwise = prune_weight(weight, hessian, method="obs_blockwise", sparsity=0.5,
                             pattern=pattern, allocation=allocation, block_size=128)
    assert torch.equal(exact.mask, blockwise.mask)
    torch.testing.assert_close(blockwise.weight, exact.weight, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(blockwise.loss, exact.loss, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("allocation", ["row", "layer"])
def test_identity_hessian_reduces_obs_to_magnitude(allocation, monkeypatch):
    from obs_compress.algorithms import obs
    # At 50% a cap of twice the average count never binds, so a row may take what magnitude does.
    monkeypatch.setattr(obs, "ROW_COUNT_CAP", 2.0)
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(10, 24, generator=g, dtype=torch.float64)
    hessian = 2 * torch.eye(24, dtype=torch.float64)
    magnitude = prune_weight(weight, hessian, method="magnitude", sparsity=0.5, allocation=allocation)
    for method in ("obs_exact", "obs_blockwise"):
        obs = prune_weight(weight, hessian, method=method, sparsity=0.5, allocation=allocation,
                           block_size=24)
        assert torch.equal(obs.mask, magnitude.mask), method
        torch.testing.assert_close(obs.weight, magnitude.weight)  # nothing to compensate
    # Smaller blocks fix each block's share of the count: magnitude within every block.
    blocks = prune_weight(weight, hessian, method="obs_blockwise", sparsity=0.5,
                          allocation=allocation, block_size=8)
    for start in range(0, 24, 8):
        part = prune_weight(weight[:, start:start + 8], None, method="magnitude", sparsity=0.5,
                            allocation=allocation)
        assert torch.equal(blocks.mask[:, start:start + 8], part.mask)


def test_layer_allocation_caps_each_row_per_block():
    from obs_compress.algorithms import obs
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(12, 32, generator=g, dtype=torch.float64)
    weight[:3] *= 0.01  # rows that would give every weight
    x = torch.randn(200, 32, generator=g, dtype=torch.float64)
    hessian = 2 * x.T @ x / 200
    result = prune_weight(weight, hessian, method="obs_blockwise", sparsity=0.5, block_size=16)
    cap = math.ceil(obs.ROW_COUNT_CAP * 8)  # 8: the average count per row and block
    per_block = result.mask.view(12, 2, 16).sum(-1)
    assert int(per_block.max()) == cap  # the small rows take as many as allowed, no more
    assert int(result.mask.sum()) == 12 * 16


def test_diagonal_hessian_obs_and_obd_choose_the_same_mask():
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(10, 24, generator=g, dtype=torch.float64)
    hessian = torch.diag(torch.rand(24, generator=g, dtype=torch.float64) * 5 + 0.1)
    for allocation in ("row", "layer"):
        obd = prune_weight(weight, hessian, method="obd", sparsity=0.4, allocation=allocation,
                           dampening_frac=0.0)
        obs = prune_weight(weight, hessian, method="obs_exact", sparsity=0.4,
                           allocation=allocation, dampening_frac=0.0)
        assert torch.equal(obs.mask, obd.mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", 0.5),
                                              ("unstructured", 0.7)])
def test_error_ordering_on_correlated_inputs(seed, pattern, sparsity):
    weight, x, hessian = layer_problem(seed, d_out=32, d_in=96, n_tokens=1500, dtype=torch.float32)
    errors = {}
    for method in SOLVERS:
        result = prune_weight(weight, hessian, method=method, sparsity=sparsity, pattern=pattern,
                              block_size=32)
        errors[method] = reconstruction_error(result.weight, weight, x)
    prepared = prepare_curvature(Curvature(hessian=hessian), 0.01, upper_factor=True)
    one_shot, _, _ = sparsegpt(weight, prepared, sparsity=sparsity,
                               pattern=parse_pattern(pattern), block_size=32)
    errors["sparsegpt"] = reconstruction_error(one_shot, weight, x)
    assert errors["obs_exact"] <= errors["obs_blockwise"] * 1.0001
    assert errors["obs_blockwise"] < errors["sparsegpt"] < errors["obd"] < errors["magnitude"]


@pytest.mark.parametrize("method", SOLVERS)
def test_exact_counts_per_row_layer_and_group(method):
    weight, _, hessian = layer_problem(6, d_out=10, d_in=40)
    row = prune_weight(weight, hessian, method=method, sparsity=0.7, allocation="row", block_size=16)
    assert row.mask.sum(1).tolist() == [28] * 10
    layer = prune_weight(weight, hessian, method=method, sparsity=0.33, allocation="layer",
                         block_size=16)
    assert layer.mask.sum().item() == 132  # round(0.33 * 400)
    for pattern, zeros in [("2:4", 2), ("1:4", 3), ("4:8", 4)]:
        result = prune_weight(weight, hessian, method=method, sparsity=0.0, pattern=pattern,
                              block_size=16)
        m = int(pattern.split(":")[1])
        assert (result.mask.reshape(10, -1, m).sum(-1) == zeros).all()
    for result in (row, layer):
        assert (result.weight[result.mask] == 0).all()
        assert (result.weight[~result.mask] != 0).all()


def test_dead_inputs_are_pruned_for_free():
    weight, x, _ = layer_problem(7, d_out=6, d_in=16)
    x[:, [2, 9]] = 0
    hessian = 2 * x.T @ x / x.shape[0]
    for method in ("obd", "obs_exact", "obs_blockwise"):
        result = prune_weight(weight, hessian, method=method, sparsity=0.125, allocation="row",
                              block_size=8, dampening_frac=0.0)
        assert result.mask[:, [2, 9]].all(), method
        assert result.loss.abs().max().item() < 1e-9, method


def test_recursive_inverse_path_matches_cholesky_path():
    weight, x, hessian = layer_problem(8)
    from obs_compress import HessianAccumulator, RecursiveInverseAccumulator
    lam_frac = 0.01
    alpha = lam_frac * torch.diagonal(hessian).mean().item() * x.shape[0]
    recursive = RecursiveInverseAccumulator(32, alpha=alpha, block_size=16)
    cholesky = HessianAccumulator(32, dtype=torch.float64)
    for batch in x.split(50):
        recursive.add_batch(batch)
        cholesky.add_batch(batch)
    for method in ("obd", "obs_exact", "obs_blockwise"):
        a = prune_weight(weight, recursive.finalize(), method=method, sparsity=0.5, block_size=16)
        b = prune_weight(weight, cholesky.finalize(), method=method, sparsity=0.5, block_size=16,
                         dampening_frac=lam_frac)
        assert torch.equal(a.mask, b.mask), method
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-7, atol=1e-7)


def test_inputs_are_not_modified_and_dtype_is_kept():
    weight, _, hessian = layer_problem(9)
    weight, hessian = weight.float(), hessian.float()
    weight_copy, hessian_copy = weight.clone(), hessian.clone()
    for method in SOLVERS:
        result = prune_weight(weight, hessian, method=method, sparsity=0.5, refit=True,
                              block_size=16)
        assert isinstance(result, PruneResult) and result.weight.dtype == torch.float32
        assert result.mask.dtype == torch.bool and result.loss.shape == (12,)
    assert torch.equal(weight, weight_copy) and torch.equal(hessian, hessian_copy)
    bf16 = prune_weight(weight.bfloat16(), hessian, method="obs_exact", sparsity=0.5)
    assert bf16.weight.dtype == torch.bfloat16


def test_zero_sparsity_changes_nothing():
    weight, _, hessian = layer_problem(10)
    for method in SOLVERS:
        result = prune_weight(weight, hessian, method=method, sparsity=0.0)
        assert not result.mask.any() and torch.equal(result.weight, weight)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(sparsity=1.5), InvalidArgument, r"sparsity must be a number in \[0, 1\)"),
    (dict(sparsity=-0.1), InvalidArgument, "sparsity"),
    (dict(sparsity=1.0), InvalidArgument, "sparsity"),
    (dict(pattern="4:4"), InvalidArgument, "0 < N < M"),
    (dict(pattern="2:5"), InvalidArgument, "M=5 to divide the input width d_in=32"),
    (dict(method="sparsegpt"), InvalidArgument, "method must be one of"),
    (dict(allocation="global"), InvalidArgument, "allocation must be one of"),
    (dict(block_size=0), InvalidArgument, "block_size must be a positive integer"),
    (dict(pattern="2:4", block_size=30), InvalidArgument, "multiple of M=4"),
    (dict(backend="cuda"), InvalidArgument, "backend must be one of"),
    (dict(dampening_frac=-1), InvalidArgument, "dampening_frac"),
    (dict(max_dampening_frac=0.001), InvalidArgument, "max_dampening_frac must be finite and >="),
])
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
    weight, _, hessian = layer_problem(0)
    args = dict(method="obs_blockwise", sparsity=0.5) | kwargs
    with pytest.raises(error, match=message):
        prune_weight(weight, hessian, **args)


def test_max_dampening_frac_reaches_the_dampening_raise():
    # Eigenvalues 2.05 and -0.05, mean(diag H) = 1: factorizes from dampening_frac 0.1 on.
    hessian = torch.tensor([[1.0, 1.05], [1.05, 1.0]])
    weight = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    with pytest.raises(HessianNotPositiveDefinite, match="raise max_dampening_frac"):
        prune_weight(weight, hessian, method="obs_exact", sparsity=0.5, max_dampening_frac=0.01)
    cache: dict = {}
    result = prune_weight(weight, hessian, method="obs_exact", sparsity=0.5, prepared_cache=cache)
    assert result.sparsity == 0.5
    assert [prepared.dampening_frac for prepared in cache.values()] == [0.1]


def test_refit_without_a_hessian_is_a_clear_error():
    weight, _, _ = layer_problem(0)
    with pytest.raises(InvalidArgument, match="refit needs the Hessian"):
        prune_weight(weight, None, method="magnitude", sparsity=0.5, refit=True)


def test_one_prepared_cache_serves_layers_sharing_a_hessian(monkeypatch):
    import obs_compress.algorithms as algorithms
    calls = []
    real = algorithms.prepare_curvature
    monkeypatch.setattr(algorithms, "prepare_curvature",
                        lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    weight, _, hessian = layer_problem(1)
    cache: dict = {}
    alone = prune_weight(weight, hessian, method="obs_blockwise", sparsity=0.5, block_size=8)
    for _ in range(3):
        shared = prune_weight(weight, hessian, method="obs_blockwise", sparsity=0.5,
                              block_size=8, prepared_cache=cache)
        torch.testing.assert_close(shared.weight, alone.weight, rtol=0, atol=0)
    prune_weight(weight, hessian, method="obs_blockwise", sparsity=0.5, block_size=8,
                 dampening_frac=0.1, prepared_cache=cache)
    assert calls == [0.01, 0.01, 0.1]  # alone, once for the three shared calls, new dampening


def test_non_finite_inputs_are_refused():
    weight, _, hessian = layer_problem(0)
    bad_hessian = hessian.clone()
    bad_hessian[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="Hessian holds NaN"):
        prune_weight(weight, bad_hessian, method="obs_exact", sparsity=0.5)
    bad_weight = weight.clone()
    bad_weight[1, 1] = float("inf")
    with pytest.raises(NonFiniteError, match="weight holds NaN"):
        prune_weight(bad_weight, hessian, method="obs_exact", sparsity=0.5)
    with pytest.raises(InvalidArgument, match="d_in=16 but the weight has 32"):
        prune_weight(weight, hessian[:16, :16], method="obs_exact", sparsity=0.5)


@pytest.mark.parametrize("method", ["obs_exact", "obs_blockwise"])
def test_layer_allocation_takes_the_traced_weights_or_solves_the_set_alike(method, monkeypatch):
    from obs_compress.algorithms import obs
    weight, x, hessian = layer_problem(6, d_out=10, d_in=32)
    kwargs = dict(method=method, sparsity=0.6, allocation="layer", block_size=8)
    traced = prune_weight(weight, hessian, **kwargs)
    calls = []
    solve = obs.remove_set
    monkeypatch.setattr(obs, "remove_set", lambda *a: calls.append(1) or solve(*a))
    assert torch.equal(prune_weight(weight, hessian, **kwargs).weight, traced.weight)
    assert not calls  # small enough: the trace's own weights are taken
    monkeypatch.setattr(obs, "STEP_WEIGHTS_ELEMENTS", 0)
    solved = prune_weight(weight, hessian, **kwargs)
    assert calls
    assert torch.equal(solved.mask, traced.mask)
    torch.testing.assert_close(solved.weight, traced.weight, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(solved.loss, traced.loss, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", [
    dict(method="obs_blockwise", block_size=8, refit=True),
    dict(method="obs_blockwise", block_size=8, pattern="2:4"),
    dict(method="obs_exact"),
    dict(method="obd"),
    dict(method="magnitude"),
])
def test_stacked_layers_are_pruned_as_if_alone(case):
    """Layers sharing one H (q/k/v), stacked by rows: each keeps its own count and result."""
    weight, x, hessian = layer_problem(7, d_out=17, d_in=32)
    rows = [8, 4, 5]
    kwargs = dict(sparsity=0.55, allocation="layer", **case)
    stacked = prune_weight(weight, hessian, row_groups=rows, **kwargs)
    for part, mask, new_weight, loss in zip(weight.split(rows), stacked.mask.split(rows),
                                            stacked.weight.split(rows), stacked.loss.split(rows)):
        alone = prune_weight(part, hessian, **kwargs)
        assert torch.equal(mask, alone.mask)
        torch.testing.assert_close(new_weight, alone.weight, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(loss, alone.loss, rtol=1e-9, atol=1e-12)


def test_row_groups_must_cover_the_rows():
    weight, _, hessian = layer_problem(8, d_out=6)
    for bad in ([2, 3], [6, 0], [3.0, 3]):
        with pytest.raises(InvalidArgument, match="row_groups must be positive row counts"):
            prune_weight(weight, hessian, method="obs_blockwise", sparsity=0.5, row_groups=bad)
