"""Features imported from CLAM files in the Training widget: the encoder picker lists the open project's
``imported:NAME`` sets (from :func:`napari_wsimil.features.interop.imported_sets`), choosing one sets the
patch size and µm/px the bags were imported at, and a run started from the widget trains on those bags.
A real viewer, a real project, real CLAM ``.h5`` files written here with h5py as CLAM writes them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui
napari = pytest.importorskip("napari")
pytest.importorskip("torch")
h5py = pytest.importorskip("h5py")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_wsimil.slide.synthetic import synthesize_cohort

    return synthesize_cohort(tmp_path_factory.mktemp("cohort"), 6, seed=5, size=1024)


def _clam_files(csv_path: Path, out: Path, patch_level0: int = 256, dim: int = 8) -> Path:
    """One CLAM ``h5_files/<slide>.h5`` per slide: ``features`` (N, dim) float32 whose first column follows
    the slide's label (so the run has something to learn), ``coords`` (N, 2) level-0 x, y."""
    rng = np.random.default_rng(0)
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    labels = sorted({r["label"] for r in rows})
    xs, ys = np.meshgrid(np.arange(0, 1024, patch_level0), np.arange(0, 1024, patch_level0))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    for r in rows:
        feats = rng.normal(size=(len(coords), dim)).astype(np.float32)
        feats[:, 0] += 3.0 * labels.index(r["label"])
        path = out / "h5_files" / f"{r['slide_id']}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as h5:
            h5.create_dataset("features", data=feats)
            c = h5.create_dataset("coords", data=coords)
            c.attrs["patch_size"] = patch_level0
            c.attrs["patch_level"] = 0
    return out


def test_imported_set_in_the_picker_and_a_run_from_it(make_napari_viewer, qtbot, tmp_path, cohort):
    from napari_wsimil._qt.training_widget import TrainingWidget
    from napari_wsimil.features.interop import import_features
    from napari_wsimil.project import Project

    root = tmp_path / "proj"
    Project.create_from_csv(root, cohort).close()
    clam = _clam_files(cohort, tmp_path / "clam")
    import_features(root, [clam], "clam-test", patch_size=224, mpp=0.499)  # not a family default
    other = tmp_path / "plain"
    Project.create_from_csv(other, cohort).close()

    viewer = make_napari_viewer(show=True)
    _, pw = viewer.window.add_plugin_dock_widget("napari-wsimil", "Labelling project")
    _, tw = viewer.window.add_plugin_dock_widget("napari-wsimil", "Training and attention maps")
    assert isinstance(tw, TrainingWidget)
    picker = tw.encoder_picker
    assert not any(n.startswith("imported:") for n in picker.names())  # no project open

    pw.open_project(root)
    assert "imported:clam-test" in picker.names() and "handcrafted" in picker.names()
    tw.method.setCurrentText("clam-sb")
    tw.mpp.setValue(1.0)
    tw.patch.setValue(128)
    assert picker.set_encoder("imported:clam-test")
    # the geometry the bags were imported at (0.499 shows as 0.50); no weights for features made elsewhere
    assert tw.mpp.value() == pytest.approx(0.5) and tw.patch.value() == 224
    assert not picker.weights_edit.isEnabled() and not picker.weights_btn.isEnabled()
    assert not picker.folder_btn.isEnabled() and picker.weights() is None
    tip = picker.combo.itemData(picker.combo.findData("imported:clam-test"), 3)  # Qt.ToolTipRole
    assert str((clam / "h5_files").resolve()) in tip and "224 px patches at 0.499 µm/px" in tip
    assert "6 slides" in tip and picker.combo.toolTip() == tip
    # a method change keeps the imported geometry (another family's defaults would not fit the bags)
    tw.method.setCurrentText("pinchaud")  # segmentation: no encoder, its own 1 µm/px and 128 px
    assert not picker.isVisibleTo(tw) and (tw.mpp.value(), tw.patch.value()) == (pytest.approx(1.0), 128)
    tw.method.setCurrentText("clam-sb")
    assert (tw.mpp.value(), tw.patch.value()) == (pytest.approx(0.5), 224)

    tw.epochs.setValue(2)
    tw.device.setCurrentText("cpu")
    for name, value in (("hidden", 16), ("attn_hidden", 8)):
        tw.set_option(name, value)
    spec = tw.form.spec()
    assert spec.encoder == "imported:clam-test" and spec.weights is None
    assert (spec.patch, spec.mpp) == (224, 0.499)
    run = tw.run_name.text()
    tw.start_btn.click()
    assert tw.training
    qtbot.waitUntil(lambda: not tw.busy, timeout=60_000)
    assert "done after epoch 2" in tw.status.text(), tw.status.text()
    info = json.loads((tw.api.run_dir(run) / "run.json").read_text())
    assert info["encoder"] == "imported:clam-test" and info["weights"] is None
    assert not (root / "features" / "handcrafted").exists()  # nothing was extracted: the bags were used

    # another project has no imported sets: the entry goes, the choice falls back to an encoder
    pw.close_project()
    pw.open_project(other)
    assert not any(n.startswith("imported:") for n in picker.names())
    assert picker.encoder() == "handcrafted"
    pw.close_project()
