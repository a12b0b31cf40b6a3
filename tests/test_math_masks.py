import pytest
import torch

from obs_compress.errors import InvalidArgument
from obs_compress_kernels import nm_mask
from obs_compress.math.masks import (Pattern, allocate_by_increments, check_pattern_fits,
                                     check_sparsity, mask_lowest, parse_pattern,
                                     prune_count, split_count)
from obs_compress.math.saliency import magnitude_saliency, obd_saliency, obs_saliency


def test_saliencies_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0]])
    assert magnitude_saliency(w).tolist() == [[1.0, 4.0, 9.0]]
    assert obd_saliency(w, torch.tensor([2.0, 1.0, 0.5])).tolist() == [[1.0, 2.0, 2.25]]
    assert obs_saliency(w, torch.tensor([0.5, 2.0, 4.5])).tolist() == [[1.0, 1.0, 1.0]]


def test_parse_pattern():
    assert parse_pattern("unstructured") == Pattern()
    assert parse_pattern("2:4") == Pattern(2, 4) and parse_pattern("2:4").sparsity == 0.5
    assert parse_pattern(" 4 : 8 ").pruned_per_group == 4
    for bad, message in [("4:4", "0 < N < M"), ("0:4", "0 < N < M"), ("5:4", "0 < N < M"),
                         ("2-4", "unstructured' or 'N:M'"), (24, "unstructured' or 'N:M'")]:
        with pytest.raises(InvalidArgument, match=message):
            parse_pattern(bad)


def test_sparsity_bounds():
    assert check_sparsity(0) == 0.0 and check_sparsity(0.999) == 0.999
    for bad in (1.0, 1.5, -0.1, float("nan"), "0.5", True):
        with pytest.raises(InvalidArgument, match=r"sparsity must be a number in \[0, 1\)"):
            check_sparsity(bad)


def test_pattern_must_divide_width():
    check_pattern_fits(Pattern(2, 4), 64)
    with pytest.raises(InvalidArgument, match="M=4 to divide the input width d_in=30"):
        check_pattern_fits(Pattern(2, 4), 30, "blk.q")


def test_counts_round_half_up_and_split_exactly():
    assert prune_count(576, 0.7) == 403 and prune_count(5, 0.5) == 3 and prune_count(4, 0.5) == 2
    shares = [split_count(577, s, min(s + 128, 577), 0.7, rows=3) for s in range(0, 577, 128)]
    assert sum(shares) == prune_count(3 * 577, 0.7)


def test_nm_mask_hand_oracle():
    # Weights 1..8 in two groups of 4: 2:4 prunes the two smallest of each group.
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 8.0, 5.0, 7.0, 6.0]])
    mask = nm_mask(scores, 2, 4)
    assert mask.tolist() == [[False, True, False, True, False, True, False, True]]
    assert nm_mask(scores, 1, 4).sum().item() == 6


def test_row_and_layer_masks():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    assert mask_lowest(scores, 0.5, "row").sum(1).tolist() == [2, 2]
    layer = mask_lowest(scores, 0.5, "layer")
    assert layer[0].all() and not layer[1].any()
    with pytest.raises(InvalidArgument, match="allocation"):
        mask_lowest(scores, 0.5, "column")


def test_allocation_picks_smallest_increments_as_prefixes():
    step_loss = torch.tensor([[1.0, 5.0, 6.0], [2.0, 3.0, 4.0], [0.5, 0.1, 9.0]])
    # Row 2's increments are made monotone (0.5, 0.5, 9): it takes two before row 1's third.
    counts = allocate_by_increments(step_loss, 5)
    assert counts.tolist() == [1, 2, 2]
    assert allocate_by_increments(step_loss, 0).tolist() == [0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,k", [(1, 1), (10, 0), (10, 3), (1000, 999), (5_000_003, 1_234_567)])
def test_lowest_mask_is_the_stable_sort_prefix_in_chunks(dtype, n, k):
    """Radix selection in chunks (no whole-matrix sort) marks exactly what a stable sort puts
    first: ties, zeros and negatives included, across chunk edges."""
    from obs_compress.math.masks import lowest_mask

    generator = torch.Generator().manual_seed(n)
    scores = torch.randn(n, generator=generator, dtype=dtype)
    scores[::7] = 0.0
    scores[::11] = -1.5
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.sort(scores, stable=True).indices[:k]] = True
    assert torch.equal(lowest_mask(scores, k), expected)
