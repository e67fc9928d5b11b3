"""Multi-magnification (ZoomMIL) feature bags: depth-first children, the same numbers as encoding a patch alone,
the file, staleness, cohorts that resume, and clear messages for levels or slides that cannot be used."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.errors import MissingMppError
from napari_wsimil.features import build_encoder
from napari_wsimil.slide import open_slide
from napari_wsimil.slide.synthetic import synthesize_cohort
from napari_wsimil.train.cohort import CohortError, load_cohort
from napari_wsimil.zoommil.bags import (
    DEFAULT_MPPS,
    ZOOM_BAG_SUFFIX,
    ZoomBag,
    ZoomBagError,
    check_levels,
    child_coords,
    encode_coords,
    ensure_zoom_bags,
    extract_zoom_bag,
    level_coords,
    read_zoom_bag,
    zoom_bag_is_stale,
    zoom_stale_reasons,
)

MPPS = (4.0, 2.0, 1.0)
PATCH = 32
SLIDE_MPP = 0.5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    return load_cohort(synthesize_cohort(tmp_path_factory.mktemp("zoom"), 2, seed=3, size=2048))


@pytest.fixture(scope="module")
def encoder():
    return build_encoder("handcrafted", device="cpu")


@pytest.fixture(scope="module")
def bag(cohort, encoder) -> ZoomBag:
    with open_slide(cohort.slides[0].path) as slide:
        return extract_zoom_bag(slide, encoder, MPPS, PATCH, device="cpu")


def test_levels_are_checked_with_messages_a_pathologist_reads() -> None:
    assert check_levels(DEFAULT_MPPS, 256) == [2, 4]
    assert check_levels(MPPS, PATCH) == [2, 2]
    cases = [((8.0,), 256, "at least 2 magnification levels"),
             ((4.0, 8.0), 256, "low to high magnification.*got 4 → 8 µm/px"),
             ((4.0, 4.0), 256, "low to high magnification"),
             ((8.0, 3.0), 256, "whole number of times.*8 → 3 µm/px is 2.67×"),
             ((4.0, 3.0), 256, "4 → 3 µm/px is 1.33×"),
             ((8.0, 0.0), 256, "must be positive"),
             ((8.0, -2.0), 256, "must be positive"),
             ((8.0, 4.0), 4, "patch size must be .* at least 8")]
    for mpps, patch, message in cases:
        with pytest.raises(ZoomBagError, match=message):
            check_levels(mpps, patch)


def test_children_are_depth_first_and_tile_their_parent(bag: ZoomBag) -> None:
    assert bag.mpps == MPPS and bag.patch == PATCH and bag.ratios == [2, 2] and bag.dim > 0
    assert len(bag) > 4
    for level, ratio in enumerate(bag.ratios):
        r = bag.n_children(level)
        assert r == ratio * ratio
        n, m = len(bag.coords[level]), len(bag.coords[level + 1])
        assert m == n * r and len(bag.features[level + 1]) == m
        assert np.array_equal(bag.children(level, np.arange(n)), np.arange(m))
        assert np.array_equal(bag.children(level, [2, 0]), np.r_[2 * r:3 * r, 0:r])
        size, child = PATCH * MPPS[level] / SLIDE_MPP, PATCH * MPPS[level + 1] / SLIDE_MPP
        for j in range(n):
            x, y = bag.coords[level][j]
            kids = bag.coords[level + 1][bag.children(level, [j])]
            assert np.all(kids >= (x, y)) and np.all(kids + child <= (x + size, y + size))  # inside the parent
            cover = np.zeros((int(size), int(size)), np.int32)
            for cx, cy in kids - (x, y):
                cover[cy:cy + int(child), cx:cx + int(child)] += 1
            assert np.all(cover == 1)  # the children tile the parent exactly, once
            rows = (kids[:, 1] - y) // int(child)
            cols = (kids[:, 0] - x) // int(child)
            assert list(zip(rows, cols)) == [(a, b) for a in range(ratio) for b in range(ratio)]  # row-major


def test_coordinates_match_the_slide_and_each_other(cohort, bag: ZoomBag) -> None:
    with open_slide(cohort.slides[0].path) as slide:
        levels = level_coords(slide, MPPS, PATCH)
    for a, b in zip(levels, bag.coords):
        assert np.array_equal(a, b)
    assert np.array_equal(child_coords(bag.coords[1][3:4], 2.0, 1.0, PATCH, SLIDE_MPP), bag.coords[2][12:16])


def test_a_patch_encoded_alone_gives_the_bag_features(cohort, encoder, bag: ZoomBag) -> None:
    """Prediction reads only the children it selects: they must get the numbers training saw."""
    rng = np.random.default_rng(0)
    with open_slide(cohort.slides[0].path) as slide:
        for level, mpp in enumerate(MPPS):
            rows = rng.choice(len(bag.coords[level]), 3, replace=False)
            for i in rows:
                alone = encode_coords(slide, encoder, bag.coords[level][i:i + 1], mpp, PATCH, device="cpu")
                np.testing.assert_allclose(alone[0], bag.features[level][i], rtol=1e-5, atol=1e-6)
            parents = rng.choice(len(bag.coords[level - 1]), 2, replace=False) if level else None
            kids = bag.children(level - 1, parents) if level else rows  # what prediction reads: some children
            together = encode_coords(slide, encoder, bag.coords[level][kids], mpp, PATCH, device="cpu")
            np.testing.assert_allclose(together, bag.features[level][kids], rtol=1e-5, atol=1e-6)


def test_no_coordinates_read_nothing(cohort, encoder, monkeypatch) -> None:
    with open_slide(cohort.slides[0].path) as slide:
        def refuse(*_a, **_k):
            raise AssertionError("read a patch")
        monkeypatch.setattr(slide, "read_region", refuse)
        out = encode_coords(slide, encoder, np.zeros((0, 2), np.int64), 1.0, PATCH)
    assert out.shape == (0, encoder.dim) and out.dtype == np.float32


def test_save_and_read_back_without_pickle(tmp_path: Path, bag: ZoomBag) -> None:
    path = bag.save(tmp_path / f"s{ZOOM_BAG_SUFFIX}")
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["attrs", "coords_0", "coords_1", "coords_2",
                                   "features_0", "features_1", "features_2"]
        assert all(z[k].dtype != object for k in z.files)
    back = read_zoom_bag(path)
    assert back.mpps == bag.mpps and back.patch == bag.patch and back.attrs["format"] == 1
    assert back.attrs["mpps"] == list(MPPS) and back.attrs["encoder"] == "handcrafted"
    for a, b in zip(back.coords + back.features, bag.coords + bag.features):
        assert np.array_equal(a, b) and a.dtype == b.dtype
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_broken_files_are_errors_naming_them(tmp_path: Path, bag: ZoomBag) -> None:
    garbled = tmp_path / "garbled.zoom.npz"
    garbled.write_bytes(b"not a zip file at all")
    with pytest.raises(ZoomBagError, match="garbled.zoom.npz"):
        read_zoom_bag(garbled)
    good = bag.save(tmp_path / "good.zoom.npz")
    truncated = tmp_path / "truncated.zoom.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ZoomBagError, match="truncated.zoom.npz"):
        read_zoom_bag(truncated)
    with pytest.raises(ZoomBagError, match="does not exist"):
        read_zoom_bag(tmp_path / "missing.zoom.npz")
    # a level with the wrong number of children
    with np.load(good, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["coords_2"], arrays["features_2"] = arrays["coords_2"][:-1], arrays["features_2"][:-1]
    np.savez(tmp_path / "short.zoom.npz", **arrays)
    with pytest.raises(ZoomBagError, match=r"short.zoom.npz.*level 2 \(1 µm/px\)"):
        read_zoom_bag(tmp_path / "short.zoom.npz")
    assert zoom_bag_is_stale(truncated, build_encoder("handcrafted", device="cpu"), bag.attrs["slide_path"],
                             MPPS, PATCH)


def test_stale_when_the_slide_levels_patch_or_encoder_change(tmp_path: Path, cohort, encoder) -> None:
    src = cohort.slides[1].path
    copy = tmp_path / src.name
    copy.write_bytes(src.read_bytes())
    mpps = (8.0, 4.0)
    bag = extract_zoom_bag(copy, encoder, mpps, PATCH, device="cpu")
    path = bag.save(tmp_path / "b.zoom.npz")
    assert not zoom_bag_is_stale(path, encoder, copy, mpps, PATCH)
    assert not zoom_bag_is_stale(bag, encoder, copy, mpps, PATCH, slide_mpp=SLIDE_MPP)
    assert zoom_bag_is_stale(path, encoder, copy, (8.0, 2.0), PATCH)
    assert zoom_bag_is_stale(path, encoder, copy, (8.0, 4.0, 2.0), PATCH)
    assert zoom_bag_is_stale(path, encoder, copy, mpps, 64)
    assert zoom_bag_is_stale(path, encoder, copy, mpps, PATCH, slide_mpp=0.25)
    assert zoom_bag_is_stale(path, build_encoder("handcrafted-v2", device="cpu"), copy, mpps, PATCH)
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert any("slide file changed" in r for r in zoom_stale_reasons(path, encoder, copy, mpps, PATCH))


def test_a_slide_too_small_or_without_pixel_size_is_a_clear_error(cohort, encoder) -> None:
    with open_slide(cohort.slides[0].path) as slide:
        name = cohort.slides[0].path.name
        with pytest.raises(ZoomBagError, match=f"{name}.*too small.*1024 × 1024 µm.*2048 × 2048 µm"):
            level_coords(slide, (64.0, 32.0), PATCH)
        with pytest.raises(ZoomBagError, match="low to high"):
            extract_zoom_bag(slide, encoder, (1.0, 4.0), PATCH)
        with pytest.raises(ZoomBagError, match="2.67×"):
            level_coords(slide, (8.0, 3.0), PATCH)
        slide.mpp = None
        with pytest.raises(MissingMppError, match="pixel size"):
            level_coords(slide, MPPS, PATCH)


def test_cohort_extracts_only_what_is_missing_or_stale_and_resumes(tmp_path: Path, cohort) -> None:
    out = tmp_path / "zoom"
    said: list[str] = []
    mpps = (8.0, 4.0)
    bags = ensure_zoom_bags(cohort.slides, out, "handcrafted", mpps, PATCH, report=said.append, device="cpu")
    assert sorted(bags) == sorted(s.slide_id for s in cohort.slides)
    assert all(p.name == f"{sid}.zoom.npz" and p.is_file() for sid, p in bags.items())
    assert sum("patches at 8 → 4 µm/px" in m for m in said) == 2
    first = read_zoom_bag(bags[cohort.slides[0].slide_id])
    assert first.attrs["slide_id"] == cohort.slides[0].slide_id and first.mpps == mpps
    mtimes = {sid: p.stat().st_mtime_ns for sid, p in bags.items()}

    said.clear()
    ensure_zoom_bags(cohort.slides, out, "handcrafted", mpps, PATCH, report=said.append, device="cpu")
    assert said and all(m.endswith("up to date") for m in said)
    assert {sid: p.stat().st_mtime_ns for sid, p in bags.items()} == mtimes

    # a run killed half-way: one bag missing, another left garbled by some other writer
    victim, garbled = cohort.slides[0].slide_id, cohort.slides[1].slide_id
    bags[victim].unlink()
    bags[garbled].write_bytes(b"PK\x03\x04 half a zip")
    said.clear()
    ensure_zoom_bags(cohort.slides, out, "handcrafted", mpps, PATCH, report=said.append, device="cpu")
    assert not any(m.endswith("up to date") for m in said)
    for sid in (victim, garbled):
        assert len(read_zoom_bag(bags[sid]).coords) == 2
    # nothing but the bags, and the per-slide claims folder (io/claims.py), empty once every slide is done
    assert sorted(p.name for p in out.iterdir() if p.name != ".claims") == sorted(p.name for p in bags.values())
    assert not any((out / ".claims").glob("*")) if (out / ".claims").exists() else True

    said.clear()  # other levels make every bag stale
    ensure_zoom_bags(cohort.slides, out, "handcrafted", (8.0, 2.0), PATCH, report=said.append, device="cpu")
    assert not any(m.endswith("up to date") for m in said)


def test_a_failing_slide_is_one_error_naming_it(tmp_path: Path, cohort) -> None:
    slides = [cohort.slides[0], replace(cohort.slides[1], path=tmp_path / "gone.tiff")]
    with pytest.raises(CohortError, match=f"zoom feature extraction failed for {slides[1].slide_id}: .*gone.tiff"):
        ensure_zoom_bags(slides, tmp_path / "z", "handcrafted", (8.0, 4.0), PATCH, device="cpu")
    assert (tmp_path / "z" / f"{slides[0].slide_id}.zoom.npz").is_file()  # the good one is kept
