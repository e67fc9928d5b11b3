"""Bags: atomic write, staleness, and cohort runs that skip finished slides."""

from __future__ import annotations

import os

import numpy as np
import pytest

from napari_wsimil.features import Bag, BagError, extract_cohort, is_stale, read_bag, stale_reasons
from napari_wsimil.features.bags import bag_attrs, read_bag_attrs
from napari_wsimil.features.handcrafted import HandcraftedEncoder
from napari_wsimil.slide import open_slide
from napari_wsimil.slide.synthetic import synthesize_slide


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list:
    d = tmp_path_factory.mktemp("bag-slides")
    paths = []
    for i, malignant in enumerate((True, False)):
        p = d / f"s{i}.tif"
        synthesize_slide(p, 1024, seed=10 + i, malignant=malignant)
        paths.append(p)
    return paths


def test_save_read_round_trip_and_atomicity(tmp_path, monkeypatch) -> None:
    bag = Bag(np.array([[0, 0], [256, 0]]), np.arange(6, dtype=np.float32).reshape(2, 3), {"encoder": "x"})
    path = bag.save(tmp_path / "a.npz")
    back = read_bag(path)
    assert back.coords.dtype == np.int64 and back.features.dtype == np.float32
    np.testing.assert_array_equal(back.features, bag.features)
    assert back.attrs["encoder"] == "x" and read_bag_attrs(path)["format"] == 1

    # a write that fails half-way leaves the previous bag intact and no temporary behind
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError):
        Bag(np.zeros((1, 2)), np.zeros((1, 3)), {"encoder": "y"}).save(path)
    monkeypatch.undo()
    assert read_bag(path).attrs["encoder"] == "x"
    assert sorted(os.listdir(tmp_path)) == ["a.npz"]

    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(BagError, match="bad.npz"):
        read_bag(tmp_path / "bad.npz")


def test_stale_when_encoder_version_or_slide_changes(slides, tmp_path) -> None:
    enc = HandcraftedEncoder()
    slide = open_slide(slides[0])
    bag = Bag(np.zeros((1, 2)), np.zeros((1, enc.dim)), bag_attrs(enc, slide, 256, 0.5))
    assert not is_stale(bag, enc, slide, 256, 0.5)
    newer = HandcraftedEncoder()
    newer.version = "2"
    assert any("encoder_version" in r for r in stale_reasons(bag, newer, slide))
    assert is_stale(bag, enc, slide, 224, 0.5) and is_stale(bag, enc, slide, 256, 1.0)
    copy = tmp_path / "copy.tif"
    copy.write_bytes(slides[0].read_bytes() + b"\0")  # other size: another file
    assert is_stale(bag, enc, copy)
    assert is_stale(tmp_path / "absent.npz", enc, slide)


def test_cohort_skips_finished_and_recomputes_stale(slides, tmp_path) -> None:
    out = tmp_path / "bags"
    events = []
    first = extract_cohort(slides, out, "handcrafted", patch_size=128, mpp=1.0, progress=events.append,
                           num_workers=2)
    assert [r.status for r in first] == ["done", "done"]
    assert {e.stage for e in events} >= {"started", "patches", "done"}
    mtimes = {r.slide_id: r.bag_path.stat().st_mtime_ns for r in first}
    bag = read_bag(first[0].bag_path)
    assert bag.attrs["slide_id"] == "s0" and bag.attrs["patch_size"] == 128 and len(bag) == first[0].n_patches

    second = extract_cohort(slides, out, "handcrafted", patch_size=128, mpp=1.0)
    assert [r.status for r in second] == ["skipped", "skipped"]
    assert {r.slide_id: r.bag_path.stat().st_mtime_ns for r in second} == mtimes

    newer = HandcraftedEncoder()
    newer.version = "2"
    third = extract_cohort(slides, out, newer, patch_size=128, mpp=1.0)
    assert [r.status for r in third] == ["done", "done"]
    assert read_bag(third[1].bag_path).attrs["encoder_version"] == "2"

    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a slide")
    fourth = extract_cohort([*slides, broken], out, newer, patch_size=128, mpp=1.0)
    assert [r.status for r in fourth] == ["skipped", "skipped", "failed"]
    assert "broken.tif" in fourth[2].message and not fourth[2].bag_path.exists()


def test_cohort_from_project(slides, tmp_path) -> None:
    from napari_wsimil.project import Project

    p = Project.create(tmp_path / "proj")
    p.add_slide(slides[0], slide_id="case-a", label="malignant")
    p.add_slide(slides[1], slide_id="case-b", label="benign")
    p.close()
    res = extract_cohort(tmp_path / "proj", None, "handcrafted", patch_size=128, mpp=1.0)  # by folder
    assert [(r.slide_id, r.status) for r in res] == [("case-a", "done"), ("case-b", "done")]
    assert res[0].bag_path == (tmp_path / "proj").resolve() / "features" / "handcrafted" / "case-a.npz"
    p = Project.open(tmp_path / "proj", readonly=True)
    again = extract_cohort(p, None, "handcrafted", patch_size=128, mpp=1.0)
    assert [r.status for r in again] == ["skipped", "skipped"]
    p.close()
    # correcting a slide's pixel size in the project makes its bag stale (its patches change)
    p = Project.open(tmp_path / "proj")
    p.set_slide_mpp("case-b", 0.25)
    third = extract_cohort(p, None, "handcrafted", patch_size=128, mpp=1.0)
    assert [r.status for r in third] == ["skipped", "done"]
    assert read_bag(third[1].bag_path).attrs["slide_mpp"] == 0.25
    p.close()
