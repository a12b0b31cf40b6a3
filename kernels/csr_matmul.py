"""Activations times a weight held in PyTorch's CSR layout with int32 indices: the CPU decode path.

Shapes: ``x: (tokens, cols)``, ``W: (rows, cols)``, ``y = x @ W.T: (tokens, rows)``.

No Triton kernel here: this is what PyTorch ships (``torch.sparse_csr_tensor`` times a
strided matrix, MKL's sparse routines in the x86 CPU wheels), measured to beat the dense GEMV
for decode on a model whose weights do not fit in the cache (``docs/benchmarks.md``), so a kernel
of our own would have to earn its place against it. On a GPU, :mod:`.bitmask_matmul` is the
decode kernel. Bytes read per product: ``nnz * (itemsize + 4) + 4 * (rows + 1)`` against
``rows * cols * itemsize`` dense (fp32: 0.6x at 70%, 1.0x at 50%; at 50% it still wins on the
measured machine, see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import warnings

import torch


def csr_weight(weight: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """``weight: (rows, cols)`` as a sparse CSR tensor with int32 row and column indices.

    ``kept`` (bool, same shape) says which entries are stored (default: the nonzero ones);
    entries outside it must be 0, or the product would not equal the dense weight's."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be (rows, cols), got shape {tuple(weight.shape)}")
    if kept is None:
        kept = weight != 0
    elif kept.shape != weight.shape or kept.dtype != torch.bool:
        raise ValueError(f"kept must be a bool tensor of the weight's shape {tuple(weight.shape)}, "
                         f"got {kept.dtype} of shape {tuple(kept.shape)}")
    elif bool((weight[~kept] != 0).any()):
        raise ValueError("weight has nonzero entries outside kept: the sparse product would "
                         "differ from the dense one")
    if int(kept.sum()) > 2**31 - 1:
        raise ValueError("more than 2**31 - 1 kept entries: int32 CSR indices overflow")
    rows, cols = weight.shape
    row_index, col_index = kept.nonzero(as_tuple=True)  # row-major order: CSR's order
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = torch.cumsum(torch.bincount(row_index, minlength=rows), 0)
    with warnings.catch_warnings():  # "CSR support is in beta state": known, not the user's to act on
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.to(torch.int32), col_index.to(torch.int32),
                                       weight[row_index, col_index], (rows, cols),
                                       dtype=weight.dtype, device=weight.device)


def csr_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for ``x: (tokens, cols)`` and a CSR ``W: (rows, cols)``: ``(tokens, rows)``."""
    if weight.layout != torch.sparse_csr:
        raise ValueError(f"weight must be a sparse CSR tensor, got layout {weight.layout}")
    if x.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be (tokens, {weight.shape[1]}), got shape {tuple(x.shape)}")
    return (weight @ x.T).T


def csr_to_dense(weight: torch.Tensor) -> torch.Tensor:
    """The ``(rows, cols)`` dense tensor of a CSR weight: the prefill path's temporary.

    One ``index_put_`` of the values at (row, column): half the time of
    ``Tensor.to_dense()`` on CSR (1.5 against 3.0 ms for a 1536x576 fp32 weight at 50% on the
    2-core EPYC), which is a third of the 512-token matmul it precedes."""
    if weight.layout != torch.sparse_csr:
        raise ValueError(f"weight must be a sparse CSR tensor, got layout {weight.layout}")
    crow = weight.crow_indices()
    rows = torch.repeat_interleave(torch.arange(weight.shape[0], device=crow.device),
                                   crow.diff().long())
    dense = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    return dense.index_put_((rows, weight.col_indices().long()), weight.values())


def csr_nbytes(weight: torch.Tensor) -> int:
    """Bytes held by a CSR tensor's values and indices."""
    return sum(t.numel() * t.element_size()
               for t in (weight.values(), weight.crow_indices(), weight.col_indices()))
