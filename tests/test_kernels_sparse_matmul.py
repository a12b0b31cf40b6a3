"""bitmask_matmul and csr_matmul against a dense torch matmul of the masked weight.

The Triton kernel runs in the interpreter on CPU, or compiled on CUDA with
``TRITON_INTERPRET=0`` and a GPU (``tests/_triton_device.py``); the dense references run on
CPU in fp64 either way. Odd shapes cross tile, byte and program edges.
"""

import pytest
import torch

from obs_compress_kernels import (TILE_COLS, bitmask_matmul, bitmask_matmul_torch, bitmask_weight,
                                  csr_matmul, csr_to_dense, csr_weight, dense_weight)

from _triton_device import needs_triton_device, on_triton_device

# Tolerances against the fp64 product of the same (rounded) values: fp32 sums in another
# order; bf16 rounds the output once (8 bits of mantissa) after an fp32 accumulation.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def _masked(rows, cols, sparsity, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    kept = torch.rand(rows, cols, generator=g) >= sparsity
    return (weight * kept).to(dtype), kept


def _reference(x, weight):
    return (x.double() @ weight.double().T)


def test_bitmask_weight_layout_by_hand():
    weight = torch.tensor([[0.0, 2.0, 0.0, 3.0, 0, 0, 0, 0, 4.0],
                           [1.0, 0.0, 0.0, 0.0, 0, 0, 0, 0, 0.0]])
    packed = bitmask_weight(weight)
    # Row 0 keeps columns 1, 3 and 8: byte 0 = 0b00001010, byte 1 = 0b1; row 1 keeps column 0.
    assert packed.packed_mask.tolist() == [[0b1010, 1], [1, 0]]
    assert packed.values.tolist() == [2.0, 3.0, 4.0, 1.0]
    assert packed.tile_offsets.tolist() == [[0], [3]]
    assert packed.shape == (2, 9)
    assert dense_weight(packed).numpy().tobytes() == weight.numpy().tobytes()


def test_tile_offsets_count_the_kept_entries_before_each_tile():
    weight, kept = _masked(3, 2 * TILE_COLS + 5, 0.6, seed=2)
    packed = bitmask_weight(weight, kept)
    flat = kept.flatten().int()
    for row in range(3):
        for tile in range(3):
            start = row * kept.shape[1] + tile * TILE_COLS
            assert packed.tile_offsets[row, tile] == int(flat[:start].sum())


def test_explicit_kept_stores_kept_zeros_and_refuses_values_outside():
    weight = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    kept = torch.tensor([[True, True], [True, False]])
    packed = bitmask_weight(weight, kept)
    assert packed.values.tolist() == [0.0, 1.0, 2.0]
    assert csr_weight(weight, kept).values().tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="outside kept"):
        bitmask_weight(weight, torch.tensor([[True, False], [True, False]]))
    with pytest.raises(ValueError, match="outside kept"):
        csr_weight(weight, torch.tensor([[True, False], [True, False]]))


@pytest.mark.parametrize("rows,cols,tokens,sparsity", [(5, 123, 1, 0.5), (17, 300, 3, 0.7),
                                                       (64, 64, 8, 0.0), (9, 40, 2, 1.0)])
def test_bitmask_matmul_torch_equals_dense(rows, cols, tokens, sparsity):
    weight, kept = _masked(rows, cols, sparsity, seed=rows)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(1))
    result = bitmask_matmul_torch(x, bitmask_weight(weight, kept))
    torch.testing.assert_close(result.double(), _reference(x, weight), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("rows,cols,tokens,sparsity", [(5, 123, 1, 0.5), (17, 300, 3, 0.7),
                                                       (192, 576, 8, 0.5), (1, 7, 5, 0.3),
                                                       (9, 40, 2, 1.0)])
def test_csr_matmul_equals_dense(rows, cols, tokens, sparsity):
    weight, kept = _masked(rows, cols, sparsity, seed=rows)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(1))
    csr = csr_weight(weight, kept)
    assert csr.crow_indices().dtype == torch.int32 and csr.col_indices().dtype == torch.int32
    assert csr.values().numel() == int(kept.sum())
    torch.testing.assert_close(csr_matmul(x, csr).double(), _reference(x, weight),
                               **TOLERANCE[torch.float32])
    # torch.where, not the product: the product's -0.0 entries come back as +0.0
    assert csr_to_dense(csr).numpy().tobytes() == torch.where(kept, weight, 0.0).numpy().tobytes()


