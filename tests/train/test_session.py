"""The interactive loop without Qt: train on a project with live maps, pseudo-labels, corrections, retrain."""

from __future__ import annotations


import numpy as np
import pytest

from napari_wsimil.infer.pseudo_labels import (PatchScores, binary_entropy, corrections, pseudo_label_image,
                                               suggest_regions)


def test_pseudo_label_image_and_corrections() -> None:
    coords = np.array([[0, 0], [64, 0], [128, 0], [0, 64]])
    s = PatchScores(coords, 64.0, np.array([0.9, 0.5, 0.1, 0.75]), np.array([0.2, 0.8]), "test")
    img = pseudo_label_image(s, (32, 64), 4.0, tumour_id=1, normal_id=2)
    assert (img[:16, :16] == 1).all() and (img[:16, 16:32] == 0).all() and (img[:16, 32:48] == 2).all()
    assert (img[16:32, :16] == 1).all() and (img[:, 48:] == 0).all()
    edited = img.copy()
    edited[0:4, 0:4] = 2  # the user says: not tumour here
    fix = corrections(img, edited)
    assert (fix[0:4, 0:4] == 2).all() and fix.sum() == 2 * 16
    with pytest.raises(ValueError):
        corrections(img, edited[:10])


def test_suggestions_are_the_uncertain_places_spread_out() -> None:
    xs = np.arange(10) * 100
    coords = np.stack([xs, np.zeros(10)], 1).astype(int)
    p = np.array([0.01, 0.5, 0.52, 0.99, 0.02, 0.45, 0.98, 0.97, 0.03, 0.6])
    sug = suggest_regions(PatchScores(coords, 100.0, p, np.array([0.5, 0.5]), "t"), k=3, min_distance_patches=1.5)
    assert len(sug) == 3
    # 0.5 at x=100 first; 0.52 at x=200 is suppressed (within 150 px); then 0.45 (x=500), 0.6 (x=900)
    assert sug[:, 0].tolist() == [150.0, 550.0, 950.0]
    assert sug[0, 2] == pytest.approx(binary_entropy(np.array([0.5]))[0])


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    from napari_wsimil.project import Project
    from napari_wsimil.slide.synthetic import synthesize_cohort

    base = tmp_path_factory.mktemp("session")
    csv_path = synthesize_cohort(base / "cohort", 6, seed=3, size=2048)
    p = Project.create_from_csv(base / "proj", csv_path)
    yield p
    p.close()


