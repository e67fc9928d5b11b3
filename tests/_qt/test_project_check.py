"""The project widget's Check button on a damaged project, in a real viewer: the banner names the damage, the
report lists it, and Repair restores the previous good copies and reopens the project for writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui
napari = pytest.importorskip("napari")


def _damaged_project(tmp_path: Path) -> Path:
    from napari_wsimil.project import Project
    from napari_wsimil.slide.synthetic import synthesize_cohort

    synthesize_cohort(tmp_path / "c", 1, seed=5, size=2048, workers=1)
    root = tmp_path / "proj"
    with Project.create_from_csv(root, tmp_path / "c" / "cohort.csv") as p:
        sid = p.slide_ids[0]
        labels = np.zeros(p.label_geometry(sid).shape, np.uint8)
        labels[5:25, 5:25] = 1
        p.save_pixel_labels(sid, labels)
        labels[30:40, 30:40] = 2
        p.save_pixel_labels(sid, labels, dirty=[(30, 40, 30, 40)])
        p.set_split(sid, "train")
    chunk = next(c for c in (root / "labels").rglob("c/*/*") if not c.name.startswith("."))
    chunk.write_bytes(chunk.read_bytes()[:16])
    pj = root / "project.json"
    pj.write_text(pj.read_text()[:80])
    return root


def test_check_button_reports_and_repairs(make_napari_viewer, qtbot, tmp_path: Path):
    from napari_wsimil._qt.project_widget import ProjectWidget

    root = _damaged_project(tmp_path)
    viewer = make_napari_viewer(show=True)
    pw = ProjectWidget(viewer)
    viewer.window.add_dock_widget(pw)
    pw.open_project(str(root))
    p = pw.session.project
    assert p.readonly and len(p.slides) == 1
    assert not pw.banner.isHidden() and "project.json is damaged" in pw.banner.text() and "Check" in pw.banner.text()

    pw.check_btn.click()
    qtbot.waitUntil(lambda: pw.last_report is not None and not pw.tasks.busy, timeout=30_000)
    text = pw.check_dialog.text()
    assert "[project-file]" in text and "[label-chunk]" in text
    assert pw.repair_btn is not None and pw.repair_btn.text() == "Repair 2"

    pw.last_report = None
    pw.repair_btn.click()
    qtbot.waitUntil(lambda: pw.last_report is not None and not pw.tasks.busy, timeout=30_000)
    assert pw.last_report.ok and len(pw.last_report.repaired) == 2, pw.last_report.text()
    p = pw.session.project
    assert p is not None and not p.readonly and not p.damage
    assert pw.banner.isHidden()
    labels = p.pixel_labels(p.slide_ids[0])
    assert (labels[5:25, 5:25] == 1).all()
    pw.check_dialog.close()
    pw.session.close_project()
