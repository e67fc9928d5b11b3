"""The rank-based AUC equals the pairwise Mann–Whitney definition, and needs no positives × negatives matrix."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch

from napari_wsimil.infer.metrics import auc, binary_auc
from napari_wsimil.train.engine import binary_auc as torch_auc
from napari_wsimil.train.engine import classification_metrics


def pairwise_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The definition: every (positive, negative) pair, ties one half."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def test_reference_values() -> None:
    assert binary_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == 0.75
    assert binary_auc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5
    assert binary_auc(np.array([1, 2, 3]), np.array([False, True, True])) == 1.0
    assert binary_auc(np.array([3, 2, 1]), np.array([False, True, True])) == 0.0
    assert math.isnan(binary_auc(np.array([1, 2]), np.array([True, True])))
    assert math.isnan(binary_auc(np.array([np.nan, 2]), np.array([True, False])))
    with pytest.raises(ValueError):
        binary_auc(np.array([1, 2, 3]), np.array([True, False]))


@pytest.mark.parametrize("seed", range(5))
def test_equals_pairwise_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    scores = rng.integers(0, 12, n).astype(float) / 7  # many ties
    positive = rng.random(n) < rng.uniform(0.05, 0.95)
    positive[0], positive[1] = True, False
    assert binary_auc(scores, positive) == pytest.approx(pairwise_auc(scores, positive), abs=1e-12)
    assert torch_auc(torch.tensor(scores), torch.tensor(positive)) == pytest.approx(
        pairwise_auc(scores, positive), abs=1e-12)


def test_multiclass_macro_and_engine_metrics_agree() -> None:
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(3), 60)
    labels = rng.integers(0, 3, 60)
    want = np.mean([pairwise_auc(probs[:, k], labels == k) for k in range(3)])
    assert auc(probs, labels) == pytest.approx(want)
    assert classification_metrics(torch.tensor(probs), torch.tensor(labels))["auc"] == pytest.approx(want)


def test_memory_is_linear_in_the_scores() -> None:
    """200k patches at 5 % tumour: the pairwise matrix would be 10k × 190k booleans (1.9 GB); ranks need a
    few arrays of 200k."""
    rng = np.random.default_rng(0)
    n = 200_000
    positive = rng.random(n) < 0.05
    scores = rng.normal(size=n) + positive
    tracemalloc.start()
    value = binary_auc(scores, positive)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 0.7 < value < 0.8  # a one-sigma shift: AUC = Φ(1/√2) ≈ 0.76
    assert peak < 40 * n * 8  # tens of float64 arrays of N, never N_pos × N_neg


@pytest.mark.parametrize("seed", range(3))
def test_average_ranks_are_scipys(seed: int) -> None:
    from scipy.stats import rankdata

    from napari_wsimil.infer.metrics import average_ranks

    rng = np.random.default_rng(seed)
    values = rng.integers(0, 9, int(rng.integers(1, 300))).astype(float)  # many ties
    np.testing.assert_array_equal(average_ranks(values), rankdata(values))
    np.testing.assert_array_equal(average_ranks(np.array([2.0])), [1.0])
