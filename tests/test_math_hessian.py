import logging

import pytest
import torch

from obs_compress import Curvature, HessianAccumulator, RecursiveInverseAccumulator
from obs_compress.errors import HessianNotPositiveDefinite, InvalidArgument, NonFiniteError
from obs_compress.math.inverse import (dampening_fractions, prepare_curvature, recursive_inverse,
                                       woodbury_downdate_)

from _problems import correlated_inputs


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return correlated_inputs(300, 20, generator=g)


def test_accumulator_streams_batches_of_any_shape(inputs):
    acc = HessianAccumulator(20, dtype=torch.float64)
    acc.add_batch(inputs[:100].reshape(4, 25, 20))  # (batch, seq, d_in)
    acc.add_batch(inputs[100:250])
    acc.add_batch(inputs[250:].float())  # low-precision batches are cast, not truncated
    curvature = acc.finalize()
    expected = 2 * inputs.T @ inputs / 300
    assert curvature.n_tokens == 300
    torch.testing.assert_close(curvature.hessian, expected, rtol=1e-6, atol=1e-6)



@pytest.mark.parametrize("d_in", [255, 256, 301])
def test_wide_accumulator_sums_the_upper_triangle_and_mirrors_it(d_in):
    from obs_compress.math import hessian as hessian_module
    g = torch.Generator().manual_seed(1)
    x = correlated_inputs(700, d_in, generator=g)
    acc = HessianAccumulator(d_in, dtype=torch.float64)
    assert len(acc._panels) == (hessian_module.TRIANGLE_PANELS
                                if d_in >= hessian_module.TRIANGLE_MIN_WIDTH else 1)
    acc.add_batch(x[:300])
    acc.add_batch(x[300:].reshape(4, 100, d_in))
    hessian = acc.finalize().hessian
    assert torch.equal(hessian, hessian.T)
    torch.testing.assert_close(hessian, 2 * x.T @ x / 700, rtol=1e-10, atol=1e-10)

def test_accumulator_default_fp32_and_fp64_on_request(inputs):
    assert HessianAccumulator(20).finalize.__self__.sum_outer.dtype == torch.float32
    acc = HessianAccumulator(20, dtype=torch.float64)
    acc.add_batch(inputs)
    assert acc.finalize().hessian.dtype == torch.float64
    with pytest.raises(InvalidArgument, match="float32 or float64"):
        HessianAccumulator(20, dtype=torch.float16)


def test_accumulator_rejects_bad_inputs(inputs):
    acc = HessianAccumulator(20, name="model.layers.0.mlp.up_proj")
    with pytest.raises(InvalidArgument, match="expected d_in=20"):
        acc.add_batch(torch.zeros(3, 21))
    bad = inputs.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match="model.layers.0.mlp.up_proj"):
        acc.add_batch(bad)
    with pytest.raises(InvalidArgument, match="no calibration tokens"):
        acc.finalize()


def test_dead_inputs_are_marked(inputs):
    x = inputs.clone()
    x[:, 7] = 0
    acc = HessianAccumulator(20, dtype=torch.float64)
    acc.add_batch(x)
    curvature = acc.finalize()
    assert curvature.dead_inputs.tolist() == [i == 7 for i in range(20)]
    prepared = prepare_curvature(curvature, 0.0, dtype=torch.float64)
    # The dead column is decoupled and the damped H stays invertible.
    assert prepared.hessian[7, :7].abs().max() == 0 and prepared.hessian[7, 7] > 0
    torch.testing.assert_close(prepared.hessian_inverse @ prepared.hessian,
                               torch.eye(20, dtype=torch.float64), atol=1e-8, rtol=0)


def test_dampening_and_upper_factor(inputs):
    hessian = 2 * inputs.T @ inputs / 300
    prepared = prepare_curvature(Curvature(hessian=hessian), 0.05, dtype=torch.float64,
                                 upper_factor=True)
    damped = hessian + 0.05 * torch.diagonal(hessian).mean() * torch.eye(20, dtype=torch.float64)
    torch.testing.assert_close(prepared.hessian, damped)
    torch.testing.assert_close(prepared.hessian_inverse, torch.linalg.inv(damped))
    upper = prepared.upper_factor
    assert torch.equal(upper, torch.triu(upper))
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped))


