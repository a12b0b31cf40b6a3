"""nm_mask and pack_bitmask: hand-computed oracles, and Triton against torch.

Triton runs in the interpreter on CPU, or compiled on CUDA with ``TRITON_INTERPRET=0`` and a
GPU (``tests/_triton_device.py``); the torch references run on CPU either way.
"""

import numpy as np
import pytest
import torch

from obs_compress_kernels import (nm_mask, nm_mask_torch, pack_bitmask, pack_bitmask_torch,
                                  unpack_bitmask)

from _triton_device import needs_triton_device, on_triton_device

pytest.importorskip("triton")

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_nm_mask_reference_hand_computed():
    # Weights 1..8 as scores: 2:4 prunes the two lowest of each group.
    scores = torch.arange(1.0, 9.0).reshape(1, 8)
    assert nm_mask_torch(scores, 2, 4).tolist() == [[True, True, False, False] * 2]
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.5, 9.0, 0.1, 7.0]])
    assert nm_mask_torch(scores, 1, 4).tolist() == [[False, True, True, True,
                                                    True, False, True, True]]
    # Ties go to the lowest index.
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 0.0, 2.0, 0.0]])
    assert nm_mask_torch(scores, 2, 4).tolist() == [[True, True, False, False,
                                                    False, True, False, True]]


@needs_triton_device
@pytest.mark.parametrize("rows,cols,n,m", [(7, 48, 2, 4), (5, 124, 1, 4), (3, 40, 4, 8),
                                           (4, 24, 2, 3), (33, 16, 2, 4)])
def test_nm_mask_triton_equals_torch(rows, cols, n, m):
    g = torch.Generator().manual_seed(rows * cols)
    scores = torch.randn(rows, cols, generator=g)
    scores[0, :m] = 0.5  # a tied group
    expected = nm_mask_torch(scores, n, m)
    result = nm_mask(on_triton_device(scores), n, m, backend="triton").cpu()
    assert torch.equal(result, expected)
    assert (result.view(rows, -1, m).sum(-1) == m - n).all()


@needs_triton_device
def test_nm_mask_triton_on_a_column_slice():
    scores = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    expected = nm_mask_torch(scores[:, 8:32], 2, 4)
    result = nm_mask(on_triton_device(scores)[:, 8:32], 2, 4, backend="triton")
    assert torch.equal(result.cpu(), expected)


def test_nm_mask_rejects_bad_patterns():
    with pytest.raises(ValueError, match="must divide"):
        nm_mask(torch.zeros(2, 10), 2, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_mask(torch.zeros(2, 8), 4, 4)


@needs_triton_device
@pytest.mark.parametrize("rows,cols", [(1, 8), (7, 48), (5, 123), (3, 1), (19, 300)])
def test_pack_bitmask_matches_numpy_and_round_trips(rows, cols):
    g = torch.Generator().manual_seed(rows + cols)
    mask = torch.rand(rows, cols, generator=g) < 0.5
    expected = torch.from_numpy(np.packbits(mask.numpy(), axis=1, bitorder="little"))
    assert torch.equal(pack_bitmask_torch(mask), expected)
    assert torch.equal(pack_bitmask(on_triton_device(mask), backend="triton").cpu(), expected)
    assert torch.equal(unpack_bitmask(expected, cols), mask)


def test_pack_bitmask_hand_computed():
    mask = torch.tensor([[True, False, False, False, False, False, False, True, True]])
    assert pack_bitmask_torch(mask).tolist() == [[0b10000001, 0b00000001]]


@needs_triton_device
def test_pack_bitmask_triton_on_a_column_slice():
    mask = torch.rand(4, 64, generator=torch.Generator().manual_seed(2)) < 0.3
    expected = pack_bitmask_torch(mask[:, 5:50])
    result = pack_bitmask(on_triton_device(mask)[:, 5:50], backend="triton")
    assert torch.equal(result.cpu(), expected)


@pytest.mark.gpu
@gpu
def test_gpu_masks_at_layer_size():
    scores = torch.randn(4096, 14336, device="cuda")
    assert torch.equal(nm_mask(scores, 2, 4), nm_mask_torch(scores, 2, 4))
    mask = scores > 0
    assert torch.equal(pack_bitmask(mask), pack_bitmask_torch(mask))