def test_train_with_live_maps_then_correct_and_retrain(project) -> None:
    from napari_wsimil.train.events import MapEvent
    from napari_wsimil.workflow.session import InteractiveSession, method_names, method_options

    assert {"abmil", "clam-sb", "clam-mb", "ms-clam"} <= set(method_names())
    opts = {name: (default, doc) for name, default, _t, doc in method_options("clam-sb")}
    assert opts["k_sample"][0] == 8 and opts["k_sample"][1] and "epochs" not in opts

    session = InteractiveSession(project)
    sid = project.slide_ids[0]
    spec = session.spec("clam-sb", "first", epochs=3, device="cpu", mpp=1.0, patch=128,
                        config={"hidden": 32, "attn_hidden": 16, "lr": 1e-3})
    events = list(session.train(spec, watch=[sid]))
    maps = [e for e in events if isinstance(e, MapEvent)]
    kinds = [e.kind for e in events]
    assert kinds.count("checkpoint") == 3 and kinds[-1] == "map" and "step" in kinds
    assert [m.epoch for m in maps] == [1, 2, 3, 3]  # one per checkpoint, then the best model's
    m = maps[-1]
    w, h = project.record(sid).dimensions
    assert m.heatmap.shape == (int(np.ceil(h / m.downsample)), int(np.ceil(w / m.downsample)))
    assert m.heatmap.dtype == np.float32 and 0 <= m.heatmap.min() and m.heatmap.max() <= 1 and m.heatmap.max() > 0
    runs = session.runs()
    assert [r.name for r in runs] == ["first"] and runs[0].method == "clam-sb" and runs[0].epoch == 3
    assert runs[0].finished and set(runs[0].val_metrics) >= {"accuracy", "auc"}

    # pseudo-labels at the label geometry, corrections saved as paint, MS-CLAM retrains on them
    geo = project.label_geometry(sid)
    pseudo = session.pseudo_labels("first", sid)
    assert pseudo.shape == geo.shape and set(np.unique(pseudo)) <= {0, 1, 2}
    tumour, normal = session.class_ids()
    edited = pseudo.copy()
    gh, gw = geo.shape
    edited[gh // 4:3 * gh // 4, gw // 4:3 * gw // 4] = normal  # the centre of the slide: tissue, several patches
    edited[:10, :10] = tumour
    n = session.save_corrections(sid, pseudo, edited)
    assert n == int((edited != pseudo).sum()) and n > 0
    painted = project.pixel_labels(sid)
    assert (painted[gh // 4:3 * gh // 4, gw // 4:3 * gw // 4] == normal).all() and (painted[:10, :10] == tumour).all()
    # untouched pseudo-labels are not saved as paint
    untouched = (edited == pseudo)
    assert (painted[untouched] == 0).all()
    # a second look keeps the paint
    again = session.pseudo_labels("first", sid)
    assert (again[gh // 4:3 * gh // 4, gw // 4:3 * gw // 4] == normal).all()

    retrain = session.retrain_spec("first", extra_epochs=2, device="cpu")
    assert retrain.method == "ms-clam" and retrain.out.name == "first-corrected" and not retrain.resume
    assert retrain.config["hidden"] == 32 and retrain.config["attn_hidden"] == 16 and retrain.lr == 1e-3
    events = list(session.train(retrain, watch=[sid]))
    assert any(isinstance(e, MapEvent) for e in events)
    import json

    info = json.loads((retrain.out / "run.json").read_text())
    # the corrected slide's paint became tile labels (it is a training slide: no test split, seeded val split)
    assert sid in info["train_slides"] and sid in info["tile_labelled_slides"]
    # and continuing it resumes with more epochs
    more = session.retrain_spec("first-corrected", extra_epochs=1, device="cpu")
    assert more.resume and more.epochs == 3
    sug = session.suggestions("first", sid, k=4)
    assert 1 <= len(sug) <= 4 and (sug[:, 0] <= w).all() and (sug[:, 1] <= h).all()


def test_bad_run_names_are_refused(project) -> None:
    from napari_wsimil.errors import WsimilError
    from napari_wsimil.workflow.session import InteractiveSession

    with pytest.raises(WsimilError, match="run name"):
        InteractiveSession(project).spec("clam-sb", "../escape")


def test_training_in_a_child_process_streams_events_and_errors(project, tmp_path) -> None:
    """What the widget runs: the same events from a child process; a bad cohort's error arrives as the
    same readable WsimilError; closing stops the child."""
    import csv

    from napari_wsimil.errors import WsimilError
    from napari_wsimil.train.events import MapEvent
    from napari_wsimil.train.run import RunSpec
    from napari_wsimil.workflow.session import InteractiveSession

    session = InteractiveSession(project)
    sid = project.slide_ids[0]
    spec = session.spec("abmil", "child", epochs=2, device="cpu", mpp=1.0, patch=128,
                        config={"hidden": 32, "attn_hidden": 16})
    lines: list[str] = []
    events = list(session.train_process(spec, watch=[sid], report=lines.append))
    assert [e.kind for e in events].count("checkpoint") == 2 and isinstance(events[-1], MapEvent)
    assert any(line.startswith("features:") for line in lines)

    one = tmp_path / "one.csv"
    with open(one, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "label"])
        w.writerow([sid, str(project.slide_path(sid)), "1"])
    with pytest.raises(WsimilError, match="only class"):
        list(session.train_process(RunSpec(one, "abmil", tmp_path / "run", epochs=1, device="cpu")))

    handle = session.train_process(session.spec("abmil", "closed", epochs=500, device="cpu", mpp=1.0, patch=128))
    handle.close()
    assert not handle._proc.is_alive()
    assert list(handle) == []


def test_encoder_choice_is_checked_and_recorded(project, tmp_path, monkeypatch) -> None:
    """What the widget's encoder row hands the session: refused choices say why before anything starts;
    a chosen encoder and its weights (kept absolute) are what run.json records."""
    import json

    from napari_wsimil.errors import WsimilError
    from napari_wsimil.features import encoders
    from napari_wsimil.features.encoders import Encoder, EncoderSpec
    from napari_wsimil.workflow.session import InteractiveSession, encoder_problem, method_uses_encoder

    assert method_uses_encoder("clam-sb") and not method_uses_encoder("pinchaud")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not read by this test")
    hub = tmp_path / "hub"
    hub.mkdir()
    assert encoder_problem("handcrafted") is None and encoder_problem("resnet18") is None
    assert encoder_problem("resnet18", str(weights)) is None
    assert "takes no weights" in encoder_problem("handcrafted", str(weights))
    assert "does not exist" in encoder_problem("resnet18", str(tmp_path / "missing.pth"))
    assert "is a folder" in encoder_problem("resnet18", str(hub))
    assert "needs a weights folder" in encoder_problem("timm")
    assert "config.json" in encoder_problem("timm", str(hub))
    (hub / "config.json").write_text("{}")
    assert encoder_problem("timm", str(hub)) is None
    assert encoder_problem("timm:convnext_tiny") is None  # any timm architecture, listed or not
    assert "no encoder named" in encoder_problem("no-such-encoder")

    class Brightness(Encoder):
        name, version, dim = "test-brightness", "1", 1

        def __init__(self, weights=None):
            self.weights = weights

        def encode(self, patches):
            return patches.reshape(len(patches), -1).mean(1, keepdims=True).astype(np.float32)

    monkeypatch.setitem(encoders._REGISTRY, "test-brightness", EncoderSpec(
        "test-brightness", lambda weights=None, device="auto": Brightness(weights), "brightness, 1-d", True))
    session = InteractiveSession(project)
    with pytest.raises(WsimilError, match="does not exist"):
        session.spec("abmil", "nope", encoder="test-brightness", weights=str(tmp_path / "missing.pth"))
    assert session.spec("abmil", "empty", encoder="test-brightness", weights="").weights is None
    monkeypatch.chdir(tmp_path)
    spec = session.spec("abmil", "brightness", epochs=1, device="cpu", mpp=1.0, patch=128,
                        encoder="test-brightness", weights="w.pth")
    assert spec.encoder == "test-brightness" and spec.weights == str(weights.resolve())
    list(session.train(spec))
    info = json.loads((spec.out / "run.json").read_text())
    assert info["encoder"] == "test-brightness" and info["weights"] == str(weights.resolve())
    again = session.resume_spec("brightness", extra_epochs=1)  # a resumed run reads them back
    assert again.encoder == "test-brightness" and again.weights == info["weights"] and again.resume
