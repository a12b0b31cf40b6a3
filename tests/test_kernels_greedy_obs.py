"""greedy_obs: the torch reference against a brute-force oracle, the Triton kernels against it.

The Triton kernels run in the interpreter on CPU (``TRITON_INTERPRET=1``, set at the top of
``tests/conftest.py`` before any kernel is defined). Shapes stay small: the interpreter runs
every program in numpy. With ``TRITON_INTERPRET=0`` and a GPU the same cases run compiled on
CUDA tensors (``tests/_triton_device.py``), against the references computed on CPU.

Tolerances, Triton against ``greedy_obs_torch`` on the same inputs (masks and orders are
always compared exactly):

| dtype | kernel | weight | step_loss |
| --- | --- | --- | --- |
| float32 | registers (low-rank history) | atol 1e-5 x max abs W, rtol 1e-4 | atol 1e-6 x max loss, rtol 1e-4 |
| float32 | scratch (history in global memory) | same as above | same |
| float64 | both | atol 1e-12 x max abs W, rtol 1e-10 | atol 1e-13 x max loss, rtol 1e-10 |
| bfloat16 in, fp32 reference (GPU only) | both | atol 2e-2 x max abs W, rtol 2e-2 | rtol 2e-2 |

Both kernels rebuild each column from the history of removed columns instead of the
reference's sequential dense downdate, so sums run in another order (observed max errors
~3e-6 relative in fp32), hence the float32 slack.
"""

import math

import pytest
import torch

from obs_compress_kernels import greedy_obs, greedy_obs_torch
from obs_compress_kernels.greedy_obs import _launch_triton

from _triton_device import needs_triton_device, on_triton_device

triton = pytest.importorskip("triton")

