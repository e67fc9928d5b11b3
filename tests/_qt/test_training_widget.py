"""The Training dock widget in a real viewer: train with a live map, correct, retrain, suggest, export."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui
napari = pytest.importorskip("napari")
pytest.importorskip("torch")

TRAIN_TIMEOUT = 60_000


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_wsimil.slide.synthetic import synthesize_cohort

    return synthesize_cohort(tmp_path_factory.mktemp("cohort"), 6, seed=3, size=2048)


def _project(root: Path, csv_path: Path) -> Path:
    from napari_wsimil.project import Project

    Project.create_from_csv(root, csv_path).close()
    return root


def _open(make_napari_viewer, project: Path):
    """A viewer with the Project and Training widgets (from the manifest), the project open on slide one."""
    from napari_wsimil._qt.training_widget import TrainingWidget

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1200, 900)
    _, pw = viewer.window.add_plugin_dock_widget("napari-wsimil", "Labelling project")
    _, tw = viewer.window.add_plugin_dock_widget("napari-wsimil", "Training and attention maps")
    assert isinstance(tw, TrainingWidget) and tw.session is pw.session
    pw.open_project(project)
    assert tw.session.slide is not None
    return viewer, pw, tw


def _small(tw, epochs: int) -> None:
    """Settings that train in seconds."""
    tw.method.setCurrentText("clam-sb")
    assert "k_sample" in tw.options and tw.options["k_sample"].toolTip()
    tw.epochs.setValue(epochs)
    tw.device.setCurrentText("cpu")
    tw.mpp.setValue(1.0)
    tw.patch.setValue(128)
    for name, value in (("hidden", 32), ("attn_hidden", 16), ("lr", 1e-3)):
        tw.set_option(name, value)


def _wait_idle(qtbot, tw, timeout: int = TRAIN_TIMEOUT) -> None:
    qtbot.waitUntil(lambda: not tw.busy, timeout=timeout)


def _notifications(monkeypatch) -> list[tuple[str, str]]:
    """(level, message) of every notification the widgets show (napari's show_error/warning/info)."""
    from napari.utils import notifications

    messages: list[tuple[str, str]] = []
    for level in ("error", "warning", "info"):
        monkeypatch.setattr(notifications, f"show_{level}",
                            lambda message, level=level: messages.append((level, message)))
    return messages


def test_train_watch_correct_retrain_suggest_export(make_napari_viewer, qtbot, tmp_path, cohort):
    import tifffile

    viewer, pw, tw = _open(make_napari_viewer, _project(tmp_path / "proj", cohort))
    s = tw.session
    sid, project = s.slide_id, s.project
    _small(tw, 3)
    assert tw.run_name.text() == "clam-sb-1"
    assert tw.config()["hidden"] == 32 and tw.config()["lr"] == pytest.approx(1e-3)

    tw.start_btn.click()
    assert tw.training and not tw.start_btn.isEnabled() and tw.cancel_btn.isEnabled()
    assert tw.worker.pbar.desc == "Training clam-sb-1"  # napari's progress bar in the activity dock
    _wait_idle(qtbot, tw)
    assert "done after epoch 3" in tw.status.text()

    # the live map: one layer over the slide, in the slide's world units
    layer = viewer.layers[f"attention {sid}"]
    assert not layer.rgb and layer.data.ndim == 2 and layer.data.dtype == np.float32
    assert layer.colormap.name == "inferno" and layer.blending == "translucent"
    if hasattr(layer, "colorbar"):
        assert layer.colorbar.visible
    assert tuple(layer.contrast_limits) == pytest.approx((tw.threshold.value(), 1.0))
    ds = layer.metadata["wsimil"]["downsample"]
    assert np.allclose(layer.extent.world, s.image_layer.extent.world, atol=ds * s.slide.mpp * 1.01)
    assert layer.metadata["wsimil"]["run"] == "clam-sb-1" and layer.metadata["wsimil"]["epoch"] == 3
    tw.threshold.setValue(0.3)
    tw.opacity.setValue(70)
    assert tuple(layer.contrast_limits) == pytest.approx((0.3, 1.0)) and layer.opacity == pytest.approx(0.7)

    # the loss plot, progress and the runs list
    plotted = tw.loss_plot.values()
    assert [e for e, _ in plotted["train"]] == [1, 2, 3]
    assert all(np.isfinite(v) for _, v in plotted["train"] + plotted["val"])
    assert tw.progress.value() == tw.progress.maximum() == 3
    assert tw.current_run() == "clam-sb-1" and tw.runs_list.count() == 1
    assert "clam-sb-1" in tw.runs_list.item(0).text() and "clam-sb-1" in tw.run_info.text()
    assert "auc" in tw.run_info.text() and "accuracy" in tw.run_info.text()  # the run's validation metrics
    assert tw.run_name.text() == "clam-sb-2"  # the next default name is free

    # pseudo-labels at the label geometry, corrected by hand
    tw.pseudo_btn.click()
    _wait_idle(qtbot, tw)
    pseudo = viewer.layers[f"pseudo-labels {sid}"]
    assert pseudo.data.shape == tuple(s.geometry.shape) and pseudo.editable
    assert np.allclose(pseudo.extent.world, s.image_layer.extent.world, atol=pseudo.scale[-1] * 1.01)
    _, normal = tw.api.class_ids()
    before = np.array(pseudo.data, copy=True)
    pseudo.data[:16, :16] = normal
    pseudo.refresh()
    changed = before[:16, :16] != normal
    assert changed.any()

    tw.retrain_btn.click()  # saves the correction, then MS-CLAM trains '<run>-corrected'
    assert tw.last_corrections == int(changed.sum())
    painted = project.pixel_labels(sid)
    assert (painted[:16, :16][changed] == normal).all()
    assert (s.labels_layer.data[:16, :16][changed] == normal).all()  # the project's own layer shows it
    assert tw.training
    _wait_idle(qtbot, tw)
    assert layer.metadata["wsimil"]["run"] == "clam-sb-1-corrected"  # the map followed the retraining
    info = json.loads((tw.api.run_dir("clam-sb-1-corrected") / "run.json").read_text())
    assert info["method"] == "ms-clam"
    assert [tw.runs_list.item(i).data(0x0100) for i in range(tw.runs_list.count())] == [
        "clam-sb-1", "clam-sb-1-corrected"]
    assert tw.current_run() == "clam-sb-1-corrected"

    # choosing a run shows its map (computed in the background) and its saved loss history
    tw.runs_list.setCurrentRow(0)
    _wait_idle(qtbot, tw)
    assert layer.metadata["wsimil"]["run"] == "clam-sb-1" and "clam-sb-1" in tw.run_info.text()
    assert tw.loss_plot.values() == plotted  # the epochs it trained, as the live plot showed them
    assert tw.loss_plot.values() == tw.api.loss_history("clam-sb-1")
    tw.runs_list.setCurrentRow(1)
    _wait_idle(qtbot, tw)
    assert [e for e, _ in tw.loss_plot.values()["train"]] == [1, 2, 3]  # the corrected run's own epochs
    assert tw.loss_plot.values() != plotted
    tw.runs_list.setCurrentRow(0)
    _wait_idle(qtbot, tw)

    # suggestions: points inside the slide, listed in the widget
    tw.n_suggest.setValue(4)
    tw.suggest_btn.click()
    _wait_idle(qtbot, tw)
    points = viewer.layers[f"suggestions {sid}"]
    assert 1 <= len(points.data) <= 4 and tw.suggestion_list.count() == len(points.data)
    (y0, x0), (y1, x1) = s.image_layer.extent.world[:, -2:]
    assert ((points.data[:, 0] >= y0) & (points.data[:, 0] <= y1)).all()
    assert ((points.data[:, 1] >= x0) & (points.data[:, 1] <= x1)).all()
    tw.suggestion_list.setCurrentRow(0)
    assert tuple(viewer.scene.camera.center[-2:]) == pytest.approx(tuple(points.data[0]))

    # exports into PROJECT/exports, written by a worker
    tw.export_masks_btn.click()
    _wait_idle(qtbot, tw)
    ome, png = tw.exported
    assert ome.parent == Path(project.root) / "exports"
    mask = tifffile.imread(ome)
    assert mask.shape == tuple(s.geometry.shape) and (mask[:16, :16][changed] == normal).all()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    tw.export_heatmap_btn.click()
    _wait_idle(qtbot, tw)
    [heat_path] = tw.exported
    from napari_wsimil.layers import heatmap_description

    desc = heatmap_description(heat_path)
    assert desc is not None and desc["downsample"] == pytest.approx(ds) and desc["slide_id"] == sid
    assert tifffile.imread(heat_path).shape == layer.data.shape

    tw.threshold.setValue(0.5)
    tw.export_geojson_btn.click()
    _wait_idle(qtbot, tw)
    [geo_path] = tw.exported
    doc = json.loads(geo_path.read_text())
    assert doc["type"] == "FeatureCollection"
    w, h = project.record(sid).dimensions
    if (np.asarray(layer.data) > 0.5).any():
        assert doc["features"]
    for f in doc["features"]:
        assert f["properties"]["classification"]["name"] == "tumour"
        xy = np.array([c for ring in f["geometry"]["coordinates"] for c in ring])
        assert (xy >= 0).all() and (xy[:, 0] <= w).all() and (xy[:, 1] <= h).all()
    from napari_wsimil.project.annotations import read_geojson

    read_geojson(geo_path)  # valid polygons, readable by the project
    pw.close_project()


def _fake_map(tw) -> object:
    """An attention layer over the current slide without training: a bright square in a dark map."""
    from napari_wsimil.train.events import MapEvent

    s = tw.session
    w, h = s.slide.dimensions
    ds = 16.0
    heat = np.zeros((int(np.ceil(h / ds)), int(np.ceil(w / ds))), np.float32)
    heat[20:60, 20:60] = 0.9
    return tw.show_map(MapEvent(s.slide_id, 1, heat, ds, s.slide.mpp, np.array([0.2, 0.8])), "fake")


def test_exports_are_written_by_a_worker_while_the_window_stays_responsive(make_napari_viewer, qtbot,
                                                                           tmp_path, cohort, monkeypatch):
    import threading

    from qtpy.QtCore import QTimer

    from napari_wsimil.infer import heatmap
    from napari_wsimil.layers import heatmap_description

    viewer, pw, tw = _open(make_napari_viewer, _project(tmp_path / "proj", cohort))
    project, sid = tw.session.project, tw.session.slide_id
    out = Path(project.root) / "exports"
    layer = _fake_map(tw)
    assert tw.export_heatmap_btn.isEnabled() and tw.export_geojson_btn.isEnabled()

    threads: list[threading.Thread] = []
    release = threading.Event()
    real_mask = project.export_mask

    def slow_mask(*args, **kwargs):
        threads.append(threading.current_thread())
        release.wait(20)  # held until the test, on the main thread, lets it go
        return real_mask(*args, **kwargs)

    monkeypatch.setattr(project, "export_mask", slow_mask)
    tw.export_masks_btn.click()
    assert tw.busy and not out.joinpath(f"{sid}.png").exists()
    ticks: list[int] = []
    for i in range(3):  # the event loop keeps running while the export waits in its worker
        QTimer.singleShot(20 * i, lambda i=i: ticks.append(i))
    qtbot.waitUntil(lambda: len(ticks) == 3, timeout=5_000)
    assert tw.busy and "masks" in tw.status.text()
    release.set()
    qtbot.waitUntil(lambda: out.joinpath(f"{sid}.png").is_file() and not tw.busy, timeout=20_000)
    assert [p.name for p in tw.exported] == [f"{sid}.ome.tif", f"{sid}.png"]
    assert len(threads) == 2 and all(t is not threading.main_thread() for t in threads)

    def recording(real):
        def wrapper(*args, **kwargs):
            threads.append(threading.current_thread())
            return real(*args, **kwargs)
        return wrapper

    for name in ("write_heatmap", "threshold_polygons"):
        monkeypatch.setattr(heatmap, name, recording(getattr(heatmap, name)))
    threads.clear()
    tw.export_heatmap_btn.click()
    _wait_idle(qtbot, tw)
    [heat_path] = tw.exported
    desc = heatmap_description(heat_path)
    assert desc["slide_id"] == sid and desc["run"] == "fake" and desc["downsample"] == pytest.approx(16.0)
    tw.threshold.setValue(0.5)
    tw.export_geojson_btn.click()
    _wait_idle(qtbot, tw)
    [geo_path] = tw.exported
    assert len(json.loads(geo_path.read_text())["features"]) == 1  # the bright square
    assert len(threads) == 2 and all(t is not threading.main_thread() for t in threads)
    assert layer.metadata["wsimil"]["run"] == "fake"
    pw.close_project()


def test_dock_renders_its_panels(make_napari_viewer, qtbot, tmp_path, cohort):
    """A screenshot of the window under Xvfb: the Training dock shows its panels (not a blank area)."""
    viewer, pw, tw = _open(make_napari_viewer, _project(tmp_path / "proj", cohort))
    _fake_map(tw)
    panels = (tw.form, tw.run_control, tw.runs_panel, tw.corrections, tw.exports, tw.loss_plot)
    qtbot.waitUntil(lambda: all(p.isVisible() for p in panels), timeout=5_000)
    assert all(p.width() > 50 and p.height() > 10 for p in panels)
    qtbot.wait(300)
    win = viewer.window._qt_window
    shot = np.asarray(viewer.screenshot(canvas_only=False, flash=False))[..., :3].astype(int)
    ratio = shot.shape[1] / win.width()
    visible = tw.visibleRegion().boundingRect()
    assert visible.height() > 150 and visible.width() > 150
    top_left = tw.mapTo(win, visible.topLeft())
    x0, y0 = int(top_left.x() * ratio), int(top_left.y() * ratio)
    region = shot[y0:y0 + int(visible.height() * ratio), x0:x0 + int(visible.width() * ratio)]
    assert region.size
    colours, counts = np.unique(region.reshape(-1, 3), axis=0, return_counts=True)
    assert len(colours) > 30, "the dock is blank"
    assert counts.max() / counts.sum() < 0.95, "the dock is one flat colour"
    text = (np.abs(region - colours[counts.argmax()]).sum(-1) > 150)  # text and controls on the background
    assert text.mean() > 0.005
    pw.close_project()


def test_pause_and_cancel_do_not_freeze(make_napari_viewer, qtbot, tmp_path, cohort):
    _, pw, tw = _open(make_napari_viewer, _project(tmp_path / "proj", cohort))
    _small(tw, 500)
    tw.set_option("early_stopping", False)
    tw.start_btn.click()
    qtbot.waitUntil(lambda: bool(tw.loss_plot.values()["train"]), timeout=TRAIN_TIMEOUT)

    tw.pause_btn.click()
    assert tw.pause_btn.text() == "Resume"
    qtbot.waitUntil(lambda: "paused" in tw.status.text(), timeout=10_000)
    epochs = len(tw.loss_plot.values()["train"])
    # the child process itself is stopped, not only the delivery of its events: no checkpoint appears
    run_dir = tw.api.run_dir(tw.run_control.run_name)
    qtbot.wait(300)
    ckpts = sorted(run_dir.glob("ckpt-*.safetensors"))
    qtbot.wait(1500)  # the window stays responsive and training does not advance
    assert len(tw.loss_plot.values()["train"]) == epochs
    assert sorted(run_dir.glob("ckpt-*.safetensors")) == ckpts
    state = open(f"/proc/{tw.run_control.handle.pid}/stat").read().split()[2] if Path("/proc").is_dir() else "T"
    assert state == "T"  # SIGSTOP'ed
    tw.pause_btn.click()
    assert tw.pause_btn.text() == "Pause"
    qtbot.waitUntil(lambda: len(tw.loss_plot.values()["train"]) > epochs, timeout=TRAIN_TIMEOUT)

    tw.cancel_btn.click()
    qtbot.waitUntil(lambda: not tw.training, timeout=10_000)
    assert "cancelled" in tw.status.text()
    assert len(tw.loss_plot.values()["train"]) < 500
    assert tw.start_btn.isEnabled() and not tw.cancel_btn.isEnabled()
    pw.close_project()


def test_training_error_is_a_notification(make_napari_viewer, qtbot, tmp_path, cohort, monkeypatch, caplog):
    one = tmp_path / "one.csv"
    with open(cohort, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] == "1"]
    with open(one, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["slide_id", "path", "label"])
        w.writeheader()
        for r in rows[:2]:
            w.writerow({"slide_id": r["slide_id"], "path": str(cohort.parent / r["path"]),
                        "label": r["label"]})
    messages = _notifications(monkeypatch)
    _, pw, tw = _open(make_napari_viewer, _project(tmp_path / "proj", one))
    _small(tw, 2)
    with caplog.at_level(logging.ERROR, logger="napari_wsimil._qt"):
        tw.start_btn.click()
        _wait_idle(qtbot, tw)
    [(level, message)] = messages
    assert level == "error" and "only class" in message and "clam-sb-1" in message
    assert "failed" in tw.status.text() and tw.start_btn.isEnabled()
    assert any(r.exc_info for r in caplog.records)  # the traceback is in the log

    # actions that need a run say so instead of failing
    messages.clear()
    assert not tw.pseudo_btn.isEnabled()
    tw.show_pseudo_labels()
    assert messages and messages[0][0] == "info" and not tw.busy
    pw.close_project()


