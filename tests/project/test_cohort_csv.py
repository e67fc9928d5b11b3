"""Cohort CSV in (checked as a whole before anything is written) and out (round trip)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_wsimil.project import Annotation, Project, ProjectError, write_geojson


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_synthetic_cohort(cohort: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader(open(cohort)))
    with Project.create_from_csv(tmp_path / "p", cohort, label_mpp=2.0) as p:
        assert p.label_mpp == 2.0 and p.slide_ids == [r["slide_id"] for r in rows]
        for r in rows:
            rec = p.record(r["slide_id"])
            assert rec.label == ["benign", "malignant"][int(r["label"])]
            assert p.resolve(rec.gt_mask) == (cohort.parent / r["gt_mask"]).resolve() and rec.gt_downsample == 8
            assert not p.has_pixel_labels(rec.slide_id)  # ground truth is never imported as training labels
            assert p.label_geometry(rec.slide_id).shape == (512, 512)


def test_labels_annotations_and_extra_columns(cohort: Path, tmp_path: Path) -> None:
    folder = cohort.parent
    mask = np.zeros((128, 128), np.uint8)  # downsample 16
    mask[10:40, 20:60] = 2
    tifffile.imwrite(folder / "m.tif", mask)
    anns = [Annotation.box(100, 100, 400, 300, "Tumor"), Annotation.polygon([(0, 0), (90, 0), (0, 90)], "normal")]
    write_geojson(folder / "a.geojson", anns, {"Tumor": "#ff0000", "normal": "#00ff00"})
    src = _write_csv(folder / "c.csv", ["slide_id", "path", "label", "split", "pixel_labels", "pixel_labels_downsample",
                                        "annotations", "patient"],
                     [["s0", "slide_000.tiff", "malignant", "train", "m.tif", "16", "a.geojson", "P1"],
                      ["s1", "slide_001.tiff", "", "test", "", "", "", "P2"]])
    with Project.create_from_csv(tmp_path / "p", src) as p:
        assert p.record("s0").split == "train" and p.record("s1").label is None
        assert p.record("s0").extra == {"patient": "P1"}
        lab = p.pixel_labels("s0")
        assert np.array_equal(lab, np.repeat(np.repeat(mask, 2, 0), 2, 1))
        assert p.annotations("s0") == anns and p.class_by_name("Tumor").color == "#ff0000"
        out = p.export_csv(tmp_path / "out" / "cohort.csv", masks=True)
        text = out.read_text()
        assert text.splitlines()[0] == ("slide_id,path,label,split,pixel_labels,pixel_labels_downsample,annotations,"
                                        "patient")
        with Project.create_from_csv(tmp_path / "p2", out) as q:
            assert [r.to_json() | {"path": None} for r in q.slides] == [r.to_json() | {"path": None} for r in p.slides]
            assert all(q.slide_path(s) == p.slide_path(s) for s in p.slide_ids)
            assert np.array_equal(q.pixel_labels("s0"), lab) and q.annotations("s0") == anns
            assert [c.name for c in q.classes] == [c.name for c in p.classes]


def test_all_problems_reported_and_nothing_written(cohort: Path, tmp_path: Path) -> None:
    folder = cohort.parent
    from PIL import Image

    Image.fromarray(np.zeros((100, 300), np.uint8)).save(folder / "wide.png")
    Image.fromarray(np.full((256, 256), 7, np.uint8)).save(folder / "sevens.png")
    (folder / "bad.geojson").write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", '
                                        '"geometry": {"type": "Polygon", "coordinates": [[[0,0],[9000,0],[0,10],[0,0]]]},'
                                        ' "properties": {"classification": {"name": "tumour"}}}]}')
    src = _write_csv(folder / "bad.csv", ["slide_id", "path", "label", "split", "pixel_labels", "annotations", "gt_mask"],
                     [["a", "slide_000.tiff", "2", "", "", "", ""],
                      ["a", "slide_001.tiff", "cancer", "later", "", "", "nothing.tiff"],
                      ["c", "missing.tiff", "0", "", "", "", ""],
                      ["d", "slide_002.tiff", "1", "", "wide.png", "bad.geojson", ""],
                      ["e", "slide_002.tiff", "1", "", "sevens.png", "", ""],
                      ["f g", "cohort.csv", "1", "", "", "", ""]])
    with pytest.raises(ProjectError) as err:
        Project.create_from_csv(tmp_path / "p", src)
    msg = str(err.value)
    for needle in ("line 2 (a): label '2' is not a slide class (0 benign, 1 malignant)",
                   "line 3 (a): label 'cancer'", "line 3 (a): split 'later'", "gt_mask file nothing.tiff not found",
                   "line 4 (c): slide file missing.tiff not found", "slide_id 'a' is also used on line 2",
                   "line 6 (e): slide_002.tiff is also listed on line 5", "line 5 (d): mask wide.png does not fit",
                   "line 5 (d): bad.geojson: annotation 1: extends beyond the slide",
                   "line 6 (e): pixel_labels sevens.png holds values that are not class ids: 7",
                   "line 7 (f g): slide id 'f g' is not usable", "line 7 (f g): Cannot read cohort.csv",
                   "nothing was written"):
        assert needle in msg, needle
    assert not (tmp_path / "p").exists()


def test_csv_refusals(cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="no 'path' column"):
        Project.create_from_csv(tmp_path / "p", _write_csv(tmp_path / "x.csv", ["slide", "file"], [["a", "b"]]))
    with pytest.raises(ProjectError, match="does not exist"):
        Project.create_from_csv(tmp_path / "p", tmp_path / "none.csv")
    Project.create(tmp_path / "p").close()
    with pytest.raises(ProjectError, match="already holds a project"):
        Project.create_from_csv(tmp_path / "p", cohort)
    # semicolons and a BOM (Excel) are fine; ids default to the file stem
    (tmp_path / "semi.csv").write_text("\ufeffpath;label\n" + f"{cohort.parent / 'slide_000.tiff'};benign\n")
    with Project.create_from_csv(tmp_path / "q", tmp_path / "semi.csv") as p:
        assert p.slide_ids == ["slide_000"] and p.record("slide_000").label == "benign"


def test_failure_after_checks_leaves_no_project(cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Project, "_add_records", boom)
    target = tmp_path / "p"
    with pytest.raises(OSError):
        Project.create_from_csv(target, cohort)
    assert not target.exists()
    folder = cohort.parent  # an existing folder keeps what it had
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(OSError):
        Project.create_from_csv(folder, cohort)
    assert sorted(p.name for p in folder.iterdir()) == before