TOLERANCE = {
    torch.float32: dict(weight_atol=1e-5, weight_rtol=1e-4, loss_atol=1e-6, loss_rtol=1e-4),
    torch.float64: dict(weight_atol=1e-12, weight_rtol=1e-10, loss_atol=1e-13, loss_rtol=1e-10),
    torch.bfloat16: dict(weight_atol=2e-2, weight_rtol=2e-2, loss_atol=2e-2, loss_rtol=2e-2),
}

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def block_problem(rows: int, width: int, *, seed: int, dtype=torch.float32, device="cpu"):
    """Weights and the inverse of a damped Hessian from correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    tokens = 4 * width
    basis = torch.randn(max(2, width // 4), width, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, basis.shape[0], generator=g, dtype=torch.float64) @ basis
    x = x + 0.5 * torch.randn(tokens, width, generator=g, dtype=torch.float64)
    x = x * (0.3 + 2 * torch.rand(width, generator=g, dtype=torch.float64))
    hessian = 2 * x.T @ x / tokens
    hessian += 0.01 * hessian.diagonal().mean() * torch.eye(width, dtype=torch.float64)
    inverse = torch.linalg.inv(hessian)
    weight = torch.randn(rows, width, generator=g, dtype=torch.float64)
    return weight.to(dtype).to(device), inverse.to(dtype).to(device)


def assert_same_result(result, reference, dtype):
    tolerance = TOLERANCE[dtype]
    assert torch.equal(result.mask.cpu(), reference.mask.cpu())
    assert torch.equal(result.order.cpu(), reference.order.cpu())
    weight_scale = reference.weight.abs().max().item() or 1.0
    torch.testing.assert_close(result.weight.float().cpu(), reference.weight.float().cpu(),
                               atol=tolerance["weight_atol"] * weight_scale,
                               rtol=tolerance["weight_rtol"])
    loss_scale = reference.step_loss.abs().max().item() or 1.0
    torch.testing.assert_close(result.step_loss.float().cpu(), reference.step_loss.float().cpu(),
                               atol=tolerance["loss_atol"] * loss_scale,
                               rtol=tolerance["loss_rtol"])
    assert (result.weight[result.mask] == 0).all()


def assert_mostly_same_result(result, reference, dtype, max_diverged=0.01):
    """For thousands of rows: a row whose greedy order diverged (two saliencies within
    rounding of each other) is allowed in ``max_diverged`` of the rows; the rest match."""
    same = (result.order == reference.order).all(dim=1)
    assert (~same).float().mean().item() <= max_diverged
    tolerance = TOLERANCE[dtype]
    weight_scale = reference.weight.abs().max().item() or 1.0
    torch.testing.assert_close(result.weight[same].float(), reference.weight[same].float(),
                               atol=tolerance["weight_atol"] * weight_scale,
                               rtol=tolerance["weight_rtol"])
    assert torch.equal(result.mask[same], reference.mask[same])
    torch.testing.assert_close(result.step_loss.float().sum(), reference.step_loss.float().sum(),
                               atol=0, rtol=1e-3)
    assert (result.weight[result.mask] == 0).all()


# ---- The reference against an independent oracle -------------------------------------------


def least_squares_loss(weight, hessian, pruned):
    """min over w' with w'_pruned = 0 of (w' - w)^T H (w' - w) / 2, and the minimiser."""
    width = weight.shape[0]
    kept = [j for j in range(width) if j not in pruned]
    delta = torch.zeros_like(weight)
    delta[list(pruned)] = -weight[list(pruned)]
    if kept and pruned:
        # Stationarity on the kept set: H_KK delta_K = -H_KS delta_S.
        rhs = -hessian[kept][:, list(pruned)] @ delta[list(pruned)]
        delta[kept] = torch.linalg.solve(hessian[kept][:, kept], rhs)
    return (delta @ hessian @ delta / 2).item(), weight + delta


def brute_force_greedy(weight, hessian, steps, *, allowed=lambda pruned, j: True):
    """At each step try every candidate, keep the smallest exact loss increase."""
    pruned, order, increases = [], [], []
    loss = 0.0
    for _ in range(steps):
        candidates = [j for j in range(weight.shape[0]) if j not in pruned and allowed(pruned, j)]
        losses = {j: least_squares_loss(weight, hessian, pruned + [j])[0] for j in candidates}
        best = min(candidates, key=lambda j: (losses[j], j))
        order.append(best)
        increases.append(losses[best] - loss)
        loss = losses[best]
        pruned.append(best)
    return order, increases, least_squares_loss(weight, hessian, pruned)[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_matches_brute_force_oracle(seed):
    weight, inverse = block_problem(1, 6, seed=seed, dtype=torch.float64)
    hessian = torch.linalg.inv(inverse)
    order, increases, final = brute_force_greedy(weight[0], hessian, 3)
    result = greedy_obs_torch(weight, inverse, torch.tensor([3]), 3)
    assert result.order[0].tolist() == order
    torch.testing.assert_close(result.step_loss[0], torch.tensor(increases, dtype=torch.float64),
                               atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(result.weight[0], final, atol=1e-12, rtol=1e-9)
    assert result.mask[0].nonzero().flatten().tolist() == sorted(order)


def test_reference_matches_brute_force_oracle_nm():
    # 1:4 on 8 columns: the oracle may only choose in groups that still have a weight to give.
    weight, inverse = block_problem(1, 8, seed=3, dtype=torch.float64)
    hessian = torch.linalg.inv(inverse)

    def allowed(pruned, j):
        return sum(1 for p in pruned if p // 4 == j // 4) < 3

    order, increases, final = brute_force_greedy(weight[0], hessian, 6, allowed=allowed)
    result = greedy_obs_torch(weight, inverse, torch.tensor([6]), 6, group_size=4, group_prune=3)
    assert result.order[0].tolist() == order
    torch.testing.assert_close(result.step_loss[0], torch.tensor(increases, dtype=torch.float64),
                               atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(result.weight[0], final, atol=1e-12, rtol=1e-9)
    assert result.mask.view(2, 4).sum(1).tolist() == [3, 3]


def test_reference_identity_hessian_is_magnitude():
    weight = torch.tensor([[0.5, -3.0, 0.1, 2.0, -0.2, 1.0, 0.1, 4.0]])
    result = greedy_obs_torch(weight, torch.eye(8), torch.tensor([5]), 5)
    # Ascending |w|, lowest index first on the tie between columns 2 and 6.
    assert result.order[0].tolist() == [2, 6, 4, 0, 5]
    torch.testing.assert_close(result.step_loss[0], weight[0, [2, 6, 4, 0, 5]] ** 2 / 2)
    assert torch.equal(result.weight, weight.masked_fill(result.mask, 0))


# ---- Triton (interpreted on CPU, or compiled on CUDA) against the reference ---------------


def run_both(rows, width, counts, max_steps, *, seed, dtype=torch.float32, kernel="auto",
             free=None, **groups):
    weight, inverse = block_problem(rows, width, seed=seed, dtype=dtype)
    counts = torch.as_tensor(counts)
    reference = greedy_obs_torch(weight, inverse, counts, max_steps, free_columns=free, **groups)
    weight, inverse = on_triton_device(weight, inverse)
    if kernel == "auto":
        result = greedy_obs(weight, inverse, counts, max_steps, free_columns=free,
                            backend="triton", **groups)
    else:
        result = _launch_triton(weight, inverse, counts, max_steps, free_columns=free,
                                kernel=kernel, **groups)
    return result, reference


def per_row_counts(rows, max_steps, seed):
    """Random counts in [0, max_steps], with 0 and max_steps both present."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_steps + 1, (rows,), generator=g)
    counts[0], counts[-1] = 0, max_steps
    return counts


