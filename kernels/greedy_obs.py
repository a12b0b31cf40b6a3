"""Row-batched exact greedy OBS on a block of columns: torch reference and Triton kernels.

Shapes: ``weight: (rows, B)``, ``hessian_inverse: (B, B)`` shared by every row (each row
works on its own copy), ``prune_counts: (rows,)``. For ``obs_exact`` the block is the
whole row and ``hessian_inverse`` is ``H^-1``; for ``obs_blockwise`` it is the block's
conditional inverse ``U_FF^T U_FF``.

Each row repeats, while it has prunes left (ExactOBS, Frantar et al. 2022, Alg. 1):

1. saliency ``s_j = w_j^2 / (2 [H^-1]_jj)`` over weights still present (0 for free
   columns; for N:M, +inf in groups that already hold ``M - N`` zeros);
2. ``q = argmin s`` (lowest index on ties); record ``q`` and ``s_q`` (the loss increase);
3. compensate ``w <- w - (w_q / [H^-1]_qq) H^-1 e_q`` and set ``w_q = 0`` exactly;
4. downdate ``H^-1 <- H^-1 - H^-1 e_q e_q^T H^-1 / [H^-1]_qq`` (Hassibi & Stork 1992,
   eq. 5 and the inverse of the Hessian with row and column q removed).

Three implementations of that one loop:

* :func:`greedy_obs_torch` — the reference and the CPU path: rows in chunks, each with a
  private ``(B, B)`` copy, one batched rank-1 downdate per step.
* ``_greedy_obs_kernel`` — Triton, blocks up to :data:`REGISTER_WIDTH` columns (the
  ``obs_blockwise`` inner step). One program handles ``ROWS`` rows entirely on chip. It never
  forms a row's downdated tile: after ``k`` steps that tile is ``T - sum_i c_i c_i^T / d_i``
  (``T`` the shared tile, ``c_i`` the column removed at step ``i``, ``d_i`` its pivot), so
  the program keeps the ``c_i`` (a ``(HISTORY, B)`` register history, ``HISTORY`` the step
  count rounded up to a power of two) and the running diagonal, and rebuilds the one column
  each step needs as ``T[:, q] - sum_i c_i (c_i[q] / d_i)``. ``T`` is read from global
  memory, shared by every program (it stays in L1/L2). Per step and row that is
  ``O(HISTORY * B)`` work instead of the ``O(B^2)`` of a dense downdate, and half the
  registers at 50% sparsity (a 128 x 128 fp32 tile alone is 64 KB).
* ``_greedy_obs_scratch_kernel`` — Triton, wider blocks (``obs_exact`` on a whole layer):
  the same low-rank form, one program per row, the history in a global scratch buffer
  (``(max_steps, width)`` per row, streamed ``CHUNK`` columns at a time). A dense in-place
  downdate would read and write the row's ``d x d`` inverse every step (``2 s d^2`` words
  over ``s`` steps); the history reads ``s^2 d / 2`` words and holds half the memory at 50%
  sparsity. Rows go in batches to bound the scratch (:data:`SCRATCH_BYTES`).

Both kernels compute in fp32 (fp64 for fp64 inputs) and return the input dtype.

``greedy_obs`` dispatches: ``backend="auto"`` runs Triton for CUDA tensors and
``greedy_obs_torch`` otherwise; ``backend="triton"`` on CPU runs the Triton interpreter
and needs ``TRITON_INTERPRET=1`` set before this module is imported (tests only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._backend import resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path works without triton
    triton = None

# Widest block (after padding to a power of two) that _greedy_obs_kernel keeps on chip;
# wider blocks go to the global-scratch kernel.
REGISTER_WIDTH = 128
# Target size, in elements, of one register-kernel program's history (ROWS x HISTORY x B).
# Chosen from ptxas resource usage for sm_90 (Triton 3.9, no GPU run yet): up to 8192
# elements with 4 warps compile without spills (e.g. B = 128 with 64 steps: 167 registers,
# 3 programs per SM); B = 128 with 128 steps takes 8 warps and spills ~96 bytes a thread.
_HISTORY_ELEMENTS = 8192
# Default bound (bytes) on the scratch kernel's per-row histories; rows go in batches.
SCRATCH_BYTES = 2 << 30
# Elements of greedy_obs_torch's per-chunk private inverses (rows x B x B). Measured on a
# 2-core EPYC CPU: 576 rows at B = 32 run 2.4x faster in one chunk
# than in chunks of 128 (per-step call overhead); at B = 128 chunks beyond ~256 rows slow
# down again (the inverses leave the cache). 1 << 22 gives 4096 / 1024 / 256 rows.
TORCH_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class GreedyObsResult:
    weight: torch.Tensor  # (rows, B), pruned entries exactly 0
    mask: torch.Tensor  # (rows, B) bool, True where pruned
    order: torch.Tensor  # (rows, max_steps) int64, pruned column per step, -1 if none
    step_loss: torch.Tensor  # (rows, max_steps), loss increase per step, 0 if none
    # (rows, max_steps + 1, B): the weights after each step (0: the input), residue of
    # earlier compensations left on pruned entries; only with keep_step_weights (torch backend).
    step_weights: torch.Tensor | None = None


def _check_arguments(weight, hessian_inverse, prune_counts, max_steps, group_size, group_prune,
                     free_columns):
    rows, width = weight.shape
    if hessian_inverse.shape != (width, width):
        raise ValueError(f"hessian_inverse must be ({width}, {width}), got {tuple(hessian_inverse.shape)}")
    if prune_counts.shape != (rows,):
        raise ValueError(f"prune_counts must be ({rows},), got {tuple(prune_counts.shape)}")
    if not 0 <= max_steps <= width:
        raise ValueError(f"max_steps must be in [0, {width}], got {max_steps}")
    if group_size:
        if width % group_size or not 0 < group_prune < group_size:
            raise ValueError(f"group_size {group_size} must divide the width {width} and "
                             f"0 < group_prune ({group_prune}) < group_size")
    if free_columns is not None and free_columns.shape != (width,):
        raise ValueError(f"free_columns must be ({width},), got {tuple(free_columns.shape)}")


def greedy_obs_torch(weight: torch.Tensor, hessian_inverse: torch.Tensor,
                     prune_counts: torch.Tensor, max_steps: int, *, group_size: int = 0,
                     group_prune: int = 0, free_columns: torch.Tensor | None = None,
                     row_chunk: int | None = None,
                     keep_step_weights: bool = False) -> GreedyObsResult:
    """Reference implementation, vectorised over rows (also the CPU path).

    ``keep_step_weights``: also return every row's weights after each step, so that a caller
    that picks each row's count from the trace (layer allocation) can take those weights
    instead of solving the set removal again.

    Rows go in equal chunks of at most ``row_chunk`` (default: as many as keep the chunk's
    private inverses, ``row_chunk x B x B``, within :data:`TORCH_CHUNK_ELEMENTS`). Each step
    is a handful of torch calls whatever the chunk size, so on CPU few large chunks win
    until the inverses fall out of cache.
    """
    _check_arguments(weight, hessian_inverse, prune_counts, max_steps, group_size, group_prune,
                     free_columns)
    rows, width = weight.shape
    device, dtype = weight.device, weight.dtype
    out_weight = weight.clone()
    out_mask = torch.zeros(rows, width, dtype=torch.bool, device=device)
    order = torch.full((rows, max_steps), -1, dtype=torch.long, device=device)
    step_loss = torch.zeros(rows, max_steps, dtype=dtype, device=device)
    counts = prune_counts.to(device=device, dtype=torch.long).clamp(max=max_steps)
    inverse = hessian_inverse.to(dtype)
    free = free_columns.to(device) if free_columns is not None else None
    has_free = free is not None and bool(free.any())
    step_weights = None
    if keep_step_weights:
        step_weights = torch.empty(rows, max_steps + 1, width, dtype=dtype, device=device)
        step_weights[:, 0] = weight

    if row_chunk is None:
        row_chunk = max(1, TORCH_CHUNK_ELEMENTS // (width * width))
    elif row_chunk < 1:
        raise ValueError(f"row_chunk must be >= 1, got {row_chunk}")
    n_chunks = -(-rows // row_chunk) if rows else 0
    row_chunk = -(-rows // n_chunks) if n_chunks else 1
    for start in range(0, rows, row_chunk):
        stop = min(start + row_chunk, rows)
        chunk_counts = counts[start:stop]
        steps = int(chunk_counts.max().item())
        if steps == 0:
            continue
        w = out_weight[start:stop]  # view: updated in place
        pruned = out_mask[start:stop]
        b = stop - start
        chunk_inverse = inverse.expand(b, width, width).clone()
        # Usually every row of the chunk takes every step (N:M, row allocation, the layer
        # allocation's trace): then no row needs masking out, and each step is a few calls.
        every_row = bool((chunk_counts == steps).all())
        for step in range(steps):
            diagonal = torch.diagonal(chunk_inverse, dim1=1, dim2=2)
            saliency = w * w / (2 * diagonal)
            if has_free:
                saliency.masked_fill_(free, 0)
            # Pruned columns (w = 0, diagonal ~0: their saliency may be NaN) never again.
            saliency.masked_fill_(pruned, float("inf"))
            if group_size:  # groups that hold their M - N zeros already: none of them
                full = pruned.view(b, -1, group_size).sum(-1, keepdim=True) >= group_prune
                saliency.view(b, -1, group_size).masked_fill_(full, float("inf"))
            loss, chosen = saliency.min(dim=1)  # first index on ties, like argmin
            index = chosen[:, None]
            pivot = diagonal.gather(1, index)  # (b, 1)
            # (b, B) = H^-1 e_q; gather is the same values as chunk_inverse[row_index, :, chosen]
            # without advanced indexing's slow path (a slice between two index tensors).
            column = chunk_inverse.gather(2, chosen.view(b, 1, 1).expand(b, width, 1)).squeeze(2)
            coefficient = w.gather(1, index) / pivot  # (b, 1)
            scale = 1 / pivot
            if not every_row:  # rows that are done take a zero step (where, not * 0: 0*inf)
                taken = step < chunk_counts
                coefficient = torch.where(taken[:, None], coefficient, 0)
                scale = torch.where(taken[:, None], scale, 0)
            w.addcmul_(coefficient, column, value=-1)
            # Rank-1 downdate. addcmul_, not baddbmm_: a K=1 batched matmul is far slower on
            # CPU, and the broadcast product would allocate a (b, B, B) temporary.
            chunk_inverse.addcmul_(column[:, :, None], (column * scale)[:, None, :], value=-1)
            if every_row:
                w.scatter_(1, index, 0)
                pruned.scatter_(1, index, True)
                order[start:stop, step] = chosen
                step_loss[start:stop, step] = loss
            else:
                rows_taken = taken.nonzero().squeeze(1)
                columns_taken = chosen[taken]
                w[rows_taken, columns_taken] = 0
                pruned[rows_taken, columns_taken] = True
                order[start + rows_taken, step] = columns_taken
                step_loss[start + rows_taken, step] = loss[taken]
            if step_weights is not None:
                step_weights[start:stop, step + 1] = w
        if step_weights is not None:  # rows that took fewer steps keep their last weights
            step_weights[start:stop, steps + 1:] = w[:, None, :]
        # Later compensations leave rounding residue (~1e-7 |w|) on weights pruned earlier.
        w.masked_fill_(pruned, 0)
    return GreedyObsResult(out_weight, out_mask, order, step_loss, step_weights)


if triton is not None:

    @triton.jit
    def _greedy_obs_kernel(
            weight_ptr, inverse_t_ptr, counts_ptr, free_ptr,
            out_weight_ptr, out_mask_ptr, order_ptr, loss_ptr,
            rows, width, weight_stride, inverse_stride, order_stride,
            group_size, group_prune,
            BLOCK: tl.constexpr, HISTORY: tl.constexpr, ROWS: tl.constexpr,
            HAS_FREE: tl.constexpr, HAS_GROUPS: tl.constexpr, COMPUTE: tl.constexpr):
        """Greedy OBS for ``ROWS`` rows of a block of ``width <= BLOCK`` columns, on chip.

        ``inverse_t_ptr`` holds ``T^T`` (contiguous), so ``T[:, q]`` is a contiguous row.
        Padded columns: weight 0, diagonal 1, never chosen.
        """
        program = tl.program_id(0)
        row = program * ROWS + tl.arange(0, ROWS)  # (R,)
        col = tl.arange(0, BLOCK)  # (B,)
        slot = tl.arange(0, HISTORY)  # (S,)
        row_ok = row < rows
        col_ok = col < width
        tile_ok = row_ok[:, None] & col_ok[None, :]  # (R, B)

        w = tl.load(weight_ptr + row[:, None] * weight_stride + col[None, :], mask=tile_ok,
                    other=0.0).to(COMPUTE)
        count = tl.load(counts_ptr + row, mask=row_ok, other=0)
        tile_diagonal = tl.load(inverse_t_ptr + col * (inverse_stride + 1), mask=col_ok,
                                other=1.0).to(COMPUTE)
        diagonal = tl.zeros((ROWS, BLOCK), COMPUTE) + tile_diagonal[None, :]  # (R, B)
        pruned = tl.zeros((ROWS, BLOCK), tl.int32) != 0
        if HAS_FREE:
            free = tl.load(free_ptr + col, mask=col_ok, other=0) != 0
        if HAS_GROUPS:
            group = col // group_size
            group_pruned = tl.zeros((ROWS, BLOCK), tl.int32)  # zeros already in the group
        history = tl.zeros((ROWS, HISTORY, BLOCK), COMPUTE)  # c_i, the columns removed
        history_scale = tl.zeros((ROWS, HISTORY), COMPUTE)  # 1 / d_i

        steps = tl.max(count, axis=0)
        for step in range(0, steps):
            active = step < count  # (R,) rows whose count is reached only idle
            blocked = pruned | (col[None, :] >= width)
            if HAS_GROUPS:
                blocked = blocked | (group_pruned >= group_prune)
            # A pruned column's diagonal is ~0: keep 0/0 out of the blocked entries.
            saliency = w * w / (2 * tl.where(blocked, 1.0, diagonal))
            if HAS_FREE:
                saliency = tl.where(free[None, :], 0.0, saliency)
            saliency = tl.where(blocked, float("inf"), saliency)
            chosen = tl.argmin(saliency, axis=1, tie_break_left=True)  # (R,) as torch.argmin
            is_chosen = col[None, :] == chosen[:, None]  # (R, B)
            loss = tl.sum(tl.where(is_chosen, saliency, 0.0), axis=1)
            pivot = tl.sum(tl.where(is_chosen, diagonal, 0.0), axis=1)
            w_chosen = tl.sum(tl.where(is_chosen, w, 0.0), axis=1)

            # Column q of the row's downdated tile: T[:, q] - sum_i c_i (c_i[q] / d_i).
            tile_column = tl.load(inverse_t_ptr + chosen[:, None] * inverse_stride + col[None, :],
                                  mask=tile_ok, other=0.0).to(COMPUTE)
            projection = tl.sum(tl.where(is_chosen[:, None, :], history, 0.0), axis=2)
            projection = projection * history_scale  # (R, S)
            column = tile_column - tl.sum(history * projection[:, :, None], axis=1)  # (R, B)

            coefficient = tl.where(active, w_chosen / pivot, 0.0)
            inverse_pivot = tl.where(active, 1.0 / pivot, 0.0)
            w = w - coefficient[:, None] * column
            removed = is_chosen & active[:, None]
            w = tl.where(removed, 0.0, w)
            diagonal = diagonal - column * (column * inverse_pivot[:, None])
            record = (slot[None, :] == step) & active[:, None]  # (R, S)
            history = tl.where(record[:, :, None], column[:, None, :], history)
            history_scale = tl.where(record, inverse_pivot[:, None], history_scale)
            pruned = pruned | removed
            if HAS_GROUPS:
                same_group = group[None, :] == (chosen // group_size)[:, None]
                group_pruned += (same_group & active[:, None]).to(tl.int32)
            keep = active & row_ok
            tl.store(order_ptr + row * order_stride + step, chosen.to(tl.int64), mask=keep)
            tl.store(loss_ptr + row * order_stride + step,
                     loss.to(loss_ptr.dtype.element_ty), mask=keep)

        out_offset = row[:, None] * width + col[None, :]
        w = tl.where(pruned, 0.0, w)  # earlier prunes drift by rounding in later updates
        tl.store(out_weight_ptr + out_offset, w.to(out_weight_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(out_mask_ptr + out_offset, pruned.to(tl.int8), mask=tile_ok)

    @triton.jit
    def _greedy_obs_scratch_kernel(
            weight_ptr, inverse_t_ptr, counts_ptr, free_ptr,
            out_weight_ptr, out_mask_ptr, order_ptr, loss_ptr, history_ptr, scale_ptr,
            row_start, width, weight_stride, inverse_stride, order_stride,
            group_size, group_prune,
            BLOCK: tl.constexpr, CHUNK: tl.constexpr,
            HAS_FREE: tl.constexpr, HAS_GROUPS: tl.constexpr, COMPUTE: tl.constexpr):
        """Greedy OBS for one row of any width, its history of removed columns in global scratch.

        ``history_ptr`` holds a ``(max_steps, width)`` buffer per program, ``scale_ptr`` a
        ``(max_steps,)`` one. The row's weights, diagonal and flags stay in registers
        (``BLOCK >= width``); ``T`` is read through ``inverse_t_ptr`` as in
        ``_greedy_obs_kernel``.
        """
        program = tl.program_id(0)
        row = row_start + program
        history = history_ptr + program.to(tl.int64) * order_stride * width
        history_scale = scale_ptr + program.to(tl.int64) * order_stride
        col = tl.arange(0, BLOCK)
        col_ok = col < width
        chunk = tl.arange(0, CHUNK)

        w = tl.load(weight_ptr + row * weight_stride + col, mask=col_ok, other=0.0).to(COMPUTE)
        count = tl.load(counts_ptr + row)
        diagonal = tl.load(inverse_t_ptr + col * (inverse_stride + 1), mask=col_ok,
                           other=1.0).to(COMPUTE)
        pruned = col < 0
        if HAS_FREE:
            free = tl.load(free_ptr + col, mask=col_ok, other=0) != 0
        if HAS_GROUPS:
            group = col // group_size
            group_pruned = tl.zeros((BLOCK,), tl.int32)

        for step in range(0, count):
            blocked = pruned | (col >= width)
            if HAS_GROUPS:
                blocked = blocked | (group_pruned >= group_prune)
            saliency = w * w / (2 * tl.where(blocked, 1.0, diagonal))
            if HAS_FREE:
                saliency = tl.where(free, 0.0, saliency)
            saliency = tl.where(blocked, float("inf"), saliency)
            chosen = tl.argmin(saliency, axis=0, tie_break_left=True)
            is_chosen = col == chosen
            loss = tl.sum(tl.where(is_chosen, saliency, 0.0), axis=0)
            pivot = tl.sum(tl.where(is_chosen, diagonal, 0.0), axis=0)
            w_chosen = tl.sum(tl.where(is_chosen, w, 0.0), axis=0)

            # Column q of the row's inverse, T[:, q] - sum_i c_i (c_i[q] / d_i), streaming the
            # history CHUNK columns at a time; one reduction at the end, none per chunk.
            correction = tl.zeros((CHUNK, BLOCK), COMPUTE)
            for first in range(0, step, CHUNK):
                index = first + chunk
                index_ok = index < step
                projection = tl.load(history + index * width + chosen, mask=index_ok, other=0.0)
                projection = projection * tl.load(history_scale + index, mask=index_ok, other=0.0)
                removed = tl.load(history + index[:, None] * width + col[None, :],
                                  mask=index_ok[:, None] & col_ok[None, :], other=0.0)
                correction += projection[:, None] * removed
            column = tl.load(inverse_t_ptr + chosen * inverse_stride + col, mask=col_ok,
                             other=0.0).to(COMPUTE) - tl.sum(correction, axis=0)

            inverse_pivot = 1.0 / pivot
            w = w - (w_chosen / pivot) * column
            w = tl.where(is_chosen, 0.0, w)
            diagonal = diagonal - column * (column * inverse_pivot)
            tl.store(history + step * width + col, column, mask=col_ok)
            tl.store(history_scale + step, inverse_pivot)
            # The next step reads this column back, in another layout (other threads).
            tl.debug_barrier()
            pruned = pruned | is_chosen
            if HAS_GROUPS:
                group_pruned += (group == chosen // group_size).to(tl.int32)
            tl.store(order_ptr + row * order_stride + step, chosen.to(tl.int64))
            tl.store(loss_ptr + row * order_stride + step, loss.to(loss_ptr.dtype.element_ty))

        w = tl.where(pruned, 0.0, w)
        tl.store(out_weight_ptr + row * width + col, w.to(out_weight_ptr.dtype.element_ty),
                 mask=col_ok)
        tl.store(out_mask_ptr + row * width + col, pruned.to(tl.int8), mask=col_ok)


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def _register_config(block: int, max_steps: int, rows: int) -> tuple[int, int, int]:
    """``(HISTORY, ROWS, num_warps)`` for ``_greedy_obs_kernel``."""
    history = _next_power_of_two(max_steps)
    rows_per_program = max(1, min(16, _HISTORY_ELEMENTS // (history * block),
                                  _next_power_of_two(rows)))
    rows_per_program = 1 << (rows_per_program.bit_length() - 1)  # a power of two
    elements = rows_per_program * history * block
    return history, rows_per_program, 4 if elements <= _HISTORY_ELEMENTS else 8


def _scratch_config(block: int) -> tuple[int, int]:
    """``(CHUNK, num_warps)`` for ``_greedy_obs_scratch_kernel``."""
    return max(1, min(64, 4096 // block)), min(16, max(4, block // 512))


def _launch_triton(weight: torch.Tensor, hessian_inverse: torch.Tensor,
                   prune_counts: torch.Tensor, max_steps: int, *, group_size: int = 0,
                   group_prune: int = 0, free_columns: torch.Tensor | None = None,
                   kernel: str = "auto", scratch_bytes: int = SCRATCH_BYTES) -> GreedyObsResult:
    """Runs the Triton kernels; arguments already checked. ``kernel``: ``auto`` picks
    ``registers`` for widths up to :data:`REGISTER_WIDTH` and ``scratch`` beyond."""
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    rows, width = weight.shape
    device, dtype = weight.device, weight.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    compute_tl = tl.float64 if compute == torch.float64 else tl.float32
    block = max(16, _next_power_of_two(width))
    if kernel == "auto":
        kernel = "registers" if block <= REGISTER_WIDTH else "scratch"
    if kernel not in ("registers", "scratch"):
        raise ValueError(f"kernel must be 'auto', 'registers' or 'scratch', got {kernel!r}")

    if weight.stride(1) != 1:  # a row stride is fine (a block sliced out of a layer)
        weight = weight.contiguous()
    out_weight = torch.empty((rows, width), dtype=dtype, device=device)
    out_mask = torch.zeros((rows, width), dtype=torch.int8, device=device)
    order = torch.full((rows, max_steps), -1, dtype=torch.long, device=device)
    step_loss = torch.zeros((rows, max_steps), dtype=dtype, device=device)
    if rows == 0 or width == 0 or max_steps == 0:
        out_weight.copy_(weight)
        return GreedyObsResult(out_weight, out_mask.view(torch.bool), order, step_loss)
    counts = prune_counts.to(device=device, dtype=torch.int32).clamp(0, max_steps).contiguous()
    has_free = free_columns is not None
    free = (free_columns.to(device=device, dtype=torch.int8).contiguous() if has_free
            else counts)  # any pointer: not read when HAS_FREE is False
    has_groups = bool(group_size)

    # Column q of T is row q of T^T: contiguous loads.
    inverse_t = hessian_inverse.to(device=device, dtype=compute).t().contiguous()
    if kernel == "registers":
        history, rows_per_program, num_warps = _register_config(block, max_steps, rows)
        grid = (triton.cdiv(rows, rows_per_program),)
        _greedy_obs_kernel[grid](
            weight, inverse_t, counts, free, out_weight, out_mask, order, step_loss,
            rows, width, weight.stride(0), inverse_t.stride(0), max_steps,
            group_size, group_prune,
            BLOCK=block, HISTORY=history, ROWS=rows_per_program,
            HAS_FREE=has_free, HAS_GROUPS=has_groups, COMPUTE=compute_tl,
            num_warps=num_warps)
    else:
        row_bytes = max_steps * (width + 1) * inverse_t.element_size()
        batch = max(1, min(rows, scratch_bytes // row_bytes))
        history = torch.empty((batch, max_steps, width), dtype=compute, device=device)
        history_scale = torch.empty((batch, max_steps), dtype=compute, device=device)
        chunk, num_warps = _scratch_config(block)
        for row_start in range(0, rows, batch):
            size = min(batch, rows - row_start)
            _greedy_obs_scratch_kernel[(size,)](
                weight, inverse_t, counts, free, out_weight, out_mask, order, step_loss,
                history, history_scale,
                row_start, width, weight.stride(0), inverse_t.stride(0), max_steps,
                group_size, group_prune,
                BLOCK=block, CHUNK=chunk,
                HAS_FREE=has_free, HAS_GROUPS=has_groups, COMPUTE=compute_tl,
                num_warps=num_warps)
    return GreedyObsResult(out_weight, out_mask.view(torch.bool), order, step_loss)


def greedy_obs(weight: torch.Tensor, hessian_inverse: torch.Tensor, prune_counts: torch.Tensor,
               max_steps: int, *, group_size: int = 0, group_prune: int = 0,
               free_columns: torch.Tensor | None = None, backend: str = "auto",
               keep_step_weights: bool = False) -> GreedyObsResult:
    """Exact greedy OBS for every row of a block; see the module docstring.

    Results match :func:`greedy_obs_torch` on the same inputs: masks and orders exactly
    (up to exact-tie rounding), weights and step losses to fp32 rounding. ``keep_step_weights``
    (the weights after every step) is a torch-backend option: the Triton kernels keep their
    state on chip and raise rather than write it out.
    """
    _check_arguments(weight, hessian_inverse, prune_counts, max_steps, group_size, group_prune,
                     free_columns)
    if resolve_backend(backend, weight) == "triton":
        if keep_step_weights:
            raise ValueError("keep_step_weights is a torch-backend option; the Triton kernels do "
                             "not write out per-step weights")
        return _launch_triton(weight, hessian_inverse, prune_counts, max_steps,
                              group_size=group_size, group_prune=group_prune,
                              free_columns=free_columns)
    return greedy_obs_torch(weight, hessian_inverse, prune_counts, max_steps,
                            group_size=group_size, group_prune=group_prune,
                            free_columns=free_columns, keep_step_weights=keep_step_weights)
