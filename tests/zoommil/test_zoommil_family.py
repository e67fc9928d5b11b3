"""ZoomMIL end to end on small synthetic slides: trained from the CLI with its own levels and K, predicted
reading only what it zooms into (fewer patches encoded than the finest level holds), heatmaps per level,
the zoom path in the live map, and bad input refused with a message."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("torch")

SMALL = ["--patch", "32", "--set", "levels=4,2,1", "--set", "k=3", "--set", "hidden=32", "--set", "attn_hidden=16",
         "--set", "num_samples=20", "--set", "sigma=0.05", "--device", "cpu"]


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory: pytest.TempPathFactory):
    from napari_wsimil.slide.synthetic import synthesize_cohort

    return synthesize_cohort(tmp_path_factory.mktemp("zoom"), 6, seed=5, size=2048)


@pytest.fixture(scope="module")
def trained(cohort_csv, tmp_path_factory):
    from napari_wsimil.cli import main

    run = tmp_path_factory.mktemp("zoomrun") / "run"
    assert main(["train", str(cohort_csv), "--method", "zoommil", "--out", str(run), "--epochs", "2", *SMALL]) == 0
    return run


def test_zoommil_trains_from_the_cli_with_its_levels(trained) -> None:
    from napari_wsimil.zoommil.bags import read_zoom_bag

    info = json.loads((trained / "run.json").read_text())
    state = json.loads((trained / "last.json").read_text())
    assert info["family"] == "zoommil" and info["levels"] == [4.0, 2.0, 1.0] and info["ratios"] == [2, 2]
    assert state["epoch"] == 2 and state["config"]["k"] == 3 and state["method"]["ratios"] == [2, 2]
    # the top-K's gradient has the leave-one-out baseline by default, and a loaded run keeps its settings
    from napari_wsimil.zoommil.predict import load_zoom_run

    assert state["config"]["baseline"] is True and state["config"]["zoom_on"] == "zoom"
    model = load_zoom_run(trained, device="cpu").model
    assert model.baseline is True and model.zoom_on == "zoom" and model.sigma == 0.05
    bags = sorted((p for p in (trained / "features").rglob("*.zoom.npz")), key=str) if (trained / "features").exists() \
        else []
    if not bags:  # a CSV cohort keeps its features beside the CSV
        bags = sorted(__import__("pathlib").Path(info["features_dir"]).glob("*.zoom.npz"))
    bag = read_zoom_bag(bags[0])
    assert [len(c) for c in bag.coords][1:] == [len(bag) * 4, len(bag) * 16]


def test_prediction_reads_only_what_it_zooms_into(trained, cohort_csv, tmp_path, capsys) -> None:
    from napari_wsimil.cli import main
    from napari_wsimil.infer.predictions import read_predictions

    pred = tmp_path / "pred"
    assert main(["predict", str(trained), "--cohort", str(cohort_csv), "--out", str(pred), "--device", "cpu",
                 "--ome-zarr"]) == 0
    ids, probs = read_predictions(pred / "predictions.csv")
    assert len(ids) == 6 and np.allclose(probs.sum(1), 1)
    with open(pred / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        sid = row["slide_id"]
        encoded = int(row["patches_encoded"])
        n0 = len(np.load(pred / "attention" / f"{sid}.npz")["coords"])
        # the lowest grid, then K parents × 4 children at each of two steps (fewer when a level has < K)
        assert n0 < encoded <= n0 + 3 * 4 + 3 * 4
        assert encoded < n0 * 16  # far fewer than the finest level holds
        assert float(row["seconds"]) > 0
        assert (pred / "heatmaps" / f"{sid}.tif").is_file()
        assert (pred / "heatmaps" / f"{sid}.level1.tif").is_file() and (pred / "heatmaps" / f"{sid}.level2.tif").is_file()
        for name in (sid, f"{sid}.level1", f"{sid}.level2"):  # --ome-zarr: each map also as NGFF
            assert (pred / "heatmaps" / f"{name}.ome.zarr" / ".zattrs").is_file()
    assert main(["evaluate", str(pred), "--cohort", str(cohort_csv)]) == 0
    metrics = json.loads((pred / "metrics.json").read_text())
    assert "auc" in metrics
    # localisation is scored on the zoom path's finest patches (32 µm): the lowest level's 128 µm patches are
    # never half tumour on these slides (tumour is 0.2-2 % of 1 mm of tissue), so scored there no slide had any
    loc = metrics["localisation"]
    assert loc["scored_on"] == "zoom path, finest level"
    assert loc["n_slides_with_tumour_patches"] >= 1 and loc["n_tumour_patches"] > 0
    assert loc["attention_auc"] is not None and 0.0 <= loc["attention_auc"] <= 1.0
    # predictions from before the zoom path was scored: one clear message, nothing half-written
    (pred / "zoom_localisation").rename(pred / "old")
    (pred / "metrics.json").unlink()
    assert main(["evaluate", str(pred), "--cohort", str(cohort_csv)]) == 2
    err = capsys.readouterr().err
    assert "run 'wsimil predict' again" in err and "Traceback" not in err
    assert not (pred / "metrics.json").exists()


def test_prediction_from_the_slide_equals_the_bag_path(trained, cohort_csv) -> None:
    """Reading the chosen children from the slide gives the same probabilities as the training bags."""
    from napari_wsimil.train.cohort import load_cohort
    from napari_wsimil.zoommil.predict import load_zoom_run, predict_slide
    from napari_wsimil.zoommil.zoom_path import bag_path_of

    info = json.loads((trained / "run.json").read_text())
    run = load_zoom_run(trained, device="cpu")
    item = [s for s in load_cohort(cohort_csv).slides if s.slide_id == info["train_slides"][0]][0]
    pred, path = predict_slide(run, run.encoder(), item)
    bag = next(__import__("pathlib").Path(info["features_dir"]).glob(f"{item.slide_id}.zoom.npz"))
    from_bag, probs = bag_path_of(trained, item.slide_id, bag)
    assert np.allclose(pred.probs, probs, atol=1e-4)
    for a, b in zip(path.coords, from_bag.coords):
        assert np.array_equal(a, b)


def test_evaluate_scores_what_the_zoom_path_and_its_maps_show(trained, cohort_csv) -> None:
    """The scored grid is every finest-level tissue patch under the lowest grid; the patches read at the finest
    level rank above all others, in the order of their attention, which is the order of the zoom-path boxes
    (napari) and of the finest level's heatmap; the unread rest ranks by its deepest read ancestor."""
    from napari_wsimil.train.cohort import load_cohort
    from napari_wsimil.zoommil.localisation import finest_coords
    from napari_wsimil.zoommil.predict import load_zoom_run, predict_slide
    from napari_wsimil.zoommil.zoom_path import regions

    run = load_zoom_run(trained, device="cpu")
    item = [s for s in load_cohort(cohort_csv).slides if s.label == "1"][0]
    pred, path = predict_slide(run, run.encoder(), item)
    loc = path.localisation
    assert loc.size_level0 == pytest.approx(path.size_level0(2)) and np.allclose(loc.probs, pred.probs)
    every = {tuple(c) for c in finest_coords(path)}
    assert len(every) == len(path.coords[0]) * 16
    scored = {tuple(c): float(s) for c, s in zip(loc.coords, loc.attention)}
    assert set(scored) <= every and len(scored) > len(path.coords[2])
    read = [(tuple(c), float(a)) for c, a in zip(path.coords[2], path.attention[2]) if tuple(c) in scored]
    assert read and min(scored[c] for c, _ in read) >= 2.0
    assert max(s for c, s in scored.items() if c not in dict(read)) < 2.0
    by_score = sorted(read, key=lambda r: scored[r[0]])
    assert [a for _, a in by_score] == sorted(a for _, a in read)
    boxes = regions(path)
    top = boxes[(boxes[:, 4] == 2) & (boxes[:, 6] == 1)]
    box_value = {(int(b[0]), int(b[1])): b[5] for b in top}
    assert [box_value[c] for c, _ in by_score] == sorted(box_value[c] for c, _ in read)


