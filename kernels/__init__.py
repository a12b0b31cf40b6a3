"""obs_compress_kernels: Triton kernels for OBS, each with its pure-torch reference.

Installed as the import package ``obs_compress_kernels`` (from the repository's
``kernels/`` folder). Never imports ``obs_compress``. Each module holds ``_name_kernel``
(Triton), ``name`` (the launcher, dispatching on ``backend``) and ``name_torch`` (the
reference, also the CPU path):

* :mod:`.greedy_obs` — row-batched exact greedy OBS on a block (``obs_blockwise``'s inner
  step, and ``obs_exact`` on a whole layer);
* :mod:`.nm_mask` — N:M selection from scores;
* :mod:`.bitmask` — bool mask to packed bitmask, for export;
* :mod:`.bitmask_matmul` — activations times a bitmask-held weight (GPU decode);
* :mod:`.csr_matmul` — activations times a CSR weight, PyTorch's own (CPU decode; no Triton).
"""

from ._backend import BACKENDS, resolve_backend
from .bitmask import pack_bitmask, pack_bitmask_torch, unpack_bitmask
from .bitmask_matmul import (TILE_COLS, BitmaskWeight, bitmask_matmul, bitmask_matmul_torch,
                             bitmask_weight, dense_weight)
from .csr_matmul import csr_matmul, csr_nbytes, csr_to_dense, csr_weight
from .greedy_obs import GreedyObsResult, greedy_obs, greedy_obs_torch
from .nm_mask import nm_mask, nm_mask_torch

__all__ = ["BACKENDS", "TILE_COLS", "BitmaskWeight", "GreedyObsResult", "bitmask_matmul",
           "bitmask_matmul_torch", "bitmask_weight", "csr_matmul", "csr_nbytes", "csr_to_dense",
           "csr_weight", "dense_weight", "greedy_obs", "greedy_obs_torch", "nm_mask", "nm_mask_torch",
           "pack_bitmask", "pack_bitmask_torch", "resolve_backend", "unpack_bitmask"]
