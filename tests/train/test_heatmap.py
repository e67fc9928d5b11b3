"""Attention heatmaps: percentiles, overlap averaging, tissue clipping, the TIFF and ``wsimil predict``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.infer.heatmap import (attention_heatmap, default_downsample, percentile_scores,
                                         top_k_patches, write_heatmap)


def grid(n: int = 10, size: int = 256, stride: int = 128):
    xs = np.arange(n) * stride
    xx, yy = np.meshgrid(xs, xs)
    return np.stack([xx.ravel(), yy.ravel()], 1), size


def test_percentiles_match_scipy_and_keep_order() -> None:
    from scipy.stats import percentileofscore

    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=50), 1)  # ties included
    p = percentile_scores(s)
    assert p.min() > 0 and p.max() <= 1
    ref = np.array([percentileofscore(s, v, kind="rank") / 100 for v in s])
    np.testing.assert_allclose(p, ref, atol=1e-6)
    order = np.argsort(s)
    assert np.all(np.diff(p[order]) >= 0)
    assert np.all((np.diff(s[order]) > 0) <= (np.diff(p[order]) > 0))


def test_hot_square_and_tissue_clipping() -> None:
    coords, size = grid()
    hot = (coords[:, 0] >= 512) & (coords[:, 0] < 768) & (coords[:, 1] >= 256) & (coords[:, 1] < 512)
    scores = np.where(hot, 1.0, 0.01) + np.random.default_rng(1).uniform(0, 1e-3, len(coords))
    H0 = W0 = 2048  # patches cover only [0, 1408): the rest has no patch
    heat = attention_heatmap(coords, scores, size, (H0, W0), 16)
    assert heat.dtype == np.float32 and heat.shape == (128, 128)
    assert 0 <= heat.min() and heat.max() <= 1
    r, c = np.unravel_index(np.argmax(heat), heat.shape)
    assert 512 <= c * 16 < 768 + size and 256 <= r * 16 < 512 + size
    assert heat[100:, :].max() == 0 and heat[:, 100:].max() == 0  # no patch there
    # a tissue mask on its own grid (downsample 32) covering only the left half
    from napari_wsimil.slide.tissue import TissueMask

    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    tm = TissueMask(mask=mask, downsample=32.0, mpp=16.0, slide_shape=(H0, W0))
    clipped = attention_heatmap(coords, scores, size, (H0, W0), 16, tissue=tm)
    assert clipped[:, 64:].max() == 0 and np.array_equal(clipped[:, :64], heat[:, :64])
    blurred = attention_heatmap(coords, scores, size, (H0, W0), 16, blur_sigma_px=2.0)
    assert blurred.shape == heat.shape and 0 <= blurred.min() and blurred.max() <= 1


def test_overlap_averages() -> None:
    coords = np.array([[0, 0], [128, 0]])
    heat = attention_heatmap(coords, np.array([0.0, 1.0]), 256, (256, 512), 16, percentile=False)
    assert heat.shape == (16, 32)
    np.testing.assert_allclose(heat[:, 8:16], 0.5)  # x 128–256: both patches
    np.testing.assert_allclose(heat[:, :8], 0.0)
    np.testing.assert_allclose(heat[:, 16:24], 1.0)
    np.testing.assert_allclose(heat[:, 24:], 0.0)  # no patch
    assert not np.isnan(heat).any()


def test_default_downsample_bounds() -> None:
    assert default_downsample(256, (2048, 2048)) == 64  # a patch spans 4 px
    assert default_downsample(8, (100_000, 200_000)) == pytest.approx(200_000 / 4096)
    assert default_downsample(2, (100, 100)) == 1.0


def test_top_k() -> None:
    coords, _ = grid(4)
    scores = np.arange(16, dtype=float)
    top = top_k_patches(coords, scores, k=3)
    assert [t[2] for t in top] == [15.0, 14.0, 13.0]
    assert top[0][:2] == (int(coords[15, 0]), int(coords[15, 1]))
    assert len(top_k_patches(coords, scores, k=100)) == 16


def test_written_heatmap_reopens_aligned(tmp_path: Path) -> None:
    from napari_wsimil import open_slide

    heat = np.zeros((300, 500), np.float32)
    heat[100:200, 200:300] = 1.0
    heat[0, 0] = 0.5
    path = write_heatmap(tmp_path / "h.tif", heat, 0.25, 16)
    with open_slide(path) as s:
        assert s.mpp == pytest.approx(0.25 * 16)
        assert s.level_shapes[0] == (300, 500)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["downsample"] == 16 and meta["colormap"] and meta["mpp"] == pytest.approx(4.0)
    import tifffile

    with tifffile.TiffFile(path) as tf:
        img = tf.pages[0].asarray()
    assert img.dtype == np.uint8 and img[150, 250] == 255 and img[0, 0] == 128 and img[250, 50] == 0


def test_predict_writes_one_heatmap_per_slide(tmp_path: Path) -> None:
    import torch

    from napari_wsimil.slide.synthetic import synthesize_cohort

    from .test_cli_end_to_end import run_cli

    torch.set_num_threads(1)
    cohort = synthesize_cohort(tmp_path / "cohort", 4, seed=0, size=1024)
    run, pred = tmp_path / "run", tmp_path / "pred"
    assert run_cli(["train", str(cohort), "--method", "abmil", "--out", str(run), "--epochs", "1",
                    "--encoder", "handcrafted", "--patch", "128", "--mpp", "1.0", "--device", "cpu"]) == 0
    assert run_cli(["predict", str(run), "--cohort", str(cohort), "--out", str(pred), "--device", "cpu"]) == 0
    with open(cohort, newline="") as fh:
        paths = {r["slide_id"]: cohort.parent / r["path"] for r in csv.DictReader(fh)}
    ids = list(paths)
    from napari_wsimil import open_slide

    for sid in ids:
        tif = pred / "heatmaps" / f"{sid}.tif"
        meta = json.loads(tif.with_suffix(".json").read_text())
        with open_slide(tif) as h:
            assert h.mpp == pytest.approx(meta["slide_mpp"] * meta["downsample"])
            hshape = h.level_shapes[0]
        with open_slide(paths[sid]) as sl:
            w, hh = sl.dimensions
        assert hshape == (int(np.ceil(hh / meta["downsample"])), int(np.ceil(w / meta["downsample"])))
        with open(pred / "heatmaps" / f"{sid}_topk.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert 1 <= len(rows) <= 8 and list(rows[0]) == ["rank", "x", "y", "score"]
        # clipped to tissue: no heat where the slide's tissue mask is empty
        from napari_wsimil.infer.heatmap import _tissue_on_grid
        from napari_wsimil.slide.tissue import tissue_mask

        assert meta["clipped_to_tissue"] and meta["overlap"] == 0.0
        with open_slide(paths[sid]) as sl, open_slide(tif) as h:
            on = _tissue_on_grid(tissue_mask(sl), hshape, meta["downsample"])
            heat = np.asarray(h.levels[0][..., 0])
        assert heat[~on].max(initial=0) == 0 and heat[on].max() > 0

    # 50 % overlap: CLAM's re-extraction, about four times the patches, same geometry
    pred_o = tmp_path / "pred_overlap"
    assert run_cli(["predict", str(run), "--cohort", str(cohort), "--out", str(pred_o), "--device", "cpu",
                    "--heatmap-overlap", "0.5"]) == 0
    for sid in ids:
        plain = json.loads((pred / "heatmaps" / f"{sid}.json").read_text())
        over = json.loads((pred_o / "heatmaps" / f"{sid}.json").read_text())
        assert over["overlap"] == 0.5 and over["downsample"] == plain["downsample"]
        assert over["n_patches"] > 2 * plain["n_patches"]
    assert run_cli(["predict", str(run), "--cohort", str(cohort), "--out", str(tmp_path / "bad"),
                    "--heatmap-overlap", "1.5"]) == 2
    pred2 = tmp_path / "pred2"
    assert run_cli(["predict", str(run), "--cohort", str(cohort), "--out", str(pred2), "--device", "cpu",
                    "--no-heatmaps"]) == 0
    assert (pred2 / "predictions.csv").is_file() and not (pred2 / "heatmaps").exists()


def test_threshold_polygons_cover_exactly_the_pixels_above_the_threshold() -> None:
    """Smoothed noise cut into hundreds of regions, with holes and islands in holes: a pixel centre lies in
    the polygons exactly when its value is above the threshold; each polygon is one 4-connected region."""
    import shapely
    from scipy import ndimage as ndi

    from napari_wsimil.infer.heatmap import threshold_polygons

    rng = np.random.default_rng(3)
    heat = ndi.gaussian_filter(rng.standard_normal((120, 150)), 1.5)
    thr = float(np.quantile(heat, 0.6))
    d = 8.0
    polys = threshold_polygons(heat, d, thr)
    mask = heat > thr
    _, n_regions = ndi.label(mask)
    assert len(polys) == n_regions > 100
    assert any(len(p.interiors) for p in polys)  # holes kept
    rr, cc = np.mgrid[:120, :150]
    inside = shapely.contains_xy(shapely.union_all(polys), (cc.ravel() + 0.5) * d, (rr.ravel() + 0.5) * d)
    assert np.array_equal(inside.reshape(mask.shape), mask)
    clipped = threshold_polygons(heat, d, thr, bounds=(600.0, 480.0))  # the slide ends mid-map
    assert shapely.union_all(clipped).bounds[2] <= 600.0 and shapely.union_all(clipped).bounds[3] <= 480.0