def test_segmentation_method_in_the_widget(make_napari_viewer, qtbot, tmp_path, cohort):
    """Pinchaud from the same widget: its own form and resolution, a live probability map over the slide,
    pixel-level pseudo-labels, and "retrain with corrections" continuing the same run."""
    viewer, pw, tw = _open(make_napari_viewer, _project(tmp_path / "proj", cohort))
    s = tw.session
    sid = s.slide_id
    tw.method.setCurrentText("pinchaud")
    assert "beta1" in tw.options and "eta" in tw.options and "k_sample" not in tw.options
    assert tw.mpp.value() == pytest.approx(1.0) and tw.patch.value() == 128  # Pinchaud's resolution
    tw.epochs.setValue(1)
    tw.device.setCurrentText("cpu")
    tw.mpp.setValue(4.0)
    tw.patch.setValue(32)
    for name, value in (("width", 8), ("depth", 3), ("patches_per_epoch", 32), ("batch_size", 8),
                        ("map_tile", 128), ("val_patches", 4)):
        tw.set_option(name, value)
    run = tw.run_name.text()
    tw.start_btn.click()
    _wait_idle(qtbot, tw)
    assert "done after epoch 1" in tw.status.text()
    layer = viewer.layers[f"attention {sid}"]
    assert layer.data.ndim == 2 and layer.data.shape == (256, 256)
    ds = layer.metadata["wsimil"]["downsample"]
    assert np.allclose(layer.extent.world, s.image_layer.extent.world, atol=ds * s.slide.mpp * 1.01)
    # choosing the run sets the threshold (map look, GeoJSON outlines) to its operating threshold
    from qtpy.QtCore import Qt

    point_t = tw.api.operating_threshold(run)
    assert point_t is not None and 0.5 <= point_t < 1
    tw.threshold.setValue(0.2)
    rows = [tw.runs_list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(tw.runs_list.count())]
    tw.runs_list.setCurrentRow(-1)
    tw.runs_list.setCurrentRow(rows.index(run))
    _wait_idle(qtbot, tw)
    assert tw.threshold.value() == pytest.approx(point_t, abs=5e-4)

    tw.pseudo_btn.click()
    _wait_idle(qtbot, tw)
    pseudo = viewer.layers[f"pseudo-labels {sid}"]
    assert pseudo.data.shape == tuple(s.geometry.shape)
    assert (tmp_path / "proj" / "pseudo_labels" / run / f"{sid}.zarr").is_dir()
    tumour, normal = tw.api.class_ids()
    pseudo.data[:8, :8] = tumour
    pseudo.refresh()
    tw.retrain_btn.click()
    _wait_idle(qtbot, tw)
    assert (s.project.pixel_labels(sid)[:8, :8] == tumour).all()
    state = json.loads((tw.api.run_dir(run) / "last.json").read_text())
    assert state["epoch"] > 1 and state["method"]["name"] == "pinchaud"  # the same run went on