def _textbook_preparation(hessian, fraction, dtype):
    """The preparation spelled out with separate float64 matrices (the in-place one's
    independent reference)."""
    h = hessian.double().clone()
    diagonal = torch.diagonal(h).clone()
    dead = diagonal == 0
    h[dead, :] = 0
    h[:, dead] = 0
    h.diagonal()[dead] = diagonal.mean()
    h.diagonal().add_(fraction * diagonal.mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return h.to(dtype), inverse.to(dtype), torch.linalg.cholesky(inverse, upper=True).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("singular", [False, True])
def test_in_place_preparation_equals_the_textbook_one_bit_for_bit(dtype, singular):
    g = torch.Generator().manual_seed(3)
    x = correlated_inputs(20 if singular else 400, 37, generator=g).to(dtype)
    x[:, 5] = 0  # a dead input
    hessian = 2 * x.T @ x / x.shape[0]
    before = hessian.clone()
    # Rank 20 < 37 and no damping: the first fraction fails when singular, a raise follows.
    fraction = 0.0 if singular else 0.01
    prepared = prepare_curvature(Curvature(hessian=hessian, name="blk.mlp.down_proj"),
                                 fraction, dtype=dtype, upper_factor=True)
    assert (prepared.dampening_frac > fraction) == singular
    damped, inverse, upper = _textbook_preparation(hessian, prepared.dampening_frac, dtype)
    for got, want in ((prepared.hessian, damped), (prepared.hessian_inverse, inverse),
                      (prepared.upper_factor, upper)):
        assert got.dtype == dtype and got.is_contiguous()
        assert got.numpy().tobytes() == want.numpy().tobytes()
    assert hessian.numpy().tobytes() == before.numpy().tobytes()  # the caller's H untouched


def test_upper_factor_is_refused_when_not_prepared(inputs):
    hessian = 2 * inputs.T @ inputs / 300
    prepared = prepare_curvature(Curvature(hessian=hessian, name="blk.3.mlp.up_proj"), 0.01)
    with pytest.raises(InvalidArgument, match="blk.3.mlp.up_proj.*upper_factor=True"):
        prepared.upper_factor


def test_singular_hessian_raises_dampening_step_by_step(caplog):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)  # rank 5 < 12: singular
    hessian = 2 * x.T @ x / 5
    with caplog.at_level(logging.INFO, logger="obs_compress"):
        prepared = prepare_curvature(Curvature(hessian=hessian, name="blk.q"), 0.0,
                                     dtype=torch.float64)
    assert prepared.dampening_frac > 0
    assert "blk.q" in caplog.text and "succeeded with" in caplog.text
    # Never the identity: the inverse is that of the damped Hessian.
    torch.testing.assert_close(prepared.hessian_inverse @ prepared.hessian,
                               torch.eye(12, dtype=torch.float64), atol=1e-6, rtol=0)


def test_indefinite_hessian_past_the_cap_raises_typed_error():
    hessian = torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=torch.float64)  # eigenvalue -2
    with pytest.raises(HessianNotPositiveDefinite, match=r"layer blk\.3\.down_proj.*dampening_frac"):
        prepare_curvature(Curvature(hessian=hessian, name="blk.3.down_proj"), 0.01)


def _needs_a_raise():
    """Eigenvalues 2.05 and -0.05 with mean(diag H) = 1: positive definite only once
    dampening_frac exceeds 0.05 (the step 0.1 of DAMPENING_STEPS)."""
    return Curvature(hessian=torch.tensor([[1.0, 1.05], [1.05, 1.0]], dtype=torch.float64),
                     name="blk.2.up_proj")


def test_max_dampening_frac_caps_the_raise():
    with pytest.raises(HessianNotPositiveDefinite,
                       match=r"blk\.2\.up_proj.*raise max_dampening_frac \(now 0\.01\)"):
        prepare_curvature(_needs_a_raise(), 0.01, max_dampening_frac=0.01)  # no raise allowed
    with pytest.raises(HessianNotPositiveDefinite, match=r"max_dampening_frac \(now 0\.03\)"):
        prepare_curvature(_needs_a_raise(), 0.01, max_dampening_frac=0.03)
    assert prepare_curvature(_needs_a_raise(), 0.01).dampening_frac == 0.1  # default cap 1.0
    # A cap that is not a step is tried last, as itself.
    assert prepare_curvature(_needs_a_raise(), 0.01, max_dampening_frac=0.07).dampening_frac == 0.07


