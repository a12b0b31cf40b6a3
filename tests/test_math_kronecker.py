import pytest
import torch

from obs_compress.errors import InvalidArgument, NonFiniteError
from obs_compress.math.kronecker import (damp_factor, group_obs_columns, group_saliency_columns,
                                         kronecker_inverse_diagonal, kronecker_saliency)
from obs_compress.math.saliency import obs_saliency


def _spd(d, generator):
    x = torch.randn(3 * d, d, dtype=torch.float64, generator=generator)
    return x.T @ x / (3 * d)


def test_kronecker_saliency_matches_full_kronecker_inverse():
    g = torch.Generator().manual_seed(0)
    d_out, d_in = 3, 4
    weight = torch.randn(d_out, d_in, dtype=torch.float64, generator=g)
    G, A = _spd(d_out, g), _spd(d_in, g)
    full_inverse_diagonal = torch.linalg.inv(torch.kron(G, A)).diagonal().reshape(d_out, d_in)
    expected = weight ** 2 / (2 * full_inverse_diagonal)
    got = kronecker_saliency(weight, torch.linalg.inv(G), torch.linalg.inv(A))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(kronecker_inverse_diagonal(torch.linalg.inv(G), torch.linalg.inv(A)),
                               full_inverse_diagonal)


def test_kronecker_with_identity_g_is_layerwise_obs():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 6, dtype=torch.float64, generator=g)
    A_inv = torch.linalg.inv(_spd(6, g))
    got = kronecker_saliency(weight, torch.eye(5, dtype=torch.float64), A_inv)
    torch.testing.assert_close(got, obs_saliency(weight, A_inv.diagonal()))


def test_group_obs_equals_least_squares_and_predicted_loss():
    g = torch.Generator().manual_seed(2)
    n, d_out, d_in = 40, 5, 7
    X = torch.randn(n, d_in, dtype=torch.float64, generator=g)
    W = torch.randn(d_out, d_in, dtype=torch.float64, generator=g)
    H = 2 * X.T @ X / n
    columns = [1, 4, 5]
    new_W, loss = group_obs_columns(W, torch.linalg.inv(H), columns)
    kept = [j for j in range(d_in) if j not in columns]
    # min ||(W' - W) X^T|| with W'[:, Q] = 0  <=>  W'_K = lstsq(X_K, X W^T)^T
    solution = torch.linalg.lstsq(X[:, kept], X @ W.T).solution.T
    reference = torch.zeros_like(W)
    reference[:, kept] = solution
    torch.testing.assert_close(new_W, reference)
    assert (new_W[:, columns] == 0).all()
    measured = ((new_W - W) @ X.T).pow(2).sum() / n
    torch.testing.assert_close(loss, measured)


def test_singleton_group_saliency_is_obs_summed_over_rows():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(4, 6, dtype=torch.float64, generator=g)
    H_inv = torch.linalg.inv(_spd(6, g))
    vectorised = group_saliency_columns(W, H_inv)
    torch.testing.assert_close(vectorised, obs_saliency(W, H_inv.diagonal()).sum(dim=0))
    looped = group_saliency_columns(W, H_inv, [[j] for j in range(6)])
    torch.testing.assert_close(looped, vectorised)
    pair = group_saliency_columns(W, H_inv, [[0, 2]])
    assert pair.shape == (1,)
    torch.testing.assert_close(pair[0], group_obs_columns(W, H_inv, [0, 2])[1])


def test_damp_factor_and_refusals():
    F = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    torch.testing.assert_close(damp_factor(F, 0.5), torch.tensor([[3.5, 1.0], [1.0, 5.5]]))
    with pytest.raises(InvalidArgument):
        damp_factor(F, -0.1)
    with pytest.raises(InvalidArgument):
        damp_factor(F, float("nan"))
    with pytest.raises(NonFiniteError):
        damp_factor(torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), 0.1)
    with pytest.raises(InvalidArgument):
        group_obs_columns(torch.zeros(2, 3), torch.eye(3), [3])