def test_live_map_carries_the_zoom_path(trained, cohort_csv) -> None:
    from napari_wsimil.train.registry import family_of

    info = json.loads((trained / "run.json").read_text())
    sid = info["train_slides"][0]
    ev = family_of("zoommil").slide_map(trained, sid, cohort_csv)
    assert ev.heatmap.ndim == 2 and ev.regions is not None
    levels, roles = ev.regions[:, 4].astype(int), ev.regions[:, 6].astype(int)
    assert set(levels[roles == 0]) == {0, 1} and set(levels[roles == 1]) == {1, 2}
    assert ((ev.regions[:, 2] > ev.regions[:, 0]) & (ev.regions[:, 3] > ev.regions[:, 1])).all()


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "k=0"], "K, the patches ZoomMIL zooms into"),
    (["--set", "levels=2,4,1"], "low to high magnification"),
    (["--set", "levels=64,32,16"], "too small"),
])
def test_bad_zoom_settings_are_one_clear_error(cohort_csv, tmp_path, capsys, extra, message) -> None:
    from napari_wsimil.cli import main

    args = ["train", str(cohort_csv), "--method", "zoommil", "--out", str(tmp_path / "run"), "--epochs", "1",
            *SMALL, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "last.json").exists()


def test_zoommil_resumes_like_every_method(cohort_csv, tmp_path) -> None:
    """The same checkpoints and resume as the other families: a run continued with --resume goes on from its
    last epoch; changed levels are refused (the bags would not match the model)."""
    from napari_wsimil.cli import main

    run = tmp_path / "run"
    base = ["train", str(cohort_csv), "--method", "zoommil", "--out", str(run), *SMALL]
    assert main([*base, "--epochs", "1"]) == 0
    assert main([*base, "--epochs", "2", "--resume"]) == 0
    state = json.loads((run / "last.json").read_text())
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    other = [a if a != "levels=4,2,1" else "levels=8,4,1" for a in base]
    assert main([*other, "--epochs", "3", "--resume"]) == 2


