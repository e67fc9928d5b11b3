"""Project folder basics: create/open, slides, classes, locking, relinking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from napari_wsimil.errors import SlideError
from napari_wsimil.project import ClassDef, Project, ProjectError


def test_create_defaults_and_reopen(tmp_path: Path) -> None:
    with Project.create(tmp_path / "p") as p:
        assert p.schema_version == 1 and p.name == "p" and p.label_mpp == 4.0 and not p.readonly
        assert p.classes == [ClassDef(0, "unlabelled", "#000000"), ClassDef(1, "tumour", "#e6194b"),
                             ClassDef(2, "normal", "#3cb44b")]
        assert p.slide_classes == ["benign", "malignant"]
        assert p.slides == []
    data = json.loads((tmp_path / "p" / "project.json").read_text())
    assert data["schema"] == 1 and data["label_mpp"] == 4.0
    with Project.open(tmp_path / "p") as p:
        assert not p.readonly and p.classes[1].name == "tumour"


def test_create_custom_and_refuse_existing(tmp_path: Path) -> None:
    with Project.create(tmp_path, name="cohort A", classes=["stroma", ("necrosis", "#123456")],
                        slide_classes=["neg", "pos", "unsure"], label_mpp=2.0) as p:
        assert [c.name for c in p.classes] == ["unlabelled", "stroma", "necrosis"]
        assert p.class_by_name("necrosis").color == "#123456" and p.name == "cohort A"
    with pytest.raises(ProjectError, match="already holds a project"):
        Project.create(tmp_path)
    with pytest.raises(ProjectError, match="not a napari-wsimil project"):
        Project.open(tmp_path.parent)
    with pytest.raises(ProjectError, match="positive"):
        Project.create(tmp_path / "q", label_mpp=0)


def test_add_slides(cohort: Path, tmp_path: Path) -> None:
    folder = cohort.parent
    with Project.create(folder) as p:  # project inside the cohort folder: paths stored relative
        r = p.add_slide(folder / "slide_000.tiff", label=1, split="validation")
        assert r.slide_id == "slide_000" and r.path == Path("slide_000.tiff")
        assert r.label == "malignant" and r.split == "val" and r.dimensions == (2048, 2048) and r.scan_mpp == 0.5
        with pytest.raises(ProjectError, match="already in the project as slide 'slide_000'"):
            p.add_slide(folder / "." / "slide_000.tiff")
        with pytest.raises(ProjectError, match="0 benign, 1 malignant"):
            p.add_slide(folder / "slide_001.tiff", label="cancer")
        with pytest.raises(ProjectError, match="split"):
            p.add_slide(folder / "slide_001.tiff", split="holdout")
        with pytest.raises(ProjectError, match="letters, digits"):
            p.add_slide(folder / "slide_001.tiff", slide_id="a b")
        r2 = p.add_slide(folder / "slide_001.tiff", slide_id="s1", mpp=0.25)
        assert r2.mpp == 0.25 and p.slide_mpp("s1") == 0.25
        (folder / "notes.txt").write_text("not a slide")
        with pytest.raises(SlideError):
            p.add_slide(folder / "notes.txt")
        assert p.slide_ids == ["slide_000", "s1"]
    outside = tmp_path / "elsewhere"
    with Project.create(outside) as q:
        r = q.add_slide(folder / "slide_000.tiff")
        assert r.path.is_absolute()
        # a second copy of a file under another name gets a unique id
        (folder / "x").mkdir()
        os.link(folder / "slide_001.tiff", folder / "x" / "slide_000.tiff")
        assert q.add_slide(folder / "x" / "slide_000.tiff").slide_id == "slide_000_2"


def test_labels_splits_records(project: Project) -> None:
    labels = {r.slide_id: r.label for r in project.slides}
    assert set(labels.values()) <= {"benign", "malignant"}
    project.set_slide_label("slide_000", "malignant")
    project.set_slide_label("slide_001", None)
    project.set_split("slide_000", "train")
    assert project.record("slide_000").label == "malignant" and project.record("slide_001").label is None
    with pytest.raises(ProjectError, match="valid|benign"):
        project.set_slide_label("slide_000", 5)
    with pytest.raises(ProjectError, match="slide_000, slide_001, slide_002"):
        project.record("nope")
    root = project.root
    project.close()
    with Project.open(root) as p:
        assert p.record("slide_000").split == "train" and p.record("slide_000").label == "malignant"


def test_remove_slide_keeps_labels_aside(project: Project, cohort: Path) -> None:
    import numpy as np

    lab = project.pixel_labels("slide_001")
    lab[:5, :5] = 1
    project.save_pixel_labels("slide_001", lab)
    project.remove_slide("slide_001")
    assert "slide_001" not in project.slide_ids
    assert not (project.root / "labels" / "slide_001.zarr").exists()
    assert list((project.root / "removed").glob("slide_001-*/slide_001.zarr"))
    # re-adding the same id starts from empty labels
    rec = project.add_slide(cohort.parent / "slide_001.tiff")
    assert rec.slide_id == "slide_001" and not np.any(project.pixel_labels("slide_001"))


def test_open_slide_missing_and_relink(project: Project, cohort: Path) -> None:
    with project.open_slide("slide_001") as s:
        assert s.dimensions == (2048, 2048)
    project.set_slide_mpp("slide_001", 0.3)
    with project.open_slide("slide_001") as s:
        assert s.mpp == 0.3
    src = cohort.parent / "slide_001.tiff"
    moved = cohort.parent / "moved" / "renamed.tiff"
    moved.parent.mkdir()
    src.rename(moved)
    assert [r.slide_id for r in project.missing_slides()] == ["slide_001"]
    with pytest.raises(ProjectError, match=r"missing .*relink\('slide_001'"):
        project.open_slide("slide_001")
    with pytest.raises(ProjectError, match="not the same slide"):
        from napari_wsimil.slide.synthetic import synthesize_slide

        synthesize_slide(cohort.parent / "other.tiff", (1024, 2048), seed=1, malignant=False)
        project.relink("slide_001", cohort.parent / "other.tiff")
    with pytest.raises(ProjectError, match="already in the project as slide 'slide_002'"):
        project.relink("slide_001", cohort.parent / "slide_002.tiff")
    project.relink("slide_001", moved)
    assert project.missing_slides() == [] and project.slide_path("slide_001") == moved


def test_classes(project: Project) -> None:
    from napari_wsimil.project import Annotation

    c = project.add_class("stroma")
    assert c.id == 3 and c.color.startswith("#") and c.color not in {k.color for k in project.classes[:3]}
    assert project.add_class("fat", "#ABCDEF").color == "#abcdef"
    with pytest.raises(ProjectError, match="already exists"):
        project.add_class("stroma")
    with pytest.raises(ProjectError, match="#rrggbb"):
        project.add_class("x", "red")
    project.save_annotations("slide_000", [Annotation.box(0, 0, 10, 10, "stroma")])
    project.rename_class(3, "Stroma")
    assert project.class_by_name("Stroma").id == 3
    assert [a.class_name for a in project.annotations("slide_000")] == ["Stroma"]
    assert project.recolor_class(3, "#000001").color == "#000001"
    with pytest.raises(ProjectError, match="reserved"):
        project.rename_class(0, "background")
    with pytest.raises(ProjectError, match="tumour, normal"):
        project.class_by_name("stroma")


def test_second_open_same_process_is_readonly(project: Project) -> None:
    other = Project.open(project.root)
    try:
        assert other.readonly and other.lock_owner is not None and other.lock_owner.pid == os.getpid()
        with pytest.raises(ProjectError, match=rf"open in another window \(pid {os.getpid()}\); opened read-only"):
            other.add_class("x")
        with pytest.raises(ProjectError, match="read-only"):
            other.save_pixel_labels("slide_000", other.pixel_labels("slide_000"))
        assert len(other.slides) == 3  # reading works
    finally:
        other.close()
    project.close()
    with Project.open(project.root) as p:
        assert not p.readonly


def test_second_process_gets_readonly(project: Project) -> None:
    root = project.root
    project.close()
    code = textwrap.dedent(f"""
        import sys
        from napari_wsimil.project import Project
        p = Project.open({str(root)!r})
        print("ready", p.readonly, flush=True)
        sys.stdin.readline()
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().split() == ["ready", "False"]
        with Project.open(root) as p:
            assert p.readonly and p.lock_owner.pid == child.pid
            with pytest.raises(ProjectError, match=f"pid {child.pid}"):
                p.set_split("slide_000", "test")
            assert "pid" in str(p.lock_owner)
    finally:
        child.stdin.close()
        child.wait(10)
    with Project.open(root) as p:  # the child's exit released the lock
        assert not p.readonly


def test_project_dirs_and_info(project: Project) -> None:
    assert project.runs_dir.is_dir() and project.features_dir.is_dir() and project.predictions_dir.is_dir()
    info = project.info()
    assert info["schema"] == 1 and len(info["slides"]) == 3 and info["slides"][0]["dimensions"] == [2048, 2048]
