"""The rule ZoomMIL's localisation is scored by, on a hand-made zoom path: read deeper ranks higher; within a
depth, the attention of the deepest patch read decides; unread children share their ancestor's score."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wsimil.zoommil.localisation import path_scores


def test_path_scores_rank_by_depth_then_attention() -> None:
    # two lowest patches, steps of 2× then 2× (4 children each): 32 finest patches
    rows = [np.array([0, 1]), np.array([4, 5, 6, 7]), np.array([20, 21, 22, 23])]
    attention = [np.array([0.3, 0.7]), np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.4, 0.3, 0.2, 0.1])]
    s = path_scores(2, [2, 2], rows, attention)
    assert s.shape == (32,)
    assert np.allclose(s[:16], 0.5 * 0.3 / 0.7)  # lowest patch 0, never zoomed into
    for child, a in zip(range(4, 8), [0.1, 0.2, 0.3, 0.4]):  # mid-level patches read, their children share
        if child == 5:
            continue
        assert np.allclose(s[child * 4:child * 4 + 4], 1 + 0.5 * a / 0.4)
    assert np.allclose(s[20:24], 2 + 0.5 * np.array([0.4, 0.3, 0.2, 0.1]) / 0.4)
    # depth first: the least attended finest patch read outranks the best mid-level one
    assert s[20:24].min() > s[16:20].max() > s[:16].max()


def test_path_scores_without_attention_mass_and_unread_levels() -> None:
    s = path_scores(3, [2], [np.arange(3), np.array([], np.int64)], [np.zeros(3), np.zeros(0)])
    assert s.shape == (12,) and np.all(s == 0)
    with pytest.raises(IndexError):
        path_scores(1, [2], [np.array([0]), np.array([9])], [np.ones(1), np.ones(1)])