def test_a_family_registered_at_run_time_in_the_widget(make_napari_viewer, qtbot, tmp_path, cohort):
    """A method of a family the widget has never heard of (tests/mean_pool_family.py, registered here):
    listed, its own form and resolution, no encoder row (its family has none), trained in the child
    process with its live layer, and "retrain with corrections" going the family's way."""
    import mean_pool_family as mp

    from napari_wsimil.train.registry import register, unregister

    register(mp.METHOD)
    try:
        viewer, pw, tw = _open(make_napari_viewer, _project(tmp_path / "proj", cohort))
        s = tw.session
        sid = s.slide_id
        names = [tw.method.itemText(i) for i in range(tw.method.count())]
        assert mp.NAME in names and "clam-sb" in names
        tw.method.setCurrentText(mp.NAME)
        assert set(tw.options) >= {"temperature", "lr"} and "k_sample" not in tw.options
        assert tw.mpp.value() == pytest.approx(2.0) and tw.patch.value() == 64  # the family's defaults
        assert tw.encoder_picker.isHidden()
        tw.epochs.setValue(2)
        tw.device.setCurrentText("cpu")
        tw.set_option("temperature", 2.0)
        run = tw.run_name.text()
        tw.start_btn.click()
        _wait_idle(qtbot, tw)
        assert "done after epoch 2" in tw.status.text()
        layer = viewer.layers[f"attention {sid}"]
        assert layer.data.ndim == 2 and layer.metadata["wsimil"]["run"] == run
        state = json.loads((tw.api.run_dir(run) / "last.json").read_text())
        assert state["config"]["temperature"] == 2.0 and state["method"]["name"] == mp.NAME

        tw.pseudo_btn.click()
        _wait_idle(qtbot, tw)
        pseudo = viewer.layers[f"pseudo-labels {sid}"]
        assert pseudo.data.shape == tuple(s.geometry.shape)
        _, normal = tw.api.class_ids()
        before = np.array(pseudo.data, copy=True)
        pseudo.data[:16, :16] = normal
        pseudo.refresh()
        tw.retrain_btn.click()
        _wait_idle(qtbot, tw)
        changed = before[:16, :16] != normal
        assert (s.project.pixel_labels(sid)[:16, :16][changed] == normal).all()
        state = json.loads((tw.api.run_dir(run) / "last.json").read_text())
        assert state["epoch"] > 2  # the family's default: the same run goes on
    finally:
        unregister(mp.NAME)