def test_zoommil_in_the_interactive_session(cohort_csv, tmp_path) -> None:
    """Live maps with the zoom path while training in a project, suggestions and pseudo-labels from the lowest
    level's attention, and "retrain with corrections" continuing the run (ZoomMIL learns from slide labels)."""
    from napari_wsimil.project import Project
    from napari_wsimil.train.events import MapEvent
    from napari_wsimil.workflow.session import InteractiveSession

    config = {"levels": "4,2,1", "k": 3, "hidden": 32, "attn_hidden": 16, "num_samples": 20}
    with Project.create_from_csv(tmp_path / "proj", cohort_csv) as project:
        session = InteractiveSession(project)
        sid = project.slide_ids[0]
        spec = session.spec("zoommil", "zoom", epochs=1, device="cpu", mpp=4.0, patch=32, config=config)
        maps = [e for e in session.train(spec, watch=[sid]) if isinstance(e, MapEvent)]
        assert maps and all(m.regions is not None and len(m.regions) for m in maps)
        assert len(session.suggestions("zoom", sid, k=2)) >= 1
        pseudo = session.pseudo_labels("zoom", sid)
        assert pseudo.shape == tuple(project.label_geometry(sid).shape)
        again = session.retrain_spec("zoom", extra_epochs=1, device="cpu")
        assert again.resume and again.method == "zoommil" and again.epochs == 2
        assert [e.epoch for e in session.train(again) if getattr(e, "kind", "") == "done"] == [2]


def test_the_kept_checkpoint_is_chosen_by_weighted_f1_as_in_the_paper(trained) -> None:
    """The reference keeps the model with the best validation weighted F1 (its ModelSaver) and steps the
    learning rate on the validation loss: ``evaluate`` gives the engine "select" = 1 − weighted F1 (the loss
    only breaking ties), the loss as "bag"; ``select_by=loss`` is CLAM's rule; anything else is refused."""
    from pathlib import Path

    from napari_wsimil.infer.metrics import weighted_f1
    from napari_wsimil.train.engine import TrainingError
    from napari_wsimil.zoommil.configs import ZoomMILConfig
    from napari_wsimil.zoommil.method import ZoomMILMethod

    info = json.loads((trained / "run.json").read_text())
    bags = sorted(Path(info["features_dir"]).glob("*.zoom.npz")) if info.get("features_dir") else \
        sorted((trained / "features").rglob("*.zoom.npz"))
    labels = [i % 2 for i in range(len(bags))]
    cfg = dict(levels="4,2,1", k=3, hidden=32, attn_hidden=16, num_samples=20, sigma=0.05)
    method = ZoomMILMethod(ZoomMILConfig(**cfg), bags[:4], labels[:4], bags[4:] + bags[:2], labels[4:] + labels[:2])
    method.check()
    model = method.build_model()
    losses, metrics = method.evaluate(model, "cpu")
    val_labels = np.asarray(labels[4:] + labels[:2])
    probs = []
    for path in method.val_files:
        probs.append(np.asarray(method._forward(model.eval(), path, "cpu").logits.detach()))
    wf1 = weighted_f1(np.argmax(probs, 1), val_labels, 2)
    assert metrics["weighted_f1"] == pytest.approx(wf1)
    assert losses["select"] == pytest.approx(1 - wf1, abs=1e-4) and losses["select"] >= 1 - wf1
    assert "bag" in losses

    by_loss = ZoomMILMethod(ZoomMILConfig(**cfg, select_by="loss"), bags[:4], labels[:4], bags[4:], labels[4:])
    by_loss.check()
    assert "select" not in by_loss.evaluate(by_loss.build_model(), "cpu")[0]
    with pytest.raises(TrainingError, match="select_by must be one of"):
        ZoomMILMethod(ZoomMILConfig(**cfg, select_by="auc"), bags[:4], labels[:4]).check()