def test_dampening_fractions_tried():
    assert dampening_fractions(0.01) == [0.01, 0.1, 1.0]
    assert dampening_fractions(0.0, 0.001) == [0.0, 1e-4, 1e-3]
    assert dampening_fractions(0.01, 0.01) == [0.01]
    assert dampening_fractions(0.01, 0.05) == [0.01, 0.05]
    assert dampening_fractions(0.5, 2.0) == [0.5, 1.0, 2.0]
    for bad in (0.001, float("inf"), float("nan")):
        with pytest.raises(InvalidArgument, match="max_dampening_frac"):
            dampening_fractions(0.01, bad)


def test_non_finite_hessian_is_refused():
    hessian = torch.eye(4)
    hessian[1, 2] = float("inf")
    with pytest.raises(NonFiniteError, match="NaN or infinity"):
        prepare_curvature(Curvature(hessian=hessian), 0.01)


@pytest.mark.parametrize("block_size", [1, 7, 64])
def test_recursive_inverse_matches_direct_inverse(inputs, block_size):
    alpha = 3.0
    recursive = recursive_inverse(inputs, alpha, block_size=block_size)
    direct = torch.linalg.inv(alpha * torch.eye(20, dtype=torch.float64) + 2 * inputs.T @ inputs)
    torch.testing.assert_close(recursive, direct, rtol=1e-8, atol=1e-12)


def test_sherman_morrison_step_is_eq17(inputs):
    start = torch.eye(20, dtype=torch.float64) / 2.0
    x = inputs[0]
    updated = woodbury_downdate_(start.clone(), x[None])
    expected = start - (start @ x[:, None]) @ (x[None] @ start) / (1 + x @ start @ x)
    torch.testing.assert_close(updated, expected)


@pytest.mark.parametrize("block_size", [1, 32])
def test_recursive_accumulator_gives_damped_inverse_hessian(inputs, block_size):
    acc = RecursiveInverseAccumulator(20, alpha=6.0, block_size=block_size)
    acc.add_batch(inputs[:120].reshape(3, 40, 20))
    acc.add_batch(inputs[120:])
    curvature = acc.finalize()
    hessian = 2 * inputs.T @ inputs / 300
    expected = torch.linalg.inv(hessian + (6.0 / 300) * torch.eye(20, dtype=torch.float64))
    torch.testing.assert_close(curvature.hessian_inverse, expected, rtol=1e-8, atol=1e-10)
    assert curvature.dampening == pytest.approx(6.0 / 300)


def test_recursive_alpha_from_dampening_frac(inputs):
    acc = RecursiveInverseAccumulator(20, dampening_frac=0.01, expected_tokens=300)
    acc.add_batch(inputs)  # one batch: the first batch is the whole data, so alpha is exact
    curvature = acc.finalize()
    hessian = 2 * inputs.T @ inputs / 300
    lam = 0.01 * torch.diagonal(hessian).mean()
    torch.testing.assert_close(curvature.hessian_inverse,
                               torch.linalg.inv(hessian + lam * torch.eye(20, dtype=torch.float64)))


def test_recursive_accumulator_needs_a_scale():
    with pytest.raises(InvalidArgument, match="expected_tokens"):
        RecursiveInverseAccumulator(8)
    with pytest.raises(InvalidArgument, match="alpha must be > 0"):
        RecursiveInverseAccumulator(8, alpha=0.0)


@pytest.mark.parametrize("d_in", [7, 300, 1000])
def test_finalize_mirrors_the_upper_triangle_bit_for_bit(d_in):
    """The banded in-place mirror gives the bytes of (upper + upper.triu(1).T) * (2 / n)."""
    torch.manual_seed(d_in)
    acc = HessianAccumulator(d_in)
    x = torch.randn(333, d_in)
    x[:, 3] = 0  # a dead input
    acc.add_batch(x)
    acc.add_batch(torch.randn(50, d_in))
    upper = acc.sum_outer.triu()
    expected = (upper + upper.triu(1).T) * (2.0 / acc.n_tokens)
    assert acc.finalize().hessian.numpy().tobytes() == expected.numpy().tobytes()


def test_a_finalized_accumulator_refuses_more_batches_and_finalizes_to_the_same_curvature():
    acc = HessianAccumulator(6, name="layer.x")
    acc.add_batch(torch.randn(10, 6))
    first = acc.finalize()
    with pytest.raises(InvalidArgument, match="layer.x: .*finalized already"):
        acc.add_batch(torch.randn(10, 6))
    assert acc.finalize() is first