def test_zoommil_in_the_widget_shows_its_zoom_path(make_napari_viewer, qtbot, tmp_path, cohort):
    """ZoomMIL from the widget: its settings (levels, K), a live attention map of the lowest level, and the
    zoom path as rectangles coloured by level over the slide."""
    viewer, pw, tw = _open(make_napari_viewer, _project(tmp_path / "proj", cohort))
    s = tw.session
    sid = s.slide_id
    tw.method.setCurrentText("zoommil")
    assert {"levels", "k", "num_samples", "sigma"} <= set(tw.options)
    assert tw.mpp.value() == pytest.approx(8.0) and not tw.encoder_picker.isHidden()
    tw.epochs.setValue(1)
    tw.device.setCurrentText("cpu")
    tw.patch.setValue(32)
    for name, value in (("levels", "4,2,1"), ("k", 3), ("hidden", 32), ("attn_hidden", 16),
                        ("num_samples", 20)):
        tw.set_option(name, value)
    tw.start_btn.click()
    _wait_idle(qtbot, tw)
    assert "done after epoch 1" in tw.status.text()
    heat = viewer.layers[f"attention {sid}"]
    assert heat.data.ndim == 2
    zoom = viewer.layers[f"zoom path {sid}"]
    assert zoom.nshapes > 3 and zoom.metadata["wsimil"]["kind"] == "zoom_path"
    edges = {tuple(np.round(c[:3], 3)) for c, a in zip(zoom.edge_color, zoom.edge_color[:, 3]) if a > 0}
    assert len(edges) == 2  # the patches chosen at the two lower levels, one colour per level
    (y0, x0), (y1, x1) = s.image_layer.extent.world[:, -2:]
    pts = np.concatenate([np.asarray(d) for d in zoom.data])
    assert (pts[:, 0] >= y0 - 1).all() and (pts[:, 0] <= y1 + 1).all() and (pts[:, 1] <= x1 + 1).all()