@needs_triton_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols,tokens,sparsity", [
    (5, 123, 1, 0.5),  # one partial tile, rows under one program
    (19, 2 * TILE_COLS + 3, 3, 0.7),  # three tiles, the last one of 3 columns; 3 of 4 tokens
    (8, TILE_COLS, 8, 0.5),  # exactly one tile, a full program of tokens
    (11, 9, 10, 0.3),  # tokens over two programs (8 + 2)
    (6, 64, 2, 0.0), (4, 200, 1, 1.0),  # dense, and all pruned
])
def test_bitmask_matmul_triton_equals_dense(dtype, rows, cols, tokens, sparsity):
    weight, kept = _masked(rows, cols, sparsity, seed=rows * cols, dtype=dtype)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(3)).to(dtype)
    packed = bitmask_weight(*on_triton_device(weight, kept))
    result = bitmask_matmul(on_triton_device(x), packed, backend="triton")
    assert result.dtype == dtype and result.shape == (tokens, rows)
    torch.testing.assert_close(result.cpu().double(), _reference(x, weight), **TOLERANCE[dtype])


@needs_triton_device
def test_bitmask_matmul_triton_on_a_strided_input():
    weight, kept = _masked(7, 50, 0.5, seed=4)
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(5))
    result = bitmask_matmul(on_triton_device(x)[:, 10:60], bitmask_weight(*on_triton_device(weight, kept)),
                            backend="triton")
    torch.testing.assert_close(result.cpu().double(), _reference(x[:, 10:60], weight),
                               **TOLERANCE[torch.float32])


def test_bitmask_matmul_refuses_mismatched_inputs():
    packed = bitmask_weight(torch.eye(4))
    with pytest.raises(ValueError, match=r"x must be \(tokens, 4\)"):
        bitmask_matmul(torch.zeros(2, 5), packed)
    with pytest.raises(ValueError, match="must match"):
        bitmask_matmul(torch.zeros(2, 4, dtype=torch.float64), packed)
    with pytest.raises(ValueError, match="sparse CSR"):
        csr_matmul(torch.zeros(2, 4), torch.eye(4))


# ---- Compiled (not interpreted) for an H100, without a GPU -----------------------------------

_COMPILE_SCRIPT = r"""
import importlib, inspect, json, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module = importlib.import_module("obs_compress_kernels.bitmask_matmul")  # the module, not the function

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
usage = {}
for dtype, tokens in [("bf16", 1), ("bf16", 8), ("fp32", 8)]:
    kernel = module._bitmask_matmul_kernel
    names = list(inspect.signature(kernel.fn).parameters)
    pointers = dict(x_ptr=f"*{dtype}", mask_ptr="*u8", values_ptr=f"*{dtype}",
                    offsets_ptr="*i32", out_ptr=f"*{dtype}")
    constants = dict(ROWS=8, TOKENS=tokens, TILE=module.TILE_COLS)  # what the launcher passes
    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32")
                 for name in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name],
                              capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    usage[f"{dtype}-{tokens}"] = [int(match.group(1)), int(match.group(2))] if match else None
print(json.dumps(usage))
"""


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the Triton cases above compile and run the kernel itself")
def test_bitmask_kernel_compiles_for_sm90_without_spills(tmp_path):
    """The interpreter does not type-check like the compiler: build the kernel for sm_90 with
    Triton's bundled ptxas (no GPU needed), at the launcher's decode specializations, and check
    that none spills registers to the stack (measured: 54-116 registers a thread)."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    usage = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(usage) == {"bf16-1", "bf16-8", "fp32-8"}
    for label, registers_stack in usage.items():
        if registers_stack is not None:  # None: cuobjdump printed no usage line
            registers, stack = registers_stack
            assert stack == 0 and registers <= 255, f"{label}: {registers} registers, stack {stack}"