@needs_triton_device
@pytest.mark.parametrize("kernel,rows,width,max_steps", [
    ("registers", 7, 16, 8),  # one B = 16 block of the 7 x 48 layer
    ("registers", 7, 48, 24),  # odd number of B = 16 blocks fused into one wide block
    ("registers", 5, 123, 61),  # odd width, padded to 128
    ("registers", 37, 16, 16),  # several programs, the last partial; some rows prune all
    ("scratch", 7, 16, 8),
    ("scratch", 5, 123, 61),
])
def test_triton_unstructured_per_row_counts(kernel, rows, width, max_steps):
    counts = per_row_counts(rows, max_steps, seed=width)
    result, reference = run_both(rows, width, counts, max_steps, seed=rows + width, kernel=kernel)
    assert_same_result(result, reference, torch.float32)
    assert result.mask.sum(1).tolist() == counts.clamp(max=max_steps).tolist()


@needs_triton_device
@pytest.mark.parametrize("kernel", ["registers", "scratch"])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_triton_nm(kernel, n, m):
    rows, width = 6, 48
    steps = width // m * (m - n)
    result, reference = run_both(rows, width, torch.full((rows,), steps), steps, seed=10 * n + m,
                                 kernel=kernel, group_size=m, group_prune=m - n)
    assert_same_result(result, reference, torch.float32)
    assert (result.mask.view(rows, -1, m).sum(-1) == m - n).all()


@needs_triton_device
@pytest.mark.parametrize("kernel", ["registers", "scratch"])
def test_triton_free_columns(kernel):
    rows, width, steps = 5, 40, 20
    free = torch.zeros(width, dtype=torch.bool)
    free[[0, 7, 8, 33]] = True
    counts = torch.tensor([0, 2, 3, 20, 11])
    result, reference = run_both(rows, width, counts, steps, seed=5, kernel=kernel, free=free)
    assert_same_result(result, reference, torch.float32)
    # Free columns go first, lowest index first, at no loss.
    assert result.order[3, :4].tolist() == [0, 7, 8, 33]
    assert (result.step_loss[3, :4] == 0).all()


@needs_triton_device
def test_triton_nm_with_free_columns():
    rows, width = 4, 32
    free = torch.zeros(width, dtype=torch.bool)
    free[[1, 2, 3, 9]] = True  # group 0 holds three free columns but may give only two
    result, reference = run_both(rows, width, torch.full((rows,), 16), 16, seed=6,
                                 free=free, group_size=4, group_prune=2)
    assert_same_result(result, reference, torch.float32)
    assert (result.mask.view(rows, -1, 4).sum(-1) == 2).all()


@needs_triton_device
@pytest.mark.parametrize("kernel", ["registers", "scratch"])
def test_triton_float64(kernel):
    rows, width, steps = 5, 33, 20
    result, reference = run_both(rows, width, per_row_counts(rows, steps, 1), steps, seed=7,
                                 dtype=torch.float64, kernel=kernel)
    assert result.weight.dtype == torch.float64 and result.step_loss.dtype == torch.float64
    assert_same_result(result, reference, torch.float64)


@needs_triton_device
def test_triton_wide_block_uses_scratch_kernel():
    # 2 x 136 pads to 256 > REGISTER_WIDTH: backend="triton" takes the scratch kernel.
    rows, width, steps = 2, 136, 24
    result, reference = run_both(rows, width, [24, 0], steps, seed=8)
    assert_same_result(result, reference, torch.float32)


@needs_triton_device
def test_triton_scratch_in_several_row_batches():
    rows, width, steps = 5, 24, 12
    weight, inverse = block_problem(rows, width, seed=9)
    counts = per_row_counts(rows, steps, 2)
    reference = greedy_obs_torch(weight, inverse, counts, steps)
    weight, inverse = on_triton_device(weight, inverse)
    # Room for two rows' histories ((steps, width + 1) fp32 each) per launch: three launches.
    result = _launch_triton(weight, inverse, counts, steps, kernel="scratch",
                            scratch_bytes=2 * steps * (width + 1) * 4)
    assert_same_result(result, reference, torch.float32)