# --- the encoder row -----------------------------------------------------------------------------
LAB_MODULE = '''
"""A lab's own encoder, installed as a package that registers it through an entry point."""
from pathlib import Path

import numpy as np
from napari_wsimil.features.encoders import Encoder


class LabMean(Encoder):
    """Mean colour of the patch, 3-d (a lab's encoder)."""

    name = "lab-mean"
    version = "1"
    dim = 3

    def __init__(self, weights=None):
        self.weights = weights
        if weights is not None:  # a real encoder would load them; this one only proves it got them
            self.version = "1+" + Path(weights).read_text().strip()

    def encode(self, patches):
        return patches.reshape(len(patches), -1, 3).mean(1).astype(np.float32) / 255.0
'''


@pytest.fixture
def lab_plugin(tmp_path, monkeypatch):
    """A fake installed distribution registering ``lab-mean`` in the napari_wsimil.encoders group (a
    *.dist-info folder on sys.path, which the training child process inherits); removed afterwards."""
    import sys

    from napari_wsimil.features.encoders import refresh_encoders

    site = tmp_path / "site"
    site.mkdir()
    (site / "fake_lab_encoders.py").write_text(LAB_MODULE)
    info = site / "fake_lab_encoders-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-lab-encoders\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[napari_wsimil.encoders]\nlab-mean = fake_lab_encoders:LabMean\n")
    monkeypatch.syspath_prepend(str(site))
    assert refresh_encoders()["lab-mean"].source == "fake-lab-encoders"
    yield site
    monkeypatch.undo()
    sys.modules.pop("fake_lab_encoders", None)
    refresh_encoders()


