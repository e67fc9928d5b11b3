"""The README's main job, headless: it runs end to end and writes what it says it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


def test_headless_demo_writes_its_outputs(tmp_path):
    from napari_wsimil.demo import run_headless

    summary = run_headless(tmp_path, screenshot=False)
    for name in ("thumbnail.png", "tissue_mask.png", "overlay.png", "patches.csv", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["patches"] == summary["patches"] > 50
    assert 0.05 < saved["tissue_fraction"] < 0.9
    mask = np.asarray(Image.open(tmp_path / "tissue_mask.png"))
    assert set(np.unique(mask)) == {0, 255}
    rows = (tmp_path / "patches.csv").read_text().strip().splitlines()
    assert len(rows) == saved["patches"] + 1


@pytest.mark.gui
def test_sample_data_opens_in_viewer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open_sample("napari-wsimil", "synthetic_slide")
    assert len(layers) == 1 and layers[0].multiscale
    assert layers[0].metadata["wsimil"]["mpp"] == pytest.approx(0.5)
    viewer.reset_view()
    qtbot.wait(300)
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
    pink = (shot[..., 0] > 150) & (shot[..., 1] < shot[..., 0] - 30) & (shot[..., 2] > 100)
    assert pink.mean() > 0.02, "no H&E-coloured tissue on the canvas"


@pytest.mark.gui
def test_demo_window_docks_every_widget_on_a_project(tmp_path, qtbot):
    from qtpy.QtWidgets import QApplication

    from napari_wsimil.demo import _wait_for, build_viewer
    from napari_wsimil.slide.synthetic import sample_slide_path

    viewer, widget = build_viewer(sample_slide_path(), show=True, project_dir=tmp_path / "project")
    try:
        _wait_for(widget, QApplication.instance())
        names = [layer.name for layer in viewer.layers]
        stem = sample_slide_path().stem
        for suffix in ("", " labels", " boxes", " tissue", " patches"):
            assert f"{stem}{suffix}" in names, names
        assert (tmp_path / "project" / "project.json").exists()
        assert len(viewer.window.dock_widgets) >= 3
    finally:
        viewer.close()


def test_headless_demo_trains_a_mil_model_and_writes_its_map(tmp_path, monkeypatch):
    """The same job at a smaller size: cohort → project → CLAM-SB with a live map → heatmap TIFF and PNG."""
    from napari_wsimil import demo, open_slide

    monkeypatch.setattr(demo, "MIL_SLIDES", 6)
    monkeypatch.setattr(demo, "MIL_SIZE", 2048)
    monkeypatch.setattr(demo, "MIL_EPOCHS", 2)
    monkeypatch.setattr(demo, "MIL_PATCH", 128)
    monkeypatch.setattr(demo, "MIL_MPP", 1.0)
    out = demo.run_mil_headless(tmp_path)
    assert [e["epoch"] for e in out["epochs"]] == [1, 2]
    with open_slide(out["heatmap"]) as h:
        assert h.mpp is not None and h.mpp > 0.5
    overlay = np.asarray(Image.open(tmp_path / "attention_overlay.png"))
    assert overlay.shape[2] == 3 and overlay.std() > 5
    # running it again reuses the project and the run instead of starting over
    again = demo.run_mil_headless(tmp_path)
    assert again["run"] == out["run"] and again["epochs"] == []
