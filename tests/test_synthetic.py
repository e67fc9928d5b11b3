"""The synthetic cohort: reproducible pixels, exact and sensible ground truth, files both readers open."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_wsimil.cli import main
from napari_wsimil.errors import WsimilError
from napari_wsimil.slide import synthetic
from napari_wsimil.slide.synthetic import SlideModel, synthesize_cohort, synthesize_slide
from napari_wsimil.slide.tiff_writer import write_image_pyramid, write_pyramid

SIZE = 1536
SEED = 11


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize_cohort(tmp_path_factory.mktemp("cohort"), 4, seed=SEED, size=SIZE, workers=2)


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


def _block_mean(img: np.ndarray, ds: int, shape: tuple[int, int]) -> np.ndarray:
    """Mean grey value of each ds x ds block, cropped to the mask's shape."""
    h, w = shape
    grey = img[: h * ds, : w * ds].astype(np.float32).mean(axis=2)
    return grey.reshape(h, ds, w, ds).mean(axis=(1, 3))


def _tumour_tile(model: SlideModel) -> tuple[int, int]:
    gt = model.ground_truth()
    ys, xs = np.nonzero(gt)
    k = len(ys) // 2
    return int(ys[k] * model.gt_downsample) // 256, int(xs[k] * model.gt_downsample) // 256


# --------------------------------------------------------------------------------- determinism


def test_same_seed_same_pixels_other_seed_other_pixels():
    a = SlideModel((SIZE, SIZE), seed=5, malignant=True)
    b = SlideModel((SIZE, SIZE), seed=5, malignant=True)
    c = SlideModel((SIZE, SIZE), seed=6, malignant=True)
    ty, tx = _tumour_tile(a)
    for tile in [(ty, tx), (3, 4), (0, 0)]:
        assert a.render_tile(*tile).tobytes() == b.render_tile(*tile).tobytes()
    assert np.array_equal(a.ground_truth(), b.ground_truth())
    assert not np.array_equal(a.render_tile(ty, tx), c.render_tile(ty, tx))


def test_same_seed_gives_byte_identical_files(tmp_path):
    # thread scheduling must not leak into the file: 1 worker and 3 workers write the same bytes
    one = synthesize_slide(tmp_path / "a.tiff", 768, seed=3, malignant=True, workers=1)
    three = synthesize_slide(tmp_path / "b.tiff", 768, seed=3, malignant=True, workers=3)
    assert one.path.read_bytes() == three.path.read_bytes()
    assert one.gt_mask.read_bytes() == three.gt_mask.read_bytes()


def test_no_seam_between_tiles():
    """Nuclei cross tile borders whole: the step across a border is like a step inside a tile."""
    model = SlideModel((SIZE, SIZE), seed=5, malignant=True)
    ty, tx = _tumour_tile(model)
    left = model.render_tile(ty, tx).astype(np.float32)
    right = model.render_tile(ty, tx + 1).astype(np.float32)
    across = np.abs(left[:, -1] - right[:, 0]).mean()
    inside = np.abs(np.diff(left, axis=1)).mean()
    assert across < 1.5 * inside + 1.0


# ------------------------------------------------------------------------------------- cohort