def test_encoder_row_lists_plugins_remembers_and_refuses_bad_weights(make_napari_viewer, tmp_path, cohort,
                                                                      lab_plugin, monkeypatch):
    messages = _notifications(monkeypatch)
    project = _project(tmp_path / "proj", cohort)
    _, pw, tw = _open(make_napari_viewer, project)
    picker = tw.encoder_picker
    names = picker.names()
    assert {"handcrafted", "resnet18", "resnet50-trunc", "ssl-ae", "timm", "timm:vit_large_patch16_224",
            "lab-mean"} <= set(names)
    assert picker.encoder() == "handcrafted" and picker.weights() is None
    i = names.index("lab-mean")
    assert picker.combo.itemText(i) == "lab-mean  [fake-lab-encoders]"  # a plugin shows its package
    tip = picker.combo.itemData(i, 3)  # Qt.ToolTipRole
    assert "Mean colour of the patch" in tip and "fake-lab-encoders" in tip
    assert "stain histograms" in picker.combo.itemData(names.index("handcrafted"), 3)

    # the weights field only for encoders that take weights; a folder for timm ones and plugins
    assert not picker.weights_edit.isEnabled() and not picker.weights_btn.isEnabled()
    assert picker.set_encoder("resnet18")
    assert picker.weights_edit.isEnabled() and picker.weights_btn.isEnabled()
    assert not picker.folder_btn.isEnabled()
    assert "resnet18" in picker.combo.toolTip() and "random" in picker.combo.toolTip()
    picker.set_encoder("timm")
    assert picker.folder_btn.isEnabled() and "required" in picker.weights_edit.placeholderText()
    picker.set_encoder("lab-mean")
    assert picker.folder_btn.isEnabled() and picker.weights() is None

    # refused before anything is created: a missing weights file, the timm encoder without its folder
    missing = tmp_path / "nowhere" / "resnet18.pth"
    picker.set_encoder("resnet18")
    picker.set_weights(missing)
    tw.start_btn.click()
    assert not tw.training and not tw.api.runs_dir.exists()
    [(level, message)] = messages
    assert level == "warning" and str(missing) in message and "does not exist" in message
    assert tw.status.text() == message
    messages.clear()
    picker.set_encoder("timm")
    tw.start()
    assert not tw.training and not tw.api.runs_dir.exists()
    assert len(messages) == 1 and "needs a weights folder" in messages[0][1]
    folder = tmp_path / "hub"
    folder.mkdir()
    picker.set_weights(folder)
    tw.start()
    assert not tw.training and not tw.api.runs_dir.exists() and "config.json" in messages[-1][1]

    # the choice and each encoder's weights are remembered: other encoders, methods, projects
    picker.set_encoder("resnet18")
    assert picker.weights() == str(missing)
    picker.set_encoder("handcrafted")
    assert picker.weights() is None and picker.weights_edit.text() == ""
    picker.set_encoder("resnet18")
    assert picker.weights_edit.text() == str(missing)
    tw.method.setCurrentText("pinchaud")  # segmentation trains on pixels: no encoder row
    assert picker.isHidden()
    tw.method.setCurrentText("abmil")
    assert not picker.isHidden() and picker.encoder() == "resnet18"
    pw.close_project()
    pw.open_project(project)
    assert picker.encoder() == "resnet18" and picker.weights() == str(missing)
    assert "lab-mean" in picker.names()
    pw.close_project()


def test_chosen_encoder_and_weights_reach_the_run(make_napari_viewer, qtbot, tmp_path, cohort, lab_plugin):
    """The plugin's encoder, with a weights file, encodes the bags in the training child process; run.json
    records both."""
    _, pw, tw = _open(make_napari_viewer, _project(tmp_path / "proj", cohort))
    weights = tmp_path / "lab.weights"
    weights.write_text("w42\n")
    _small(tw, 2)
    tw.encoder_picker.set_encoder("lab-mean")
    tw.encoder_picker.set_weights(weights)
    run = tw.run_name.text()
    tw.start_btn.click()
    assert tw.training
    _wait_idle(qtbot, tw)
    assert "done after epoch 2" in tw.status.text()
    info = json.loads((tw.api.run_dir(run) / "run.json").read_text())
    assert info["encoder"] == "lab-mean" and info["weights"] == str(weights.resolve())
    from napari_wsimil.features import read_bag

    bag = read_bag(next((tmp_path / "proj" / "features" / "lab-mean").rglob("*.npz")))
    assert bag.features.shape[1] == 3 and bag.attrs["encoder_version"] == "1+w42"
    pw.close_project()
