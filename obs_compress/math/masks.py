"""Sparsity patterns, exact prune counts, and masks from scores.

Shapes: scores and masks ``(d_out, d_in)``; a mask is bool, True where a weight is pruned.

* Unstructured with ``allocation="row"``: every row prunes the same count.
* Unstructured with ``allocation="layer"``: the layer prunes ``round(sparsity * numel)``
  in total, rows differ.
* ``N:M`` (NVIDIA's convention): at most N nonzeros in every group of M consecutive inputs,
  so every group holds exactly ``M - N`` zeros and the sparsity is ``1 - N/M``. The N:M
  mask from scores is :func:`obs_compress_kernels.nm_mask` (one tie rule, CPU and GPU).

Counts round half up: ``count(total, s) = floor(s * total + 0.5)``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import InvalidArgument

ALLOCATIONS = ("row", "layer")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: ``unstructured``, or ``N:M`` with ``n`` kept of every ``m``."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def pruned_per_group(self) -> int:
        return self.m - self.n

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """``"unstructured"`` or ``"N:M"`` with ``0 < N < M``."""
    if isinstance(pattern, Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise InvalidArgument(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    if pattern.strip().lower() == "unstructured":
        return Pattern()
    match = _NM.match(pattern)
    if not match:
        raise InvalidArgument(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise InvalidArgument(f"pattern {pattern!r}: N:M needs 0 < N < M (N kept of every M), "
                              f"got N={n}, M={m}")
    return Pattern(n, m)


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
            or not math.isfinite(sparsity) or not 0.0 <= sparsity < 1.0:
        raise InvalidArgument(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def check_pattern_fits(pattern: Pattern, d_in: int, name: str = "") -> None:
    if pattern.is_nm and d_in % pattern.m != 0:
        raise InvalidArgument(
            f"layer {name or '?'}: pattern {pattern} needs M={pattern.m} to divide the input "
            f"width d_in={d_in}; choose an M that divides {d_in} or exclude this layer")


def prune_count(total: int, sparsity: float) -> int:
    """Weights to prune out of ``total`` at ``sparsity``, rounded half up."""
    return int(math.floor(sparsity * total + 0.5))


def split_count(total_width: int, start: int, end: int, sparsity: float, rows: int = 1) -> int:
    """The share of ``prune_count(rows * total_width)`` that falls in columns ``[start, end)``.

    Shares of consecutive ranges add up exactly to the whole count.
    """
    return prune_count(rows * end, sparsity) - prune_count(rows * start, sparsity)


# Elements handled at a time by lowest_mask (its temporaries are a few such chunks).
SELECT_CHUNK = 1 << 22
_DIGIT = 16  # bits of the key resolved per pass of lowest_mask


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """Integers with the order of the float ``values`` (same width): the float's bits, the
    lower bits flipped for negatives (IEEE 754 sign-magnitude to two's complement)."""
    integer = {torch.float32: torch.int32, torch.float64: torch.int64}.get(values.dtype)
    if integer is None:
        values, integer = values.float(), torch.int32
    bits = values.contiguous().view(integer)
    flip = torch.iinfo(integer).max
    return torch.where(bits < 0, bits ^ flip, bits)


def lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A bool mask of ``scores``' shape, True at its ``count`` smallest values (ties at the
    threshold go to the lowest flat index), found by radix selection in chunks.

    ``torch.topk`` or ``kthvalue`` over the whole matrix sort a copy with int64 indices:
    0.7 GB of temporaries for a 33.5M-element stacked gate/up weight of a 1.5B Llama, more
    than the block itself. Here the k-th smallest value is found 16 bits of its order key at
    a time from histograms of each chunk (two passes in float32, four in float64), then
    marked in one pass; temporaries are a few chunks of :data:`SELECT_CHUNK` elements."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if count <= 0:
        return mask.view(scores.shape)
    if count >= flat.numel():
        return mask.fill_(True).view(scores.shape)
    width = 64 if flat.dtype == torch.float64 else 32
    chunks = range(0, flat.numel(), SELECT_CHUNK)
    remaining = count
    prefix = None  # the chosen key's bits above `shift`, as an (arithmetic) shifted key
    for shift in range(width - _DIGIT, -1, -_DIGIT):
        histogram = torch.zeros(1 << _DIGIT, dtype=torch.long, device=flat.device)
        for start in chunks:
            keys = _order_keys(flat[start:start + SELECT_CHUNK])
            if prefix is not None:
                keys = keys[(keys >> (shift + _DIGIT)) == prefix]
            digits = (keys >> shift) & ((1 << _DIGIT) - 1)
            if prefix is None:  # the top digit is signed: offset it into [0, 2^16)
                digits = (keys >> shift) + (1 << (_DIGIT - 1))
            histogram += torch.bincount(digits.long(), minlength=1 << _DIGIT)
        cumulative = histogram.cumsum(0)
        digit = int(torch.searchsorted(cumulative, torch.tensor(remaining, device=flat.device)))
        remaining -= int(cumulative[digit - 1]) if digit > 0 else 0
        prefix = digit - (1 << (_DIGIT - 1)) if prefix is None else (prefix << _DIGIT) | digit
    threshold = prefix  # the full key of the count-th smallest value
    for start in chunks:  # below the threshold, then ties by index until the count is met
        keys = _order_keys(flat[start:start + SELECT_CHUNK])
        mask[start:start + SELECT_CHUNK] = keys < threshold
    for start in chunks:
        if remaining == 0:
            break
        keys = _order_keys(flat[start:start + SELECT_CHUNK])
        ties = (keys == threshold).nonzero().flatten()[:remaining]
        mask[start + ties] = True
        remaining -= ties.numel()
    return mask.view(scores.shape)


def mask_lowest(scores: torch.Tensor, sparsity: float, allocation: str) -> torch.Tensor:
    """Prune the lowest scores: per row (``row``) or over the whole matrix (``layer``)."""
    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if allocation == "row":
        count = prune_count(cols, sparsity)
        if count:
            index = torch.topk(scores, count, dim=1, largest=False).indices
            mask.scatter_(1, index, True)
    elif allocation == "layer":
        mask = lowest_mask(scores, prune_count(rows * cols, sparsity))
    else:
        raise InvalidArgument(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    return mask


def allocate_by_increments(step_loss: torch.Tensor, total: int) -> torch.Tensor:
    """Per-row prune counts summing to ``total`` that minimise the summed predicted loss.

    ``step_loss: (rows, steps)`` holds each row's loss increase at each greedy step (the
    ExactOBS loss traces, Frantar et al. 2022, sec. 4). Increments are made non-decreasing
    along each row (running maximum) so that picking the ``total`` smallest over the whole
    layer always takes a prefix of every row's sequence.
    """
    rows, steps = step_loss.shape
    if total > rows * steps:
        raise InvalidArgument(f"cannot prune {total} weights in {rows} rows of {steps} steps")
    counts = torch.zeros(rows, dtype=torch.long, device=step_loss.device)
    if total == 0:
        return counts
    monotone = torch.cummax(step_loss, dim=1).values
    # step-major: equal increments are taken one step at a time across the rows, so rows
    # that cannot be told apart end within one weight of each other
    return lowest_mask(monotone.T.contiguous(), total).sum(dim=0)