@needs_triton_device
def test_triton_counts_clamped_and_nothing_to_do():
    rows, width = 3, 16
    result, reference = run_both(rows, width, [3, 50, -1], 4, seed=11)
    assert_same_result(result, reference, torch.float32)
    assert result.mask.sum(1).tolist() == [3, 4, 0]
    weight, inverse = block_problem(rows, width, seed=11)
    empty = greedy_obs(*on_triton_device(weight, inverse), torch.zeros(rows, dtype=torch.long), 0,
                       backend="triton")
    assert torch.equal(empty.weight.cpu(), weight) and not empty.mask.any()
    assert empty.order.shape == (rows, 0)


@needs_triton_device
def test_triton_on_a_block_sliced_out_of_a_layer():
    layer, _ = block_problem(6, 64, seed=14)
    _, inverse = block_problem(6, 16, seed=15)
    block = layer[:, 16:32]  # row stride 64
    counts = per_row_counts(6, 8, 5)
    reference = greedy_obs_torch(block, inverse, counts, 8)
    layer, inverse = on_triton_device(layer, inverse)
    block = layer[:, 16:32]
    result = greedy_obs(block, inverse, counts, 8, backend="triton")
    assert_same_result(result, reference, torch.float32)
    transposed = layer.T.contiguous().T[:, 16:32]  # column stride != 1: copied first
    assert_same_result(greedy_obs(transposed, inverse, counts, 8, backend="triton"), reference,
                       torch.float32)


def test_auto_backend_on_cpu_is_the_torch_reference():
    weight, inverse = block_problem(4, 16, seed=12)
    counts = torch.tensor([1, 8, 4, 0])
    auto = greedy_obs(weight, inverse, counts, 8)
    reference = greedy_obs_torch(weight, inverse, counts, 8)
    for field in ("weight", "mask", "order", "step_loss"):
        assert torch.equal(getattr(auto, field), getattr(reference, field))


@needs_triton_device
def test_identity_hessian_is_magnitude_in_triton():
    weight = torch.tensor([[0.5, -3.0, 0.1, 2.0, -0.2, 1.0, 0.1, 4.0]])
    result = greedy_obs(*on_triton_device(weight, torch.eye(8)), torch.tensor([5]), 5,
                        backend="triton")
    assert result.order[0].tolist() == [2, 6, 4, 0, 5]


@needs_triton_device
@pytest.mark.parametrize("method,pattern,allocation", [
    ("obs_blockwise", "unstructured", "row"),
    ("obs_blockwise", "unstructured", "layer"),
    ("obs_blockwise", "2:4", "row"),
    ("obs_exact", "unstructured", "layer"),
])
def test_library_triton_backend_equals_torch_backend(method, pattern, allocation):
    prune_weight = pytest.importorskip("obs_compress").prune_weight
    g = torch.Generator().manual_seed(13)
    x = torch.randn(256, 48, generator=g) @ (torch.eye(48) + 0.3 * torch.randn(48, 48, generator=g))
    hessian = 2 * x.T @ x / x.shape[0]
    weight = torch.randn(6, 48, generator=g)
    kwargs = dict(method=method, sparsity=0.5, pattern=pattern, allocation=allocation,
                  block_size=16)
    reference = prune_weight(weight, hessian, backend="torch", **kwargs)
    result = prune_weight(*on_triton_device(weight, hessian), backend="triton", **kwargs)
    assert torch.equal(result.mask.cpu(), reference.mask)
    torch.testing.assert_close(result.weight.cpu(), reference.weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.loss.cpu(), reference.loss, atol=1e-5, rtol=1e-4)


# ---- GPU: compiled kernels at working sizes -----------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("width,groups", [(128, {}), (128, dict(group_size=4, group_prune=2)),
                                          (32, {}), (96, {})])
def test_gpu_register_kernel_matches_reference(width, groups):
    rows = 4096
    weight, inverse = block_problem(rows, width, seed=20, device="cuda")
    steps = width // 2
    counts = (torch.full((rows,), steps) if groups else per_row_counts(rows, steps, 3)).cuda()
    reference = greedy_obs_torch(weight, inverse, counts, steps, **groups)
    result = greedy_obs(weight, inverse, counts, steps, backend="triton", **groups)
    assert_mostly_same_result(result, reference, torch.float32)


