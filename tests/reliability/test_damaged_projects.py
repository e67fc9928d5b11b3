"""Damaged projects (issue #21, part 2): each kind of damage opens, is named, and is repaired from the previous
good copy that every save keeps (or, where there is none, named as lost)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.errors import ProjectError
from napari_wsimil.project import Project
from napari_wsimil.project.check import check_project, repair_project


def _kinds(report) -> list[str]:
    return sorted(d.kind for d in report.damage)


def _chunk(root: Path) -> Path:
    chunks = [p for p in (root / "labels").rglob("c/*/*") if not p.name.startswith(".")]
    assert len(chunks) == 1, chunks
    return chunks[0]


def _labels(root: Path) -> np.ndarray:
    with Project.open(root, readonly=True) as p:
        return p.pixel_labels(p.slide_ids[0])


def test_healthy_project_has_no_damage(small_project: Path):
    report = check_project(small_project)
    assert report.ok, report.text()
    assert report.checked["label chunks"] == 1 and report.checked["slides"] == 2


@pytest.mark.parametrize("how", ["truncated", "garbled"])
def test_damaged_label_chunk_is_restored_from_its_previous_copy(small_project: Path, how: str):
    chunk = _chunk(small_project)
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2] if how == "truncated" else data[:20] + bytes(len(data) - 20))
    with Project.open(small_project) as p:  # opens, and writable: only that slide's labels are unusable
        assert not p.readonly
        with pytest.raises(ProjectError, match=r"is damaged: a chunk cannot be decoded .*project check"):
            p.pixel_labels(p.slide_ids[0])
    report = check_project(small_project)
    assert _kinds(report) == ["label-chunk"], report.text()
    assert "x 0-512, y 0-512" in report.damage[0].what and "previous good copy" in report.damage[0].fix
    fixed = repair_project(small_project)
    assert fixed.ok and "restored from the chunk's previous good copy" in fixed.repaired[0], fixed.text()
    labels = _labels(small_project)
    assert (labels[10:60, 20:90] == 1).all()  # the first save is back; the last stroke on that chunk is lost
    assert (labels[100:140, 100:150] == 0).all()
    assert any((small_project / "removed").rglob("damaged-*/labels/*/c/0/0"))  # the damaged chunk is kept


def test_damaged_label_chunk_without_previous_copy_is_set_aside_and_named(small_project: Path):
    chunk = _chunk(small_project)
    (chunk.parent / f".{chunk.name}.wsimil-prev").unlink()
    chunk.write_bytes(chunk.read_bytes()[:30])
    report = check_project(small_project)
    assert "its painting is lost" in report.damage[0].fix
    fixed = repair_project(small_project)
    assert fixed.ok and "now reads as unlabelled" in fixed.repaired[0]
    assert not _labels(small_project).any()


def test_corrupted_project_file_opens_read_only_and_is_restored(small_project: Path):
    pj = small_project / "project.json"
    with Project.open(small_project) as p:
        p.set_slide_label(p.slide_ids[0], "malignant")  # the previous good copy now holds 'benign' or so
        before = json.loads((small_project / ".project.json.wsimil-prev").read_text())["slides"][0]["label"]
    pj.write_bytes(pj.read_bytes()[:100])
    with Project.open(small_project) as p:
        assert p.readonly and len(p.slides) == 2
        assert [d.kind for d in p.damage] == ["project-file"]
        with pytest.raises(ProjectError, match=r"project.json is damaged.*read-only from its previous good copy"):
            p.set_slide_label(p.slide_ids[0], "benign")
    fixed = repair_project(small_project)
    assert fixed.ok, fixed.text()
    with Project.open(small_project) as p:
        assert not p.readonly and p.slides[0].label == before


def test_corrupted_project_file_without_copy_is_one_clear_error(small_project: Path):
    (small_project / ".project.json.wsimil-prev").unlink()
    (small_project / "project.json").write_text("{\"schema\": 1, \"classes\": [")
    with pytest.raises(ProjectError, match="project.json is damaged: .*no usable previous copy"):
        Project.open(small_project)
    assert _kinds(check_project(small_project)) == ["project-file"]


def test_damaged_annotations_are_restored(small_project: Path):
    from napari_wsimil.project.annotations import Annotation

    with Project.open(small_project) as p:
        sid = p.slide_ids[0]
        p.save_annotations(sid, [Annotation.box(10, 10, 50, 50, "tumour")])
        p.save_annotations(sid, [Annotation.box(10, 10, 50, 50, "tumour"), Annotation.box(60, 60, 90, 90, "normal")])
    path = small_project / "annotations" / f"{sid}.geojson"
    path.write_text(path.read_text()[:40])
    report = check_project(small_project)
    assert _kinds(report) == ["annotations"], report.text()
    assert repair_project(small_project).ok
    with Project.open(small_project) as p:
        assert [a.class_name for a in p.annotations(sid)] == ["tumour"]  # the save before the damaged one


def test_missing_slide_is_named_not_repaired(small_project: Path):
    with Project.open(small_project, readonly=True) as p:
        path = p.slide_path(p.slide_ids[1])
    path.rename(path.with_name("moved.tif"))
    report = repair_project(small_project)
    assert _kinds(report) == ["missing-slide"] and report.damage[0].fix is None
    assert "relink" in report.damage[0].what
    with Project.open(small_project) as p:
        assert not p.readonly and [r.slide_id for r in p.missing_slides()] == [p.slide_ids[1]]


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)


def test_half_written_export_and_stale_lock_from_a_killed_process(small_project: Path):
    """A real process opens the project (its pid goes into the lock file) and is killed -9 in the middle of
    writing an export: the half-written file and the lock naming a dead pid are found and cleaned."""
    child = _child(f"""
        import time
        from napari_wsimil.io.atomic import atomic_write
        from napari_wsimil.project import Project
        p = Project.open({str(small_project)!r})
        with atomic_write(p.root / "cohort.csv", "w") as fh:
            fh.write("slide_id,path,label\\n" * 1000)
            fh.flush()
            print("writing", flush=True)
            time.sleep(60)
    """)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
    report = check_project(small_project)
    assert _kinds(report) == ["half-written", "stale-lock"], report.text()
    assert f"pid {child.pid}" in next(d.what for d in report.damage if d.kind == "stale-lock")
    assert not (small_project / "cohort.csv").exists()  # nothing half-written passes for a finished export
    fixed = repair_project(small_project)
    assert fixed.ok and len(fixed.repaired) == 2, fixed.text()


def test_repair_is_refused_while_the_project_is_open_for_writing(small_project: Path):
    chunk = _chunk(small_project)
    chunk.write_bytes(b"garbage")
    with Project.open(small_project) as p:
        assert not p.readonly
        with pytest.raises(ProjectError, match="cannot repair .* open for writing in another window"):
            repair_project(small_project)
    assert _kinds(check_project(small_project)) == ["label-chunk"]


def test_cli_check_and_repair(small_project: Path):
    chunk = _chunk(small_project)
    chunk.write_bytes(chunk.read_bytes()[:25])
    wsimil = [sys.executable, "-m", "napari_wsimil.cli", "project", "check", str(small_project)]
    env = {**os.environ}
    out = subprocess.run(wsimil, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "[label-chunk]" in out.stdout and "--repair" in out.stdout
    out = subprocess.run(wsimil + ["--repair"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "repaired:" in out.stdout and "no damage left" in out.stdout
    out = subprocess.run(wsimil[:-1] + [str(small_project / "nope")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
