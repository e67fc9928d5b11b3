"""The Batch dock widget in a real viewer: features of a tiny cohort in this process, then a prediction on a real
dask cluster (local:1), each with a determinate progress bar in napari's activity dock (slides done / total), the
cluster's dashboard address, and the outputs on disk; Cancel stops a batch after the running slide."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gui, pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")]
napari = pytest.importorskip("napari")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_wsimil.slide.synthetic import synthesize_cohort

    out = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(out, 4, seed=5, size=(1024, 1024))
    return out / "cohort.csv"


def _panel(make_napari_viewer):
    from napari_wsimil._qt.batch_panel import BatchPanel

    viewer = make_napari_viewer(show=True)
    _, panel = viewer.window.add_plugin_dock_widget("napari-wsimil", "Batch")
    assert isinstance(panel, BatchPanel)
    return viewer, panel


def test_features_then_a_cluster_prediction_with_progress(make_napari_viewer, qtbot, cohort, tmp_path) -> None:
    from napari.utils import progress

    from napari_wsimil.cli import main
    from napari_wsimil.features import read_bag

    viewer, panel = _panel(make_napari_viewer)
    assert panel.start_btn.isEnabled() and not panel.cancel_btn.isEnabled()
    panel.start()  # nothing chosen: one line says what is missing, nothing runs
    assert "choose the slides" in panel.status.text() and not panel.tasks.busy

    bags = tmp_path / "bags"
    panel.slides.setText(str(cohort))
    panel.out.setText(str(bags))
    panel.patch.setValue(64)
    panel.mpp.setValue(1.0)
    panel.start_btn.click()
    assert panel.tasks.busy and panel.cancel_btn.isEnabled() and not panel.start_btn.isEnabled()
    qtbot.waitUntil(lambda: not panel.tasks.busy and panel.results is not None, timeout=120_000)
    seen = panel.bar_history
    assert seen[-1] == (4, 4) and [n for n, _ in seen] == sorted(n for n, _ in seen), (seen, panel.status.text())
    assert panel.status.text().startswith("4 computed, 0 up to date, 0 failed"), panel.status.text()
    assert sorted(p.stem for p in bags.glob("*.npz")) == [f"slide_{i:03d}" for i in range(4)]
    assert read_bag(bags / "slide_000.npz").attrs["patch_size"] == 64
    assert panel.pbar is None and not [p for p in progress._all_instances if p.desc.startswith("Batch")]

    # a prediction of a trained run, on a real dask cluster started from the widget
    run = tmp_path / "run"
    assert main(["train", str(cohort), "--method", "abmil", "--out", str(run), "--epochs", "1", "--encoder",
                 "handcrafted", "--patch", "64", "--mpp", "1.0", "--device", "cpu"]) == 0
    pred = tmp_path / "pred"
    panel.mode.setCurrentText("Predict")
    assert panel.run.isEnabled() and not panel.encoder.isEnabled()
    panel.run.setText(str(run))
    panel.out.setText(str(pred))
    panel.cluster.setText("local:1")
    bars: list = []
    panel.start_btn.click()
    qtbot.waitUntil(lambda: panel.pbar is not None or not panel.tasks.busy, timeout=120_000)
    bars.append(panel.pbar)
    assert bars[0] is not None and bars[0] in progress._all_instances and bars[0].total == 4  # in the activity dock
    qtbot.waitUntil(lambda: not panel.tasks.busy and panel.results is not None, timeout=180_000)
    seen = panel.bar_history
    assert "cluster local:1" in panel.dashboard.text() and "dashboard http://" in panel.dashboard.text()
    assert seen[-1] == (4, 4), seen
    assert panel.status.text().startswith("4 computed"), panel.status.text()
    with open(pred / "predictions.csv", newline="") as fh:
        assert [r["slide_id"] for r in csv.DictReader(fh)] == [f"slide_{i:03d}" for i in range(4)]
    assert len(list((pred / "heatmaps").glob("*.tif"))) == 4
    viewer.close()


def test_cancel_stops_after_the_running_slide(make_napari_viewer, qtbot, cohort, tmp_path, monkeypatch) -> None:
    viewer, panel = _panel(make_napari_viewer)
    project = panel.session.create_project(str(tmp_path / "proj"))  # what the Project widget's "New" does
    assert panel.slides.text() == str(project.root)  # the open project is the default batch
    panel.slides.setText(str(cohort))
    panel.out.setText(str(tmp_path / "bags"))
    panel.patch.setValue(32)  # about 400 patches a slide: a second or so each
    panel.mpp.setValue(0.5)
    first = []
    handler = panel._on_event

    def on_event(event):
        handler(event)
        if event.result is not None and not first:
            first.append(event.done)
            panel.cancel_btn.click()  # after the first slide

    panel._on_event = on_event
    panel.start_btn.click()
    qtbot.waitUntil(lambda: not panel.tasks.busy and panel.results is not None, timeout=120_000)
    assert first == [1]
    assert panel.status.text().startswith("cancelled: "), panel.status.text()
    assert 1 <= len(panel.results) < 4 and len(list((tmp_path / "bags").glob("*.npz"))) < 4
    assert not list((tmp_path / "bags" / ".claims").glob("*.claim"))

    # a cluster spec that cannot be used: one line in the panel, no bar left behind
    from napari.utils import notifications

    panel.cluster.setText(str(tmp_path / "nowhere.yaml"))
    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_error", shown.append)
    panel.start_btn.click()
    qtbot.waitUntil(lambda: not panel.tasks.busy, timeout=30_000)
    assert len(shown) == 1 and "nowhere.yaml" in shown[0]
    assert "does not exist" in panel.status.text() and "nowhere.yaml" in panel.status.text(), panel.status.text()
    assert panel.pbar is None and panel.start_btn.isEnabled()
    viewer.close()
