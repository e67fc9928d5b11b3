"""Heatmap TIFFs as napari layer data, without a viewer: lazy single-channel levels, placed in the
slide's µm world so that they overlay it (extent and the position of a hot patch), and claimed by the
reader as heatmaps rather than as RGB slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_wsimil import open_slide
from napari_wsimil.infer.heatmap import attention_heatmap, default_downsample, write_heatmap
from napari_wsimil.layers import heatmap_layer_data, is_heatmap_file, slide_layer_data
from napari_wsimil.slide.synthetic import synthesize_slide

SHAPE = (1536, 2048)  # (h, w), not square, so a swapped axis shows
MPP = 0.5
PATCH = 256
HOT = (slice(1, 3), slice(5, 7))  # patch rows, columns scored 1; all others score 0


def patch_scores() -> tuple[np.ndarray, np.ndarray]:
    """A grid of level-0 patch corners (x, y) and scores: one hot square, cold elsewhere."""
    rows, cols = SHAPE[0] // PATCH, SHAPE[1] // PATCH
    r, c = np.mgrid[:rows, :cols]
    hot = np.zeros((rows, cols), bool)
    hot[HOT] = True
    coords = np.stack([c.ravel() * PATCH, r.ravel() * PATCH], 1)
    return coords, hot.ravel().astype(np.float64)


def hot_box_level0() -> tuple[float, float, float, float]:
    """(y0, y1, x0, x1) of the hot square in level-0 pixels (edges)."""
    return (HOT[0].start * PATCH, HOT[0].stop * PATCH, HOT[1].start * PATCH, HOT[1].stop * PATCH)


def make_heatmap(path: Path, slide_mpp: float | None, downsample: float | None = None) -> Path:
    coords, scores = patch_scores()
    ds = default_downsample(PATCH, SHAPE) if downsample is None else downsample
    heat = attention_heatmap(coords, scores, PATCH, SHAPE, ds, percentile=False)
    return write_heatmap(path, heat, slide_mpp, ds, extra={"slide_id": "case-1"})


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slide") / "case-1.tiff"
    synthesize_slide(path, SHAPE, seed=7, malignant=True, mpp=MPP)
    return path


def world_box(shape: tuple[int, ...], kwargs: dict) -> np.ndarray:
    """napari's world extent of an image's pixel edges: [[y0, x0], [y1, x1]]."""
    scale = np.asarray(kwargs.get("scale", (1.0, 1.0)), float)
    translate = np.asarray(kwargs.get("translate", (0.0, 0.0)), float)
    shape = np.asarray(shape[:2], float)
    return np.stack([translate - scale / 2, translate + (shape - 0.5) * scale])


@pytest.mark.parametrize("downsample", [None, 1.5, 37.5], ids=["default", "fine-2-levels", "odd"])
def test_heatmap_overlays_slide_extent(tmp_path: Path, slide_path: Path, downsample: float | None) -> None:
    path = make_heatmap(tmp_path / "case-1.tif", MPP, downsample)
    levels, kwargs, kind = heatmap_layer_data(path)
    ds = kwargs["metadata"]["wsimil"]["downsample"]
    with open_slide(slide_path) as slide:
        slide_levels, slide_kwargs, _ = slide_layer_data(slide)
        slide_box = world_box(slide_levels[0].shape, slide_kwargs)
    heat_box = world_box(levels[0].shape, kwargs)
    pixel = MPP * ds  # one heatmap pixel in µm
    assert kind == "image"
    assert kwargs["scale"] == pytest.approx((pixel, pixel))
    assert kwargs["translate"] == pytest.approx(((ds - 1) / 2 * MPP,) * 2)
    assert slide_box[1] == pytest.approx((SHAPE[0] * MPP - MPP / 2, SHAPE[1] * MPP - MPP / 2))
    np.testing.assert_allclose(heat_box[0], slide_box[0], atol=1e-9)  # same top-left pixel edge
    assert np.all(np.abs(heat_box - slide_box) < pixel), (heat_box, slide_box)
    assert np.all(heat_box[1] >= slide_box[1] - 1e-9), "the heatmap must cover the whole slide"


@pytest.mark.parametrize("downsample", [None, 37.5], ids=["default", "odd"])
def test_hot_patch_lands_on_its_patch(tmp_path: Path, downsample: float | None) -> None:
    """The hot pixels' world box is the hot patches' world box (pixel edges), within a heatmap pixel."""
    levels, kwargs, _ = heatmap_layer_data(make_heatmap(tmp_path / "h.tif", MPP, downsample))
    scale, translate = np.asarray(kwargs["scale"]), np.asarray(kwargs["translate"])
    hot = np.argwhere(np.asarray(levels[0]) > 200)
    first, last = hot.min(0), hot.max(0)
    world = np.stack([translate + (first - 0.5) * scale, translate + (last + 0.5) * scale])
    y0, y1, x0, x1 = hot_box_level0()
    expected = (np.array([[y0, x0], [y1, x1]]) - 0.5) * MPP  # level-0 pixel edges in napari's world
    assert np.all(np.abs(world - expected) <= scale[0] + 1e-9), (world, expected)


def test_heatmap_levels_are_lazy_single_channel(tmp_path: Path) -> None:
    import dask.array as da
    import tifffile

    path = make_heatmap(tmp_path / "h.tif", MPP, 1.5)  # 1366 px wide: more than one level
    levels, kwargs, _ = heatmap_layer_data(path)
    assert len(levels) >= 2
    assert all(isinstance(level, da.Array) for level in levels)
    assert all(level.ndim == 2 and level.dtype == np.uint8 for level in levels)
    assert [level.shape[1] for level in levels] == sorted((level.shape[1] for level in levels), reverse=True)
    assert max(levels[0].chunksize) <= 512, "level 0 must be read tile by tile, not whole"
    window = levels[1][100:300, 200:700].compute()
    np.testing.assert_array_equal(window, tifffile.imread(path, level=1)[100:300, 200:700])
    assert kwargs["multiscale"] is True and kwargs["rgb"] is False


def test_heatmap_layer_kwargs(tmp_path: Path) -> None:
    path = make_heatmap(tmp_path / "case-1.tif", MPP)
    ds = default_downsample(PATCH, SHAPE)
    _, kwargs, _ = heatmap_layer_data(path, opacity=0.7)
    assert kwargs["colormap"] == "inferno"
    assert kwargs["contrast_limits"] == (0, 255)
    assert kwargs["blending"] in ("translucent", "additive")
    assert kwargs["opacity"] == 0.7
    assert kwargs["units"] == ("µm", "µm")
    assert kwargs["name"] == "case-1 heatmap"
    assert heatmap_layer_data(path, name="mine")[1]["name"] == "mine"
    meta = kwargs["metadata"]["wsimil"]
    assert meta["kind"] == "heatmap" and meta["path"] == str(path) and meta["slide_id"] == "case-1"
    assert meta["downsample"] == pytest.approx(ds) and meta["mpp"] == pytest.approx(MPP * ds)


def test_heatmap_without_mpp_lives_in_slide_pixels(tmp_path: Path) -> None:
    """A slide of unknown pixel size is shown in level-0 pixels; its heatmap must be too."""
    ds = default_downsample(PATCH, SHAPE)
    _, kwargs, _ = heatmap_layer_data(make_heatmap(tmp_path / "h.tif", None))
    assert kwargs["scale"] == pytest.approx((ds, ds))
    assert kwargs["translate"] == pytest.approx(((ds - 1) / 2,) * 2)
    assert "units" not in kwargs


def test_is_heatmap_file(tmp_path: Path, slide_path: Path) -> None:
    heat = make_heatmap(tmp_path / "h.tif", MPP)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\x00" + b"\x00" * 100)
    text = tmp_path / "notes.tif"
    text.write_text("not a tiff")
    assert is_heatmap_file(heat)
    assert not is_heatmap_file(slide_path)
    assert not is_heatmap_file(junk)
    assert not is_heatmap_file(text)
    assert not is_heatmap_file(tmp_path / "missing.tif")
    with pytest.raises(ValueError, match="not a wsimil attention heatmap"):
        heatmap_layer_data(slide_path)


def test_reader_opens_heatmap_as_heatmap_and_slide_as_slide(tmp_path: Path, slide_path: Path) -> None:
    from napari_wsimil._reader import napari_get_reader

    heat = make_heatmap(tmp_path / "case-1.tif", MPP)
    [(levels, kwargs, kind)] = napari_get_reader(str(heat))(str(heat))
    assert kind == "image" and kwargs["rgb"] is False and levels[0].ndim == 2
    assert kwargs["metadata"]["wsimil"]["kind"] == "heatmap"
    [(slide_levels, slide_kwargs, _)] = napari_get_reader([str(slide_path)])(str(slide_path))
    assert slide_kwargs["rgb"] is True and slide_kwargs["metadata"]["wsimil"]["kind"] == "slide"
    slide_kwargs["metadata"]["slide"].close()
