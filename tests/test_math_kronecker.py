import pytest
import torch

from obs_compress.errors import InvalidArgument, NonFiniteError
from obs_compress.math.kronecker import damp_factor, kronecker_inverse_diagonal, kronecker_saliency
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


def test_damp_factor_and_refusals():
    F = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    torch.testing.assert_close(damp_factor(F, 0.5), torch.tensor([[3.5, 1.0], [1.0, 5.5]]))
    with pytest.raises(InvalidArgument):
        damp_factor(F, -0.1)
    with pytest.raises(InvalidArgument):
        damp_factor(F, float("nan"))
    with pytest.raises(NonFiniteError):
        damp_factor(torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), 0.1)
