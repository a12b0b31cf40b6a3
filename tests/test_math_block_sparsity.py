"""OWL block sparsities: outlier fractions by hand, totals kept, clear errors."""

import pytest
import torch

from obs_compress.errors import InvalidArgument
from obs_compress.math.block_sparsity import outlier_fraction, owl_sparsities


def test_outlier_fraction_by_hand():
    # Scores |W_ij| ||X_j|| pooled over both layers: [1, 2, 1, 2] and [0, 10]; mean 16/6.
    first = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    second = torch.tensor([[0.0, 5.0]])
    norms = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0])]
    assert outlier_fraction([first, second], norms, threshold=3.0) == pytest.approx(1 / 6)
    assert outlier_fraction([first, second], norms, threshold=0.5) == pytest.approx(3 / 6)  # 2, 2, 10 > 4/3
    # Only ratios matter: scaling the norms changes nothing.
    scaled = [n * 7 for n in norms]
    assert outlier_fraction([first, second], scaled, threshold=3.0) == pytest.approx(1 / 6)


def test_owl_sparsities_keep_the_total_and_favour_outlier_blocks():
    fractions = [0.010, 0.030, 0.020, 0.000]
    sizes = [100, 100, 300, 100]
    sparsities = owl_sparsities(fractions, sizes, target=0.7, spread=0.08)
    total = sum(s * n for s, n in zip(sparsities, sizes))
    assert total == pytest.approx(0.7 * sum(sizes), abs=1e-12)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)
    # More outliers, fewer pruned weights; linear in the fraction.
    assert sparsities[1] < sparsities[2] < sparsities[0] < sparsities[3]
    assert sparsities[3] - sparsities[1] == pytest.approx(0.16)
    assert sparsities[0] - sparsities[1] == pytest.approx(0.16 * 2 / 3)


def test_owl_sparsities_degenerate_and_errors():
    assert owl_sparsities([0.02, 0.02], [1, 1], 0.5, 0.08) == [0.5, 0.5]
    assert owl_sparsities([0.01, 0.02], [1, 1], 0.5, 0.0) == [0.5, 0.5]
    with pytest.raises(InvalidArgument, match=r"use a spread of at most 0\.025"):
        owl_sparsities([0.0, 0.0, 1.0], [1, 1, 1], 0.05, 0.08)
    with pytest.raises(InvalidArgument, match="one size per"):
        owl_sparsities([0.1], [1, 2], 0.5, 0.08)
    assert owl_sparsities([0.01, 0.03], [1, 1], 0.0, 0.08) == [0.0, 0.0]
    with pytest.raises(InvalidArgument, match="finite"):
        owl_sparsities([0.1, float("nan")], [1, 1], 0.5, 0.08)
    with pytest.raises(InvalidArgument, match="at least one entry"):
        outlier_fraction([torch.ones(0, 2)], [torch.ones(2)], threshold=1.0)
    with pytest.raises(InvalidArgument, match="threshold"):
        outlier_fraction([torch.ones(2, 2)], [torch.ones(2)], threshold=0)