def test_cohort_csv_columns_labels_and_paths(cohort: Path):
    with open(cohort, newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["slide_id", "path", "label", "gt_mask", "gt_downsample"]
    rows = _rows(cohort)
    assert len(rows) == 4
    assert sorted(int(r["label"]) for r in rows) == [0, 0, 1, 1]
    assert len({r["slide_id"] for r in rows}) == 4
    for r in rows:
        # paths are relative to the CSV's folder
        assert not Path(r["path"]).is_absolute()
        assert (cohort.parent / r["path"]).is_file()
        assert (cohort.parent / r["gt_mask"]).is_file()
        ds = int(r["gt_downsample"])
        mask = tifffile.imread(cohort.parent / r["gt_mask"], key=0)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert mask.shape == (-(-SIZE // ds), -(-SIZE // ds))


def test_ground_truth_fraction_and_appearance(cohort: Path):
    for r in _rows(cohort):
        ds = int(r["gt_downsample"])
        mask = tifffile.imread(cohort.parent / r["gt_mask"], key=0).astype(bool)
        img = tifffile.imread(cohort.parent / r["path"], key=0)
        grey = _block_mean(img, ds, mask.shape)
        tissue = grey < 225  # background glass is ~240
        assert 0.1 < tissue.mean() < 0.8
        if r["label"] == "0":
            assert not mask.any()
            continue
        fraction = (mask & tissue).sum() / tissue.sum()
        assert 0.001 <= fraction <= 0.10, fraction
        assert (mask & tissue).sum() >= 0.9 * mask.sum()  # tumour lies in tissue
        # tumour is darker (crowded nuclei, haematoxylin-rich) than the rest of the tissue ...
        inside, outside = grey[mask & tissue].mean(), grey[tissue & ~mask].mean()
        assert inside < outside - 15, (inside, outside)
        # ... and holds more nuclear (dark purple) pixels
        full = np.repeat(np.repeat(mask, ds, 0), ds, 1)[: img.shape[0], : img.shape[1]]
        tissue_px = np.repeat(np.repeat(tissue, ds, 0), ds, 1)[: img.shape[0], : img.shape[1]]
        nuclear = (img[..., 0] < 150) & (img[..., 2] > img[..., 1])
        assert nuclear[full].mean() > 3 * nuclear[tissue_px & ~full].mean()


def test_synthesize_slide_reports_truth(tmp_path):
    truth = synthesize_slide(tmp_path / "m.tiff", (1024, 1536), seed=8, malignant=True, mpp=0.25)
    assert truth.gt_mask == tmp_path / "m_gt.tiff" and truth.gt_mask.is_file()
    assert truth.shape == (1024, 1536) and truth.mpp == 0.25 and truth.malignant
    assert 0.001 <= truth.tumour_fraction <= 0.10
    mask = tifffile.imread(truth.gt_mask, key=0)
    assert mask.shape == (1024 // truth.gt_downsample, 1536 // truth.gt_downsample)
    benign = synthesize_slide(tmp_path / "b.tiff", 1024, seed=8, malignant=False)
    assert benign.tumour_fraction == 0.0 and not tifffile.imread(benign.gt_mask, key=0).any()


# --------------------------------------------------------------------------------- file format


def test_levels_are_top_level_pages_read_by_tifffile_and_openslide(tmp_path):
    openslide = pytest.importorskip("openslide")
    truth = synthesize_slide(tmp_path / "s.tiff", (1300, 2100), seed=2, malignant=True, mpp=0.5)
    with tifffile.TiffFile(truth.path) as tf:
        pages = list(tf.pages)
        shapes = [p.shape[:2] for p in pages]
        assert shapes == [(1300, 2100), (650, 1050), (325, 525)]
        for i, p in enumerate(pages):
            assert p.is_tiled and p.tile == (256, 256) and not p.subifds
            assert p.subfiletype == (1 if i else 0)
            assert p.compression == tifffile.COMPRESSION.JPEG
        assert pages[0].resolution[0] == pytest.approx(1e4 / 0.5)
        assert "mpp=0.5" in pages[0].description
        level0 = pages[0].asarray()
    osr = openslide.OpenSlide(str(truth.path))
    try:
        assert osr.level_count == len(shapes)
        assert [d[::-1] for d in osr.level_dimensions] == shapes
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-3)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.5, rel=1e-3)
        region = np.asarray(osr.read_region((700, 500), 0, (300, 200)).convert("RGB"))
        assert np.abs(region.astype(int) - level0[500:700, 700:1000]).max() <= 2
        level1 = np.asarray(osr.read_region((0, 0), 1, (1050, 650)).convert("RGB")).astype(float)
    finally:
        osr.close()
    # the reduced level is the mean of 2x2 level-0 pixels (up to JPEG error)
    ref = level0.reshape(650, 2, 1050, 2, 3).mean(axis=(1, 3))
    assert np.abs(level1 - ref).mean() < 2.0


def test_writer_without_positional_io(tmp_path, monkeypatch):
    """Windows has no os.pread/pwrite: the scratch files fall back to locked seek + read/write."""
    monkeypatch.delattr(os, "pread", raising=False)
    monkeypatch.delattr(os, "pwrite", raising=False)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1100, 2100), dtype=np.uint8)
    write_image_pyramid(tmp_path / "m.tiff", image)
    with tifffile.TiffFile(tmp_path / "m.tiff") as tf:
        assert np.array_equal(tf.pages[0].asarray(), image)
        assert np.array_equal(tf.pages[1].asarray(), image[:1100:2, :2100:2])


