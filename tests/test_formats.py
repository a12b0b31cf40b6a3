"""Encode/decode of the bitmask and nm weight formats: byte-exact round trips, every refusal,
and the stored sizes against the dense bytes."""

import zlib

import numpy as np
import pytest
import torch

from obs_compress.errors import CheckpointFormatError
from obs_compress.export.formats import (
    FORMATS,
    decode_bitmask,
    decode_nm,
    encode_bitmask,
    encode_nm,
    stored_names,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _unstructured(rows, cols, sparsity, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    w[w == 0] = 0  # no -0.0: pruned entries are stored as absent
    return w


def _nm(rows, cols, n, m, dtype, seed=0, fewer=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    groups = w.view(rows, cols // m, m)
    drop = torch.rand(rows, cols // m, m, generator=g).argsort(-1)[..., : m - n]
    groups.scatter_(-1, drop, 0)
    if fewer:  # some groups keep fewer than n
        groups[:, ::3, :] = 0
    return w


def _stored_bytes(stored):
    return sum(t.numel() * t.element_size() for t in stored.values())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,sparsity", [((5, 123), 0.5), ((1, 1), 0.0), ((7, 16), 1.0), ((9, 33), 0.0), ((64, 64), 0.7)])
def test_bitmask_round_trip_is_bit_identical(dtype, shape, sparsity):
    w = _unstructured(*shape, sparsity, dtype)
    stored = encode_bitmask(w)
    assert set(stored) == {"bitmask", "values", "shape", "crc32"}
    # independent reference of the mask layout: numpy's little-order packbits
    ref = np.packbits((w != 0).numpy(), axis=1, bitorder="little")
    assert stored["bitmask"].numpy().tobytes() == ref.tobytes()
    assert stored["values"].numel() == int((w != 0).sum())
    out = decode_bitmask(stored, name="w", file_size=_stored_bytes(stored))
    assert out.dtype == dtype and out.shape == w.shape
    assert _bytes(out) == _bytes(w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,fewer", [(2, 4, False), (4, 8, False), (2, 4, True), (4, 8, True)])
def test_nm_round_trip_is_bit_identical(dtype, n, m, fewer):
    w = _nm(6, 48, n, m, dtype, fewer=fewer)
    stored = encode_nm(w, n, m)
    assert stored["values"].shape == (6, 48 // m * n)
    out = decode_nm(stored, name="w", file_size=_stored_bytes(stored))
    assert _bytes(out) == _bytes(w)


def test_nm_positions_layout_2_4():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    stored = encode_nm(w, 2, 4)
    assert stored["values"].tolist() == [[1.0, 2.0, 3.0, 0.0]]
    # positions 1, 3 | 0, 1 as 2 bits each, least significant first: 0b01_00_11_01
    assert stored["positions"].tolist() == [[0b01001101]]


def test_stored_names_and_unknown_format():
    assert FORMATS == ("dense", "bitmask", "nm")
    assert stored_names("l.weight", "bitmask") == {
        "bitmask": "l.weight.bitmask", "values": "l.weight.values",
        "shape": "l.weight.shape", "crc32": "l.weight.crc32",
    }
    assert stored_names("l.weight", "dense") == {"": "l.weight"}
    with pytest.raises(CheckpointFormatError, match="'csr'.*dense, bitmask, nm"):
        stored_names("l.weight", "csr")


def test_bitmask_refusals_name_the_tensor_and_problem():
    w = _unstructured(8, 40, 0.5, torch.float32)
    good = encode_bitmask(w)
    size = _stored_bytes(good)

    truncated = dict(good, values=good["values"][:-1])
    with pytest.raises(CheckpointFormatError, match=r"layer\.w: the mask keeps \d+ entries but layer\.w\.values holds"):
        decode_bitmask(truncated, name="layer.w")

    with pytest.raises(CheckpointFormatError, match="more than the file's"):
        decode_bitmask(good, name="layer.w", file_size=size // 2)

    extra_bit = good["bitmask"].clone()
    extra_bit[0, 0] ^= 1  # mask and values disagree in count
    with pytest.raises(CheckpointFormatError, match="layer.w: the mask keeps"):
        decode_bitmask(dict(good, bitmask=extra_bit), name="layer.w")

    with pytest.raises(CheckpointFormatError, match=r"layer\.w\.bitmask is .* needs uint8"):
        decode_bitmask(dict(good, shape=torch.tensor([8, 80])), name="layer.w")
    with pytest.raises(CheckpointFormatError, match="not positive"):
        decode_bitmask(dict(good, shape=torch.tensor([0, 40])), name="layer.w")
    with pytest.raises(CheckpointFormatError, match="dtype torch.int32"):
        decode_bitmask(dict(good, values=good["values"].to(torch.int32)), name="layer.w")

    flipped = good["values"].clone()
    flipped[0] = flipped[0] + 1
    with pytest.raises(CheckpointFormatError, match="layer.w: checksum mismatch"):
        decode_bitmask(dict(good, values=flipped), name="layer.w")

    with pytest.raises(CheckpointFormatError, match="crc32 are missing"):
        decode_bitmask({k: v for k, v in good.items() if k != "crc32"}, name="layer.w")

    # bits past the last column (40 columns fill 5 bytes exactly, so use 37)
    w37 = _unstructured(2, 37, 0.0, torch.float32)
    s37 = encode_bitmask(w37)
    packed = s37["bitmask"].clone()
    packed[0, -1] |= 0x80
    with pytest.raises(CheckpointFormatError, match="past column 37"):
        decode_bitmask(dict(s37, bitmask=packed), name="layer.w")


def test_crc_is_zlib_of_mask_then_values():
    w = _unstructured(3, 17, 0.5, torch.bfloat16)
    s = encode_bitmask(w)
    expected = zlib.crc32(_bytes(s["bitmask"]) + _bytes(s["values"]))
    assert int(s["crc32"][0]) == expected


def test_nm_refusals():
    w = _nm(4, 16, 2, 4, torch.float32)
    w[2, 9] = 5.0  # row 2, group 2 now keeps 3
    w[2, 8] = 5.0
    w[2, 10] = 5.0
    with pytest.raises(CheckpointFormatError, match=r"2:4 pattern: row 2, group 2 \(columns 8..11\)"):
        encode_nm(w, 2, 4)
    with pytest.raises(CheckpointFormatError, match="not a multiple"):
        encode_nm(torch.zeros(2, 6), 2, 4)

    good = encode_nm(_nm(4, 16, 2, 4, torch.float32), 2, 4)
    with pytest.raises(CheckpointFormatError, match=r"w\.values is float32 \(4, 7\)"):
        decode_nm(dict(good, values=good["values"][:, :7]), name="w")
    with pytest.raises(CheckpointFormatError, match=r"w\.positions is"):
        decode_nm(dict(good, positions=good["positions"][:, :1]), name="w")
    with pytest.raises(CheckpointFormatError, match=r"w\.values is"):
        decode_nm(dict(good, shape=torch.tensor([4, 32])), name="w")
    with pytest.raises(CheckpointFormatError, match="more than the file's"):
        decode_nm(good, name="w", file_size=10)
    bad_pos = good["positions"].clone()
    bad_pos[0, 0] ^= 0x04
    with pytest.raises(CheckpointFormatError, match="w: checksum mismatch"):
        decode_nm(dict(good, positions=bad_pos), name="w")
    # a repeated position that passes the checksum
    rep = good["positions"].clone()
    rep[0, 0] = 0b0101_0101
    from obs_compress.export.formats import _crc
    forged = dict(good, positions=rep, crc32=_crc(rep, good["values"]))
    with pytest.raises(CheckpointFormatError, match="repeats a position"):
        decode_nm(forged, name="w")


@pytest.mark.parametrize("dtype,sparsity,bound", [
    (torch.float32, 0.5, 0.55), (torch.bfloat16, 0.5, 0.57), (torch.float32, 0.7, 0.36),
])
def test_bitmask_size_against_dense(dtype, sparsity, bound):
    w = _unstructured(256, 512, sparsity, dtype)
    ratio = _stored_bytes(encode_bitmask(w)) / (w.numel() * w.element_size())
    assert ratio <= bound


def test_nm_2_4_bf16_size_against_dense():
    w = _nm(256, 512, 2, 4, torch.bfloat16)
    ratio = _stored_bytes(encode_nm(w, 2, 4)) / (w.numel() * w.element_size())
    assert ratio <= 0.57