@pytest.mark.gpu
@gpu
def test_gpu_bfloat16_inputs_against_float32_reference():
    rows, width, steps = 1024, 128, 64
    weight, inverse = block_problem(rows, width, seed=21, device="cuda")
    weight = weight.bfloat16()
    counts = torch.full((rows,), steps, device="cuda")
    reference = greedy_obs_torch(weight.float(), inverse, counts, steps)
    result = greedy_obs(weight, inverse, counts, steps, backend="triton")
    assert result.weight.dtype == torch.bfloat16
    # The kernel computes in fp32 from the same (bf16-exact) values.
    assert_mostly_same_result(result, reference, torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_gpu_scratch_kernel_matches_reference():
    rows, width = 64, 1024
    weight, inverse = block_problem(rows, width, seed=22, device="cuda")
    steps = width // 2
    counts = per_row_counts(rows, steps, 4).cuda()
    reference = greedy_obs_torch(weight, inverse, counts, steps)
    result = greedy_obs(weight, inverse, counts, steps, backend="triton")
    assert_mostly_same_result(result, reference, torch.float32)
    assert math.isfinite(result.step_loss.sum().item())


# ---- Compiled (not interpreted) for an H100, without a GPU -----------------------------------

_COMPILE_SCRIPT = r"""
import importlib, inspect, json, os, re, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module = importlib.import_module("obs_compress_kernels.greedy_obs")
pointers = dict(weight_ptr="*fp32", inverse_t_ptr="*fp32", counts_ptr="*i32", free_ptr="*i8",
                out_weight_ptr="*fp32", out_mask_ptr="*i8", order_ptr="*i64", loss_ptr="*fp32",
                history_ptr="*fp32", scale_ptr="*fp32")
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
usage = {}

def build(kernel, constants, num_warps, label):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32")
                 for name in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps))
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            text = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name],
                                  capture_output=True, text=True).stdout
        match = re.search(r"REG:(\d+) STACK:(\d+)", text)
        usage[label] = [int(match.group(1)), int(match.group(2))] if match else None

for block, steps in [(128, 64), (32, 16)]:
    history, rows, warps = module._register_config(block, steps, 4096)
    for groups in (False, True):
        build(module._greedy_obs_kernel,
              dict(BLOCK=block, HISTORY=history, ROWS=rows, HAS_FREE=True, HAS_GROUPS=groups,
                   COMPUTE=tl.float32), warps, f"registers-{block}-{steps}-{groups}")
chunk, warps = module._scratch_config(1024)
build(module._greedy_obs_scratch_kernel,
      dict(BLOCK=1024, CHUNK=chunk, HAS_FREE=True, HAS_GROUPS=True, COMPUTE=tl.float32), warps,
      "scratch-1024")
print(json.dumps(usage))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """The interpreter does not type-check like the compiler: build the real kernels for
    sm_90 (Triton's bundled ptxas, no GPU needed) and check the main shapes do not spill."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    usage = json.loads(done.stdout.strip().splitlines()[-1])
    for label, registers_and_stack in usage.items():
        if registers_and_stack is not None:
            assert registers_and_stack[1] == 0, f"{label} spills: {registers_and_stack}"


@pytest.mark.parametrize("group", [(0, 0), (4, 2)])
def test_step_weights_are_the_weights_after_each_step(group):
    group_size, group_prune = group
    weight, inverse = block_problem(9, 16, seed=21, dtype=torch.float64)
    steps = 8
    counts = torch.tensor([8, 8, 3, 0, 8, 5, 8, 1, 8])  # rows stopping early keep their weights
    traced = greedy_obs_torch(weight, inverse, counts, steps, group_size=group_size,
                              group_prune=group_prune, keep_step_weights=True)
    assert traced.step_weights.shape == (9, steps + 1, 16)
    assert torch.equal(traced.step_weights[:, 0], weight)
    for k in range(steps + 1):
        stopped = greedy_obs_torch(weight, inverse, counts.clamp(max=k), steps,
                                   group_size=group_size, group_prune=group_prune)
        # Residue of later compensations sits on pruned entries; the kept ones must match.
        torch.testing.assert_close(traced.step_weights[:, k].masked_fill(stopped.mask, 0),
                                   stopped.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(traced.step_weights[:, steps].masked_fill(traced.mask, 0),
                               traced.weight, rtol=0, atol=0)
    assert greedy_obs_torch(weight, inverse, counts, steps).step_weights is None


@needs_triton_device
def test_step_weights_are_refused_by_the_triton_backend():
    weight, inverse = on_triton_device(*block_problem(2, 8, seed=3))
    with pytest.raises(ValueError, match="keep_step_weights is a torch-backend option"):
        greedy_obs(weight, inverse, torch.tensor([2, 2]), 2, backend="triton",
                   keep_step_weights=True)