def test_writer_is_atomic_and_cleans_up(tmp_path):
    target = tmp_path / "x.tiff"

    def broken(ty: int, tx: int) -> np.ndarray:
        if (ty, tx) == (2, 1):
            raise RuntimeError("render failed")
        return np.full((256, 256, 3), 200, np.uint8)

    with pytest.raises(RuntimeError, match="render failed"):
        write_pyramid(target, (1000, 700), broken, mpp=0.5, workers=2)
    assert os.listdir(tmp_path) == []  # no partial slide, no temporary or scratch files

    mask = (np.arange(700 * 1300).reshape(700, 1300) % 7 == 0).astype(np.uint8)
    info = write_image_pyramid(target, mask, mpp=8.0)
    assert info.level_count == 2 and os.listdir(tmp_path) == ["x.tiff"]
    with tifffile.TiffFile(target) as tf:
        assert np.array_equal(tf.pages[0].asarray(), mask)  # masks are lossless
        assert tf.pages[1].shape == (350, 650)


# ------------------------------------------------------------------------------- sample, CLI


def test_sample_slide_is_cached_and_repaired(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "SAMPLE_SIZE", 768)
    path = synthetic.sample_slide_path(tmp_path)
    assert path.parent == tmp_path and path.is_file()
    assert synthetic.gt_path_for(path).is_file()
    stamp = path.stat().st_mtime_ns
    assert synthetic.sample_slide_path(tmp_path) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not rewritten
    with open(path, "r+b") as fh:  # a download-style truncation: regenerated on next use
        fh.truncate(path.stat().st_size // 2)
    again = synthetic.sample_slide_path(tmp_path)
    with tifffile.TiffFile(again) as tf:
        assert tf.pages[0].shape[:2] == (768, 768)
        tf.pages[0].asarray()


def test_sample_slide_uses_cache_env(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "SAMPLE_SIZE", 512)
    monkeypatch.setenv("NAPARI_WSIMIL_CACHE", str(tmp_path / "cache"))
    assert synthetic.sample_slide_path().parent == tmp_path / "cache" / "sample"


def test_cli_synth_writes_a_cohort(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert main(["synth", str(out), "--slides", "2", "--seed", "4", "--size", "768x1024", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "cohort.csv") in printed and "slide 2/2" in printed
    rows = _rows(out / "cohort.csv")
    assert sorted(r["label"] for r in rows) == ["0", "1"]
    assert tifffile.TiffFile(out / rows[0]["path"]).pages[0].shape == (768, 1024, 3)


@pytest.mark.parametrize("argv, words", [
    (["--slides", "0"], "--slides must be at least 1"),
    (["--mpp", "-1"], "pixel size"),
    (["--size", "100"], "at least 256"),
    (["--malignant-fraction", "1.5"], "between 0 and 1"),
])
def test_cli_bad_arguments_give_one_readable_line(tmp_path, capsys, argv, words):
    assert main(["synth", str(tmp_path / "c"), *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_unparsable_argument_is_a_usage_error(tmp_path, capsys):
    assert main(["synth", str(tmp_path), "--size", "big"]) == 2
    assert "expected PX or HxW" in capsys.readouterr().err


def test_api_rejects_bad_arguments(tmp_path):
    with pytest.raises(WsimilError, match="at least 1"):
        synthesize_cohort(tmp_path, 0)
    with pytest.raises(WsimilError, match="height, width"):
        synthesize_slide(tmp_path / "a.tiff", "big", seed=0, malignant=False)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ tumour contrast


def _tumour_vs_normal_haematoxylin(model: SlideModel) -> float:
    """Mean haematoxylin density (HED deconvolution) of tumour pixels minus that of normal tissue
    pixels, over the 3 x 3 tiles around the middle of the tumour."""
    from skimage.color import rgb2hed

    ty, tx = _tumour_tile(model)
    ds = model.gt_downsample
    gt, tis = model.ground_truth(), model.tissue_mask_gt()
    tum, nor = [], []
    for y in range(max(ty - 1, 0), min(ty + 2, SIZE // 256)):
        for x in range(max(tx - 1, 0), min(tx + 2, SIZE // 256)):
            h = rgb2hed(model.render_tile(y, x))[..., 0]
            sl = np.s_[y * 256 // ds:(y + 1) * 256 // ds, x * 256 // ds:(x + 1) * 256 // ds]
            g = np.repeat(np.repeat(gt[sl], ds, 0), ds, 1).astype(bool)
            t = np.repeat(np.repeat(tis[sl], ds, 0), ds, 1).astype(bool)
            tum.append(h[g & t])
            nor.append(h[t & ~g])
    return float(np.concatenate(tum).mean() - np.concatenate(nor).mean())


def test_tumour_contrast_one_is_the_default():
    a = SlideModel((SIZE, SIZE), seed=5, malignant=True)
    b = SlideModel((SIZE, SIZE), seed=5, malignant=True, tumour_contrast=1.0)
    low = SlideModel((SIZE, SIZE), seed=5, malignant=True, tumour_contrast=0.3)
    ty, tx = _tumour_tile(a)
    assert a.render_tile(ty, tx).tobytes() == b.render_tile(ty, tx).tobytes()
    assert a.render_tile(ty, tx).tobytes() != low.render_tile(ty, tx).tobytes()
    # the layout and the ground truth do not depend on the contrast
    assert np.array_equal(a.ground_truth(), low.ground_truth())
    assert np.array_equal(a.tissue_mask_gt(), low.tissue_mask_gt())


def test_lower_tumour_contrast_brings_tumour_closer_to_normal_tissue():
    diffs = [_tumour_vs_normal_haematoxylin(SlideModel((SIZE, SIZE), seed=5, malignant=True, tumour_contrast=c))
             for c in (1.0, 0.5, 0.2, 0.0)]
    assert diffs[0] > 0.02, diffs  # at full contrast tumour is much more haematoxylin-rich
    assert diffs[0] > diffs[1] > diffs[2] > abs(diffs[3]), diffs
    assert abs(diffs[3]) < 0.15 * diffs[0], diffs  # at 0 tumour looks like normal tissue


def test_tumour_contrast_is_deterministic_and_benign_slides_ignore_it(tmp_path):
    one = synthesize_slide(tmp_path / "a.tiff", 768, seed=3, malignant=True, workers=1, tumour_contrast=0.2)
    two = synthesize_slide(tmp_path / "b.tiff", 768, seed=3, malignant=True, workers=2, tumour_contrast=0.2)
    full = synthesize_slide(tmp_path / "c.tiff", 768, seed=3, malignant=True, workers=1)
    assert one.path.read_bytes() == two.path.read_bytes()
    assert one.gt_mask.read_bytes() == full.gt_mask.read_bytes()
    assert one.path.read_bytes() != full.path.read_bytes()
    a = SlideModel((SIZE, SIZE), seed=5, malignant=False)
    b = SlideModel((SIZE, SIZE), seed=5, malignant=False, tumour_contrast=0.1)
    assert all(a.render_tile(y, x).tobytes() == b.render_tile(y, x).tobytes() for y, x in [(2, 2), (3, 4)])


def test_cli_synth_tumour_contrast(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert main(["synth", str(out), "--slides", "2", "--seed", "4", "--size", "768", "--workers", "2",
                 "--tumour-contrast", "0.25"]) == 0
    assert (out / "cohort.csv").is_file()
    assert main(["synth", str(tmp_path / "bad"), "--tumour-contrast", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "tumour contrast must be between 0 and 1" in err and "Traceback" not in err
    with pytest.raises(WsimilError, match="tumour contrast"):
        SlideModel((SIZE, SIZE), seed=5, malignant=True, tumour_contrast=-0.1)


# ------------------------------------------------------------------------------ mucinous pattern


def _tumour_pixels_by_pattern(model: SlideModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB pixels of solid tumour, mucinous tumour and normal tissue over the whole slide, sampled at the
    centres of the ground-truth blocks (so each pattern is read where the generator put it)."""
    ds = model.gt_downsample
    gt, tis = model.ground_truth().astype(bool), model.tissue_mask_gt().astype(bool)
    gy, gx = model._gt_axes()
    muc = (model.mucin.sample(gy, gx) > 0) if model.mucin is not None else np.zeros_like(gt)
    n = SIZE // 256
    img = np.concatenate([np.concatenate([model.render_tile(y, x) for x in range(n)], 1) for y in range(n)], 0)
    centre = img[ds // 2::ds, ds // 2::ds][: gt.shape[0], : gt.shape[1]].astype(np.float32)
    return centre[gt & ~muc], centre[gt & muc], centre[tis & ~gt]


def test_mucinous_share_zero_is_the_default_and_keeps_layout_and_truth():
    a = SlideModel((SIZE, SIZE), seed=5, malignant=True)
    b = SlideModel((SIZE, SIZE), seed=5, malignant=True, mucinous_share=0.0)
    m = SlideModel((SIZE, SIZE), seed=5, malignant=True, mucinous_share=0.5)
    ty, tx = _tumour_tile(a)
    assert a.render_tile(ty, tx).tobytes() == b.render_tile(ty, tx).tobytes()
    assert a.render_tile(ty, tx).tobytes() != m.render_tile(ty, tx).tobytes()
    assert np.array_equal(a.ground_truth(), m.ground_truth())
    assert np.array_equal(a.tissue_mask_gt(), m.tissue_mask_gt())
    # away from the tumour nothing changes
    far = [(y, x) for y in range(SIZE // 256) for x in range(SIZE // 256) if abs(y - ty) + abs(x - tx) > 3]
    assert far and all(a.render_tile(y, x).tobytes() == m.render_tile(y, x).tobytes() for y, x in far[:3])
    # benign slides have no tumour, so no mucin
    assert SlideModel((SIZE, SIZE), seed=5, malignant=False, mucinous_share=0.5).mucin is None


@pytest.mark.parametrize("share", [0.3, 0.6])
def test_mucinous_share_is_the_share_of_tumour_area(share):
    m = SlideModel((SIZE, SIZE), seed=5, malignant=True, mucinous_share=share)
    gt = m.ground_truth().astype(bool)
    gy, gx = m._gt_axes()
    muc = m.mucin.sample(gy, gx) > 0
    assert (gt & muc).sum() / gt.sum() == pytest.approx(share, abs=0.02)


def test_mucinous_tumour_is_paler_and_less_cellular_than_normal_tissue_and_solid_tumour_darker():
    from skimage.color import rgb2hed

    solid, mucin, normal = _tumour_pixels_by_pattern(SlideModel((SIZE, SIZE), seed=5, malignant=True,
                                                                mucinous_share=0.5))
    assert len(solid) > 50 and len(mucin) > 50, (len(solid), len(mucin))
    grey = {k: float(v.mean()) for k, v in (("solid", solid), ("mucin", mucin), ("normal", normal))}
    assert grey["mucin"] > grey["normal"] + 10 > grey["solid"] + 20, grey  # opposite sides of normal
    hed = {k: float(rgb2hed(v[None].astype(np.uint8))[0, :, 0].mean())
           for k, v in (("solid", solid), ("mucin", mucin), ("normal", normal))}
    assert hed["solid"] > hed["normal"], hed


def test_mucinous_share_is_deterministic_and_checked(tmp_path, capsys):
    one = synthesize_slide(tmp_path / "a.tiff", 768, seed=3, malignant=True, workers=1, mucinous_share=0.4)
    two = synthesize_slide(tmp_path / "b.tiff", 768, seed=3, malignant=True, workers=2, mucinous_share=0.4)
    assert one.path.read_bytes() == two.path.read_bytes()
    out = tmp_path / "cohort"
    assert main(["synth", str(out), "--slides", "2", "--seed", "4", "--size", "768", "--workers", "2",
                 "--mucinous-share", "0.3"]) == 0
    assert (out / "cohort.csv").is_file()
    assert main(["synth", str(tmp_path / "bad"), "--mucinous-share", "2"]) == 2
    err = capsys.readouterr().err
    assert "mucinous share must be between 0 and 1" in err and "Traceback" not in err
    with pytest.raises(WsimilError, match="mucinous share"):
        SlideModel((SIZE, SIZE), seed=5, malignant=True, mucinous_share="a lot")


# ------------------------------------------------------------------------------ lymphoid aggregates


@pytest.mark.parametrize("malignant", [False, True])
def test_lymphoid_aggregates_cover_their_share_and_stay_out_of_the_truth(malignant):
    plain = SlideModel((SIZE, SIZE), seed=5, malignant=malignant)
    m = SlideModel((SIZE, SIZE), seed=5, malignant=malignant, aggregate_share=0.05)
    tissue = m.tissue_mask_gt().astype(bool)
    gy, gx = m._gt_axes()
    agg = (m.aggregate.sample(gy, gx) > 0) & tissue
    assert agg.sum() / tissue.sum() == pytest.approx(0.05, abs=0.01)
    # ground truth and tissue are those of the slide without aggregates: they are normal tissue
    assert np.array_equal(plain.ground_truth(), m.ground_truth())
    assert np.array_equal(plain.tissue_mask_gt(), tissue.astype(np.uint8))
    assert SlideModel((SIZE, SIZE), seed=5, malignant=malignant, aggregate_share=0.0).aggregate is None


def test_lymphoid_aggregates_are_denser_and_darker_than_normal_tissue():
    from skimage.color import rgb2hed

    m = SlideModel((SIZE, SIZE), seed=5, malignant=False, aggregate_share=0.05)
    plain = SlideModel((SIZE, SIZE), seed=5, malignant=False)
    ds = m.gt_downsample
    gy, gx = m._gt_axes()
    agg = (m.aggregate.sample(gy, gx) > 0) & m.tissue_mask_gt().astype(bool)
    blocks = np.argwhere(agg)
    ty, tx = (blocks[len(blocks) // 2] * ds) // 256
    tile, ref = m.render_tile(int(ty), int(tx)), plain.render_tile(int(ty), int(tx))
    assert tile.tobytes() != ref.tobytes()
    sl = agg[ty * 256 // ds:(ty + 1) * 256 // ds, tx * 256 // ds:(tx + 1) * 256 // ds]
    inside = np.repeat(np.repeat(sl, ds, 0), ds, 1)
    h, h_ref = rgb2hed(tile)[..., 0], rgb2hed(ref)[..., 0]
    assert inside.any()
    assert h[inside].mean() > h_ref[inside].mean() + 0.01  # more haematoxylin than the same place without
    # tiles without aggregates are untouched
    far = [(y, x) for y in range(SIZE // 256) for x in range(SIZE // 256)
           if not agg[y * 256 // ds:(y + 1) * 256 // ds, x * 256 // ds:(x + 1) * 256 // ds].any()
           and abs(y - ty) + abs(x - tx) > 2]
    assert far and all(m.render_tile(y, x).tobytes() == plain.render_tile(y, x).tobytes() for y, x in far[:3])


def test_aggregate_share_is_checked(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert main(["synth", str(out), "--slides", "2", "--seed", "4", "--size", "768", "--workers", "2",
                 "--aggregate-share", "0.05"]) == 0
    assert main(["synth", str(tmp_path / "bad"), "--aggregate-share", "0.9"]) == 2
    err = capsys.readouterr().err
    assert "lymphoid aggregates' share must be between 0 and 0.5" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ tumour share


def test_tumour_share_range_sets_the_tumour_area_and_none_is_the_default():
    a = SlideModel((SIZE, SIZE), seed=5, malignant=True)
    b = SlideModel((SIZE, SIZE), seed=5, malignant=True, tumour_share=(0.005, 0.08))
    big = SlideModel((SIZE, SIZE), seed=5, malignant=True, tumour_share=(0.25, 0.25))
    assert a.target_fraction == b.target_fraction and 0.005 <= a.target_fraction <= 0.08
    assert np.array_equal(a.ground_truth(), b.ground_truth())
    assert big.target_fraction == pytest.approx(0.25)
    tissue = big.tissue_mask_gt()
    measured = big.ground_truth().sum() / tissue.sum()
    assert 0.15 < measured < 0.35 and measured > 3 * a.ground_truth().sum() / a.tissue_mask_gt().sum()
    assert np.array_equal(tissue, a.tissue_mask_gt())  # the tissue layout does not move


def test_tumour_share_is_checked_with_one_line(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "bad"), "--tumour-share", "0.3,0.1"]) == 2
    err = capsys.readouterr().err
    assert "tumour share must satisfy" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(WsimilError, match="range of two numbers"):
        SlideModel((SIZE, SIZE), seed=5, malignant=True, tumour_share=0.2)
