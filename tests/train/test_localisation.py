"""Localisation metrics on small synthetic masks: tumour fractions, patch AUC, lesions, NMS and FROC."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_wsimil.infer.localisation import (Lesions, candidates_from_scores, classify_candidates, froc,
                                              lesions_from_mask, patch_auc, patch_tumour_fraction)

# 0.5 µm/px at level 0, mask at downsample 20: one mask pixel is 10 µm; 75 µm dilation = 7.5 px.
MPP, DS = 0.5, 20.0


# -- tumour fractions ------------------------------------------------------------------------------------

def test_fraction_half_full_and_none():
    mask = np.zeros((40, 40), np.uint8)
    mask[0:4, :] = 1   # y in [0, 16): the top half of a 32-px patch at (0, 0) (downsample 4)
    mask[20:, 20:] = 255  # any value > 0 is tumour
    coords = np.array([[0, 0], [96, 96], [0, 96]])
    frac = patch_tumour_fraction(coords, 32.0, mask, 4.0)
    assert frac.tolist() == [0.5, 1.0, 0.0]


def test_fraction_partial_cells_and_clipping():
    mask = np.zeros((10, 10), np.uint8)
    mask[:, 0] = 1  # level-0 x in [0, 8) at downsample 8
    # patch of 32 px at x=0: sample x = 2, 6, ..., 30 -> 2 of 8 columns in mask column 0
    assert patch_tumour_fraction(np.array([[0, 0]]), 32.0, mask, 8.0)[0] == pytest.approx(0.25)
    # a patch reaching past the right edge reads the clipped edge column (tumour there)
    mask2 = np.zeros((10, 10), np.uint8)
    mask2[:, 9] = 1
    assert patch_tumour_fraction(np.array([[72, 0]]), 32.0, mask2, 8.0)[0] == pytest.approx(1.0)


def test_fraction_callable_equals_array_and_reads_small():
    rng = np.random.default_rng(0)
    mask = (rng.random((60, 80)) < 0.3).astype(np.uint8)
    coords = rng.integers(-20, 1300, size=(50, 2))
    coords[:10, 1] = 100  # several patches sharing a row
    calls: list[tuple[int, int]] = []

    class Reader:  # the MaskImage interface: .shape and .points(rows, cols)
        shape = mask.shape

        def points(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            calls.append((len(rows), len(cols)))
            assert np.all(np.diff(rows) > 0) and np.all(np.diff(cols) > 0)
            return mask[np.ix_(rows, cols)]

    a = patch_tumour_fraction(coords, 64.0, mask, 16.0, samples=6)
    b = patch_tumour_fraction(coords, 64.0, Reader().points, 16.0, samples=6)
    np.testing.assert_array_equal(a, b)
    assert len(calls) < len(coords)  # patches on one row share a call
    assert max(r for r, _ in calls) <= 6 and max(c for _, c in calls) < mask.shape[1]
    # brute force at the same sample points
    off = (np.arange(6) + 0.5) * 64.0 / 6
    for (x, y), f in zip(coords, a):
        r = np.clip(np.floor((y + off) / 16).astype(int), 0, 59)
        c = np.clip(np.floor((x + off) / 16).astype(int), 0, 79)
        assert f == pytest.approx(mask[np.ix_(r, c)].mean())


# -- patch AUC ---------------------------------------------------------------------------------------------

def test_patch_auc():
    frac = np.array([0.0, 0.1, 0.6, 1.0, 0.5, 0.2])
    perfect = frac + 0.01
    assert patch_auc(perfect, frac) == 1.0
    assert patch_auc(-perfect, frac) == 0.0
    assert patch_auc(np.ones(6), frac) == pytest.approx(0.5)
    assert math.isnan(patch_auc(perfect, np.zeros(6)))
    assert math.isnan(patch_auc(perfect, np.ones(6)))
    assert patch_auc(perfect, frac, positive_at=0.55) == 1.0
    assert patch_auc(np.array([0.0, 1.0]), np.array([0.0, 0.5])) == 1.0  # fraction == positive_at is positive


# -- lesions -----------------------------------------------------------------------------------------------

def _two_blobs(gap_px: int) -> np.ndarray:
    mask = np.zeros((60, 40 + 2 * 30 + gap_px), np.uint8)
    mask[15:45, 20:50] = 1                          # 300 µm squares, far above the ITC size
    mask[15:45, 50 + gap_px:80 + gap_px] = 1
    return mask


@pytest.mark.parametrize("gap_px, n", [(10, 1), (14, 1), (16, 2), (20, 2)])
def test_dilation_merges_only_close_blobs(gap_px, n):
    # 10 µm pixels: gaps of 100 and 140 µm are under 2·75 µm and merge; 160 and 200 µm do not
    les = lesions_from_mask(_two_blobs(gap_px), DS, MPP)
    assert les.n == n and not les.itc
    assert les.labels.dtype == np.int32 and les.labels.max() == n


def test_dilation_grows_labels_and_no_mpp_skips_it():
    mask = _two_blobs(10)
    les = lesions_from_mask(mask, DS, MPP)
    assert les.labels[14, 30] > 0 and les.labels[30, 20 - 7] > 0  # within 75 µm of tumour
    assert les.labels[30, 20 - 9] == 0                            # 90 µm away
    raw = lesions_from_mask(mask, DS, None)
    assert raw.n == 2 and raw.labels[14, 30] == 0 and not raw.itc


def test_itc_excluded_and_ignored():
    mask = np.zeros((100, 100), np.uint8)
    mask[10:40, 10:40] = 1   # 300 µm: a lesion
    mask[70:73, 70:73] = 1   # 30 µm: an isolated tumour cell cluster
    mask[10:12, 70:95] = 1   # 250 µm long: Feret sqrt(250² + 20²) ≈ 251 µm < 275 -> ITC
    les = lesions_from_mask(mask, DS, MPP)
    assert les.n == 1 and len(les.itc) == 2
    big = int(les.labels[20, 20])
    assert big > 0 and big not in les.itc
    assert int(les.labels[71, 71]) in les.itc
    # the 300 µm square's diagonal is 424 µm: a threshold above it makes every lesion an ITC
    assert lesions_from_mask(mask, DS, MPP, itc_um=430.0).n == 0
    assert lesions_from_mask(mask, DS, MPP, itc_um=420.0).n == 1
    # detections (level-0 x, y): the lesion, the small blob, background, outside the mask
    cand = np.array([[25 * DS, 25 * DS, 0.9], [71.5 * DS, 71.5 * DS, 0.8], [60 * DS, 5 * DS, 0.7],
                     [-5.0, 10.0, 0.6], [100 * DS + 1, 10.0, 0.5]])
    assert classify_candidates(cand, les).tolist() == [big, 0, -1, -1, -1]
    assert classify_candidates(np.zeros((0, 3)), les).shape == (0,)


def test_components_are_eight_connected():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:5, 2:5] = 1
    mask[5:8, 5:8] = 1    # touches the first only at a corner
    mask[12:15, 12:15] = 1
    les = lesions_from_mask(mask, DS, None)
    assert les.n == 2 and les.labels[3, 3] == les.labels[6, 6] != les.labels[13, 13]


def test_itc_uses_feret_not_bounding_box():
    # a disk 250 µm across: its bounding-box diagonal is ~354 µm, its longest diameter ~255 µm < 275
    yy, xx = np.mgrid[0:60, 0:60]
    disk = (((yy - 30) ** 2 + (xx - 30) ** 2) <= 12 ** 2).astype(np.uint8)  # 25 px = 250 µm wide
    les = lesions_from_mask(disk, DS, MPP)
    assert les.n == 0 and len(les.itc) == 1
    big = (((yy - 30) ** 2 + (xx - 30) ** 2) <= 14 ** 2).astype(np.uint8)   # 29 px = 290 µm wide
    assert lesions_from_mask(big, DS, MPP).n == 1


def test_empty_mask():
    les = lesions_from_mask(np.zeros((20, 20), np.uint8), DS, MPP)
    assert isinstance(les, Lesions) and les.n == 0 and not les.labels.any()


# -- non-maximum suppression -------------------------------------------------------------------------------

def test_nms_keeps_max_and_suppresses_neighbours():
    coords = np.array([[0, 0], [100, 0], [200, 0], [300, 0], [1000, 1000]])
    scores = np.array([0.2, 0.9, 0.5, 0.1, 0.8])
    cand = candidates_from_scores(coords, 100.0, scores, radius_level0=150.0)
    # 0.9 at centre (150, 50) suppresses the patches 100 px either side; 0.1 is 200 px away and stays
    np.testing.assert_allclose(cand, [[150, 50, 0.9], [1050, 1050, 0.8], [350, 50, 0.1]])
    assert candidates_from_scores(coords, 100.0, scores, 150.0, min_score=0.15)[:, 2].tolist() == [0.9, 0.8]
    assert candidates_from_scores(coords, 100.0, scores, 150.0, max_candidates=1)[:, 2].tolist() == [0.9]
    # with radius 50 nothing is suppressed
    assert len(candidates_from_scores(coords, 100.0, scores, 50.0)) == 5


def test_nms_suppressed_patch_does_not_suppress():
    coords = np.array([[0, 0], [100, 0], [200, 0]])
    cand = candidates_from_scores(coords, 10.0, np.array([0.9, 0.8, 0.7]), radius_level0=150.0)
    assert cand[:, 2].tolist() == [0.9, 0.7]


# -- FROC --------------------------------------------------------------------------------------------------

def test_froc_perfect_detector():
    slides = [(np.array([0.9, 0.8, 0.1]), np.array([1, 2, -1]), 2),
              (np.array([0.95, 0.05]), np.array([3, -1]), 1),
              (np.array([0.2, 0.15]), np.array([-1, -1]), 0)]  # a normal slide
    out = froc(slides)
    assert out["froc"] == pytest.approx(1.0)
    assert out["n_lesions"] == 3 and out["n_slides"] == 3
    assert out["curve"][0] == (0.0, 0.0)
    fps = [p[0] for p in out["curve"]]
    assert fps == sorted(fps)


def test_froc_only_false_positives():
    out = froc([(np.array([0.9, 0.5]), np.array([-1, -1]), 2), (np.array([0.3]), np.array([-1]), 0)])
    assert out["froc"] == 0.0
    assert all(v == 0.0 for v in out["sensitivity_at"].values())


def test_froc_no_lesions_is_nan():
    out = froc([(np.array([0.9]), np.array([-1]), 0)])
    assert math.isnan(out["froc"]) and out["n_lesions"] == 0


def test_froc_hand_computed():
    # Slide A (3 lesions): 0.9 -> lesion 1, 0.8 FP, 0.65 -> lesion 2, 0.5 -> lesion 1 again, 0.3 FP,
    #   0.2 -> ITC (ignored). Slide B (1 lesion): 0.7 -> lesion 1, 0.4 FP. Slide C (normal): 0.65 FP, 0.1 FP.
    # 3 slides, 4 lesions. (threshold: FPs / 3, lesions hit / 4)
    #   above all: 0, 0      0.9: 0, 1/4      0.8: 1/3, 1/4      0.7: 1/3, 2/4
    #   0.65: 2/3, 3/4 (C's FP and A's lesion 2 tie)   0.5: 2/3, 3/4   0.4: 1, 3/4
    #   0.3: 4/3, 3/4   0.2: 4/3, 3/4   0.1: 5/3, 3/4
    # rate 0.25: between (0, 1/4) and (1/3, 1/4) -> 1/4
    # rate 0.5:  between (1/3, 2/4) and (2/3, 3/4) -> 2/4 + (0.5 - 1/3) / (1/3) · 1/4 = 0.625
    # rate 1: exactly at (1, 3/4) -> 3/4; rates 2, 4, 8 beyond 5/3 -> final 3/4
    # FROC = (0.25 + 0.625 + 4 · 0.75) / 6 = 3.875 / 6 = 0.6458333...
    slides = [(np.array([0.9, 0.8, 0.65, 0.5, 0.3, 0.2]), np.array([1, -1, 2, 1, -1, 0]), 3),
              (np.array([0.7, 0.4]), np.array([1, -1]), 1),
              (np.array([0.65, 0.1]), np.array([-1, -1]), 0)]
    out = froc(slides)
    assert out["sensitivity_at"][0.25] == pytest.approx(0.25)
    assert out["sensitivity_at"][0.5] == pytest.approx(0.625)
    assert out["sensitivity_at"][1.0] == pytest.approx(0.75)
    assert out["sensitivity_at"][8.0] == pytest.approx(0.75)
    assert out["froc"] == pytest.approx(3.875 / 6)
    assert out["curve"][-1] == pytest.approx((5 / 3, 0.75))
    # numpy's own interpolation on the same curve (the official code's call) agrees
    fps, sens = np.array(out["curve"]).T
    for r, v in out["sensitivity_at"].items():
        assert np.interp(r, fps, sens) == pytest.approx(v)


def test_end_to_end_from_mask():
    mask = np.zeros((100, 100), np.uint8)
    mask[10:40, 10:40] = 1
    mask[70:73, 70:73] = 1
    les = lesions_from_mask(mask, DS, MPP)
    # a 10x10 grid of 200-px patches over the 2000-px slide; score = tumour fraction
    ys, xs = np.mgrid[0:2000:200, 0:2000:200]
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    frac = patch_tumour_fraction(coords, 200.0, mask, DS)
    assert patch_auc(frac, frac) == 1.0
    cand = candidates_from_scores(coords, 200.0, frac, radius_level0=400.0, min_score=0.01)
    hits = classify_candidates(cand, les)
    assert (hits > 0).any() and -1 not in hits.tolist()
    assert froc([(cand[:, 2], hits, les.n)])["froc"] == pytest.approx(1.0)
