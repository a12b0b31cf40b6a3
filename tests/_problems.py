"""Small synthetic layer problems shared by the math tests."""

import torch


def correlated_inputs(n_tokens: int, d_in: int, *, rank: int = 8, noise: float = 0.3,
                      generator: torch.Generator | None = None, dtype=torch.float64):
    """Low-rank-plus-noise inputs with uneven column scales, like real activations."""
    g = generator
    basis = torch.randn(rank, d_in, generator=g, dtype=dtype)
    x = torch.randn(n_tokens, rank, generator=g, dtype=dtype) @ basis
    x = x + noise * torch.randn(n_tokens, d_in, generator=g, dtype=dtype)
    return x * (0.2 + 3 * torch.rand(d_in, generator=g, dtype=dtype))


def layer_problem(seed: int, *, d_out: int = 12, d_in: int = 32, n_tokens: int = 400,
                  dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = correlated_inputs(n_tokens, d_in, generator=g, dtype=dtype)
    weight = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    hessian = 2 * x.T @ x / n_tokens
    return weight, x, hessian


def reconstruction_error(new_weight, weight, x):
    """||(W' - W) X^T||^2 / n, measured directly on the inputs."""
    return (((new_weight - weight) @ x.T) ** 2).sum().item() / x.shape[0]
