"""Segmentation methods end to end on small real (synthetic) slides: sampling, mapping, the mapper thread,
training, resume, prediction, evaluation, pseudo-labels and the errors a user can run into."""

from __future__ import annotations

import csv
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_wsimil.cli import main
from napari_wsimil.project.cohort_csv import write_rows

SMALL = ["--mpp", "4", "--patch", "32", "--set", "width=8", "--set", "depth=3", "--set", "patches_per_epoch=32",
         "--set", "batch_size=8", "--set", "map_tile=128", "--set", "val_patches=4", "--set", "read_workers=2",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_wsimil.slide.synthetic import synthesize_cohort

    return synthesize_cohort(tmp_path_factory.mktemp("segcohort"), 6, seed=5, size=2048, workers=2)


def _rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


def _painted_cohort(cohort: Path, out: Path) -> Path:
    """The cohort with a pixel_labels mask (1 tumour, 2 normal) on its first malignant slide, made from
    the ground truth: what a pathologist's painting of one slide amounts to."""
    import tifffile

    rows = _rows(cohort)
    for r in rows:
        r["path"] = str(cohort.parent / r["path"])
        r["gt_mask"] = str(cohort.parent / r["gt_mask"])
    first = next(r for r in rows if r["label"] == "1")
    gt = tifffile.imread(first["gt_mask"])
    paint = np.where(gt > 0, 1, 2).astype(np.uint8)
    tifffile.imwrite(out / "paint.tif", paint)
    first["pixel_labels"] = str(out / "paint.tif")
    first["pixel_labels_downsample"] = first["gt_downsample"]
    return write_rows(rows, out / "painted.csv")


# ---------------------------------------------------------------------------------------------- sampling

def test_slide_scheduler_balances_classes_and_seeks_benign_errors() -> None:
    from napari_wsimil.seg.sampling import SlideScheduler

    sch = SlideScheduler([1, 1, 0, 0, 0], revisit_epochs=10**6)
    sch.last[:] = 0  # nobody overdue
    picks = sch.draw(4000, 1, np.random.default_rng(0), [0, 0, 1.0, 1.0, 8.0])
    assert abs(np.isin(picks, [0, 1]).mean() - 0.5) < 0.01
    benign = picks[np.isin(picks, [2, 3, 4])]
    assert abs((benign == 4).mean() - 0.8) < 0.03  # drawn in proportion to ΣQ


def test_slide_scheduler_draws_overdue_slides_first() -> None:
    from napari_wsimil.seg.sampling import SlideScheduler

    sch = SlideScheduler([1, 0, 0, 0], revisit_epochs=2)
    rng = np.random.default_rng(1)
    first = sch.draw(4, 0, rng, [1.0, 1e-9, 1e-9, 100.0])
    assert sorted(first) == [0, 1, 2, 3]  # everyone is overdue at the start, even slides with ΣQ ~ 0
    sch.draw(50, 1, rng, [1.0, 1e-9, 1e-9, 100.0])
    later = sch.draw(4, 3, rng, [1.0, 1e-9, 1e-9, 100.0])
    assert {1, 2} <= set(later.tolist())  # the rarely drawn benign slides come back within N epochs


def test_draw_centres_follow_q_alpha() -> None:
    from napari_wsimil.seg.maps import SamplingGrid
    from napari_wsimil.seg.sampling import draw_centres

    w = np.ones((4, 4))
    w[2, 3] = 9.0
    grid = SamplingGrid(w, w, np.ones((4, 4)), block=16, mpp=1.0, epoch=1)
    c = draw_centres(grid, 5000, np.random.default_rng(0))
    inside = (c[:, 0] >= 48) & (c[:, 0] < 64) & (c[:, 1] >= 32) & (c[:, 1] < 48)
    assert abs(inside.mean() - 9 / 24) < 0.03


# ---------------------------------------------------------------------------------------------- mapping

def _slides(cohort: Path, **kw):
    from napari_wsimil.seg.data import open_seg_slides
    from napari_wsimil.train.cohort import load_cohort

    c = load_cohort(cohort)
    return open_seg_slides(c, c.slides, ["0", "1"], **kw)


def test_tiled_map_has_no_seams_and_zero_outside_tissue(cohort: Path, tmp_path: Path) -> None:
    from napari_wsimil.io.raster_store import LabelStore
    from napari_wsimil.seg.maps import compute_map
    from napari_wsimil.seg.nets import SegUNet, receptive_margin

    slide = _slides(cohort, with_labels=False)[0]
    torch.manual_seed(0)
    net = SegUNet(width=8, depth=3).eval()
    m = receptive_margin(net)
    a = compute_map(net, slide, 4.0, tile=64, margin=m, out=tmp_path / "a.zarr", block=16)
    b = compute_map(net, slide, 4.0, tile=256, margin=m, out=tmp_path / "b.zarr", block=16)
    ma, mb = LabelStore.open(tmp_path / "a.zarr").read(), LabelStore.open(tmp_path / "b.zarr").read()
    assert ma.shape == slide.map_shape(4.0) == (256, 256)
    assert np.abs(ma.astype(int) - mb.astype(int)).max() <= 1  # uint8 rounding only: tiles line up
    assert np.allclose(a.weights, b.weights, rtol=1e-3, atol=1e-3)
    from napari_wsimil.seg.maps import tissue_tile

    tissue = tissue_tile(slide, 4.0, 0, 0, 256, 256)
    assert ma[~tissue].max() == 0 and ma[tissue].max() > 0
    slide.close()


@pytest.mark.parametrize("sync", [False, True])
def test_mapper_crash_stops_training_with_its_error(cohort: Path, tmp_path: Path, monkeypatch, sync) -> None:
    """Whether the trainer waits within a budget or for every slide (``sync_maps``), it stops with the
    mapper's error instead of waiting for maps that will never come."""
    import napari_wsimil.seg.mapper as mapper_mod
    from napari_wsimil.seg.mapper import MapperError
    from napari_wsimil.train.engine import train
    from napari_wsimil.train.run import RunSpec
    from napari_wsimil.workflow.live import prepare_run

    def broken(*a, **k):
        raise RuntimeError("disk full while writing the map")

    monkeypatch.setattr(mapper_mod, "compute_map", broken)
    spec = RunSpec(source=cohort, method="pinchaud", out=tmp_path / "run", epochs=4, mpp=4.0, patch=32,
                      device="cpu", config=dict(width=8, depth=3, patches_per_epoch=16, batch_size=8, map_tile=128,
                                                map_staleness=0, val_patches=2, read_workers=1, sync_maps=sync))
    prepared = prepare_run(spec)
    result: dict = {}

    def run() -> None:
        try:
            for _ in train(prepared.method, spec.out):
                pass
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert not t.is_alive(), "the trainer hung after the mapper crashed"
    assert isinstance(result.get("error"), MapperError)
    assert "disk full while writing the map" in str(result["error"])
    assert not any(th.name == "wsimil-mapper" and th.is_alive() for th in threading.enumerate())


@pytest.mark.parametrize("budget", [0.05, 1.0])
def test_waiting_for_maps_stays_within_its_budget(cohort: Path, tmp_path: Path, monkeypatch, budget) -> None:
    """A mapper far slower than the trainer: with the default budget the trainer goes on with older maps or
    none (and says so), with an unlimited one it waits for each fresh map."""
    import time

    import napari_wsimil.seg.mapper as mapper_mod
    from napari_wsimil.train.engine import train
    from napari_wsimil.train.run import RunSpec
    from napari_wsimil.workflow.live import prepare_run

    real = mapper_mod.compute_map

    def slow(*a, **k):
        time.sleep(0.5)
        return real(*a, **k)

    monkeypatch.setattr(mapper_mod, "compute_map", slow)
    spec = RunSpec(source=cohort, method="pinchaud", out=tmp_path / "run", epochs=8, mpp=4.0, patch=32,
                      device="cpu", config=dict(width=8, depth=3, patches_per_epoch=16, batch_size=8, map_tile=128,
                                                map_staleness=0, max_map_wait=budget, val_patches=2,
                                                read_workers=1, min_epochs=8))
    method = prepare_run(spec).method
    metrics = [ev.metrics for ev in train(method, spec.out) if ev.kind == "validation"]
    assert len(metrics) == 8 and all("map_wait_fraction" in m and "map_unmapped" in m for m in metrics)
    if budget < 1:
        assert method.wait_fraction() <= budget + 0.03
        # The price: patches drawn from older maps, or from slides with no map yet. Which of the two depends
        # on how fast this machine trains (on a slow one all 8 epochs can end before the first map does).
        stale = [m for m in metrics if m["map_unmapped"] > 0 or m.get("map_age", 0) >= 1]
        assert len(stale) >= 4, metrics
    else:
        assert method.wait_fraction() > 0.3  # each epoch waited half a second or more for its map


def test_sync_maps_makes_runs_reproducible_whatever_the_mapper_timing(cohort: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """Two runs with the same seed, one with a mapper slowed down. With ``sync_maps`` every epoch samples
    only from maps of the previous epoch's weights (map age 0, no slide unmapped) however slow the mapper,
    which is what makes the sampled patches, and so the weights, a function of the seed. (Without it, the
    slowed run samples from older maps or none: map_unmapped 1.0 for 3 of 4 epochs when this was written.)"""
    import time

    import napari_wsimil.seg.mapper as mapper_mod
    from napari_wsimil.train.engine import train
    from napari_wsimil.train.run import RunSpec
    from napari_wsimil.workflow.live import prepare_run

    real = mapper_mod.compute_map
    delay = {"s": 0.0}

    def slowed(*a, **k):
        time.sleep(delay["s"])
        return real(*a, **k)

    monkeypatch.setattr(mapper_mod, "compute_map", slowed)
    finals, waits = [], []
    for run, delay["s"] in (("a", 0.0), ("b", 0.3)):
        spec = RunSpec(source=cohort, method="pinchaud", out=tmp_path / run, epochs=4, mpp=4.0, patch=32,
                          device="cpu", config=dict(width=8, depth=3, patches_per_epoch=16, batch_size=8,
                                                    map_tile=128, sync_maps=True, val_patches=2, read_workers=1,
                                                    min_epochs=4))
        method = prepare_run(spec).method
        metrics = [ev.metrics for ev in train(method, spec.out) if ev.kind == "validation"]
        assert len(metrics) == 4 and all(m["map_age"] == 0.0 for m in metrics)
        assert all(m["map_unmapped"] == 0.0 for m in metrics)  # every slide mapped before every epoch
        finals.append({k: v.clone() for k, v in method.model.state_dict().items()})
        waits.append(method.wait_fraction())
        assert method.mapper.threads == (os.cpu_count() or 1)  # the trainer waits: the mapper gets every core
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    assert min(waits) > 0.0  # the price: the trainer waited for the maps


# ---------------------------------------------------------------------------------------------- CLI

def test_pinchaud_train_resume_predict_evaluate(cohort: Path, tmp_path: Path) -> None:
    run, pred = tmp_path / "run", tmp_path / "pred"
    assert main(["train", str(cohort), "--method", "pinchaud", "--out", str(run), "--epochs", "2", *SMALL]) == 0
    state = json.loads((run / "last.json").read_text())
    assert state["epoch"] == 2 and state["method"]["kind"] == "segmentation"
    assert list((run / "maps").glob("*.zarr"))  # the mapping worker published maps while training
    assert main(["train", str(cohort), "--method", "pinchaud", "--out", str(run), "--epochs", "3", "--resume",
                 *SMALL]) == 0
    assert json.loads((run / "last.json").read_text())["epoch"] == 3
    # the operating threshold was set on benign slides with the best weights; 'wsimil calibrate' sets it again
    trained = json.loads((run / "operating_point.json").read_text())
    assert main(["calibrate", str(run), "--operating-fpr", "0.5", "--device", "cpu"]) == 0
    loose = json.loads((run / "operating_point.json").read_text())
    assert loose["threshold"] == 0.5 or loose["threshold"] <= trained["threshold"]
    assert main(["calibrate", str(run), "--device", "cpu"]) == 0
    point = json.loads((run / "operating_point.json").read_text())
    assert point == trained  # the same weights, slides and rate give the same operating point
    from napari_wsimil.seg.operating_point import read_operating_point

    assert read_operating_point(run) == point
    best = (run / "best.safetensors").read_bytes()
    (run / "best.safetensors").write_bytes(best + b" ")  # other weights (as after more epochs): not theirs
    assert read_operating_point(run) is None
    (run / "best.safetensors").write_bytes(best)
    labels = {r["slide_id"]: r["label"] for r in _rows(cohort)}
    assert point["slides"] and all(labels[s] == "0" for s in point["slides"])
    assert 0.5 <= point["threshold"] < 1 and point["benign_fpr"] <= point["operating_fpr"] == 0.001
    assert point["rule"] == "benign-fpr" and point["operating_rule"] == "auto"  # no painted validation pixel
    assert point["benign_fpr"] <= point["benign_fpr_at_0.5"]
    assert main(["predict", str(run), "--cohort", str(cohort), "--out", str(pred), "--device", "cpu",
                 "--masks", "--ome-zarr"]) == 0
    rows = _rows(pred / "predictions.csv")
    # masks and outlines cut at the operating threshold, pixel for pixel the stored map's levels
    import tifffile

    from napari_wsimil.project.annotations import read_geojson
    from napari_wsimil.seg.operating_point import threshold_level

    for r in rows:
        sid = r["slide_id"]
        stored = tifffile.imread(pred / "maps" / f"{sid}.tif", level=0)
        mask = tifffile.imread(pred / "masks" / f"{sid}.ome.tif", level=0)[:stored.shape[0], :stored.shape[1]]
        assert np.array_equal(mask, (stored >= threshold_level(point["threshold"])).astype(np.uint8))
        from napari_wsimil.io.ngff import read_ngff_levels  # --ome-zarr: the same map as OME-Zarr

        ngff, attrs = read_ngff_levels(pred / "maps" / f"{sid}.ome.zarr")
        assert np.array_equal(ngff[0][:], stored) and attrs["wsimil"]["slide_id"] == sid
        regions = read_geojson(pred / "masks" / f"{sid}.geojson")
        assert all(a.class_name == "Tumor" for a in regions) and (len(regions) > 0) == bool(mask.any())
    assert len(rows) == 6 and all(abs(float(r["prob_0"]) + float(r["prob_1"]) - 1) < 1e-9 for r in rows)
    assert json.loads((pred / "prediction.json").read_text())["threshold"] == point["threshold"]
    assert main(["evaluate", str(pred), "--cohort", str(cohort)]) == 0
    metrics = json.loads((pred / "metrics.json").read_text())
    seg = metrics["segmentation"]
    assert seg["n_slides_with_truth"] == 6 and seg["n_malignant_with_truth"] >= 1
    assert 0.0 <= (seg["dice"] or 0.0) <= 1.0 and "froc" in seg
    assert seg["threshold"] == point["threshold"]
    assert main(["evaluate", str(pred), "--cohort", str(cohort), "--threshold", "0.5"]) == 0
    assert json.loads((pred / "metrics.json").read_text())["segmentation"]["threshold"] == 0.5
    # the map TIFF opens in napari-wsimil's reader, aligned with the slide (µm/px recorded)
    from napari_wsimil.layers import heatmap_layer_data

    data, kwargs, kind = heatmap_layer_data(pred / "maps" / f"{rows[0]['slide_id']}.tif")
    assert kind == "image" and data[0].shape == (256, 256)
    assert kwargs["metadata"]["wsimil"]["mpp"] == pytest.approx(4.0)


@pytest.mark.parametrize("setting, message", [("checkpoint_by=best", "checkpoint_by is 'auto' or 'loss'"),
                                              ("max_map_wait=5", "max_map_wait is a share"),
                                              ("context=-2", "context is -1"),
                                              ("operating_fpr=1", "operating_fpr is a share")])
def test_bad_new_settings_are_refused_before_training(cohort: Path, tmp_path: Path, capsys, setting, message) -> None:
    run = tmp_path / "run"
    assert main(["train", str(cohort), "--method", "pinchaud", "--out", str(run), "--epochs", "1", *SMALL,
                 "--set", setting]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()  # the refused run leaves no empty folder behind


def test_a_threshold_that_cannot_be_set_leaves_the_trained_run_whole(cohort: Path, tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:
    """A slide that fails while the operating threshold is set (simulated: the mapping raises) does not fail the
    finished training: its weights stay, the message says why, and no stale operating point is left."""
    from napari_wsimil.seg import operating_point

    run = tmp_path / "run"
    run.mkdir()
    (run / "operating_point.json").write_text('{"threshold": 0.9}')  # from an earlier training of this folder

    def broken(*_a, **_k):
        raise OSError("slide_002.tiff: read error")

    monkeypatch.setattr(operating_point, "benign_histogram", broken)
    assert main(["train", str(cohort), "--method", "pinchaud", "--out", str(run), "--epochs", "1", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "no operating threshold (slide_002.tiff: read error)" in out and "wsimil calibrate" in out
    assert (run / "best.safetensors").is_file() and not (run / "operating_point.json").exists()
    monkeypatch.undo()
    assert main(["train", str(cohort), "--method", "pinchaud", "--out", str(tmp_path / "plain"), "--epochs", "1",
                 *SMALL, "--set", "operating_fpr=0"]) == 0
    assert not (tmp_path / "plain" / "operating_point.json").exists()


def test_tumour_masks_and_outlines_from_a_map(cohort: Path, tmp_path: Path) -> None:
    """A hand-made map on a real slide's geometry: a disc at p 0.99 inside a ring at 0.7, one lone pixel at
    0.95. Cut at 0.9, the OME-TIFF is the disc and the pixel; the outlines are their polygons in level-0 px;
    outlines from a coarser grid still keep the lone pixel."""
    import tifffile
    from shapely.geometry import Point

    from napari_wsimil.project.annotations import read_geojson
    from napari_wsimil.seg.maps import open_map
    from napari_wsimil.seg.masks import tumour_grid, write_tumour_mask, write_tumour_outlines

    slide = _slides(cohort, with_labels=False)[0]
    h, w = slide.map_shape(4.0)
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - 100, xx - 80)
    p = np.where(r < 20, 0.99, np.where(r < 30, 0.7, 0.2))
    p[200, 200] = 0.95
    store = open_map(tmp_path / "m.zarr", slide, 4.0)
    store.array[...] = np.round(p * 255).astype(np.uint8)
    truth = (p >= 0.9).astype(np.uint8)

    write_tumour_mask(tmp_path / "m.zarr", tmp_path / "m.ome.tif", slide, 4.0, 0.9)
    with tifffile.TiffFile(tmp_path / "m.ome.tif") as tf:
        assert np.array_equal(tf.series[0].levels[0].asarray()[:h, :w], truth)
        assert tf.is_ome and 'PhysicalSizeX="4.0"' in tf.ome_metadata
    _, n = write_tumour_outlines(tmp_path / "m.zarr", tmp_path / "m.geojson", slide, 4.0, 0.9)
    regions = read_geojson(tmp_path / "m.geojson")
    ds = slide.downsample(4.0)
    assert n == len(regions) == 2
    disc = max(regions, key=lambda a: a.geometry.area)
    assert disc.geometry.area == pytest.approx(truth[:150, :150].sum() * ds * ds, rel=0.05)
    assert disc.geometry.contains(Point(80.5 * ds, 100.5 * ds))
    coarse, cds = tumour_grid(tmp_path / "m.zarr", ds, 0.9, max_side=64)
    assert coarse.shape == (64, 64) and cds == 4 * ds and coarse[50, 50] and coarse.sum() > 1
    slide.close()


def test_calibrate_names_what_is_not_a_segmentation_run(tmp_path: Path, capsys) -> None:
    assert main(["calibrate", str(tmp_path)]) == 2
    assert "not a segmentation run" in capsys.readouterr().err


def test_hybrid_and_confkd_need_paint(cohort: Path, tmp_path: Path, capsys) -> None:
    for method in ("hybrid", "confkd"):
        assert main(["train", str(cohort), "--method", method, "--out", str(tmp_path / method), "--epochs", "1",
                     *SMALL]) == 2
        err = capsys.readouterr().err
        assert "painted pixels" in err and "pinchaud" in err


def test_hybrid_rounds_use_pseudo_labels_and_keep_the_best_round(cohort: Path, tmp_path: Path) -> None:
    from napari_wsimil.train.engine import train
    from napari_wsimil.train.run import RunSpec
    from napari_wsimil.workflow.live import prepare_run

    painted = _painted_cohort(cohort, tmp_path)
    spec = RunSpec(source=painted, method="hybrid", out=tmp_path / "run", epochs=4, mpp=4.0, patch=32,
                      device="cpu", config=dict(width=8, depth=3, patches_per_epoch=32, batch_size=8, map_tile=128,
                                                epochs_per_round=2, val_patches=4, read_workers=1))
    prepared = prepare_run(spec)
    method = prepared.method
    kinds: list[str] = []
    orig = method.plan

    def plan(epoch, rng):
        jobs = orig(epoch, rng)
        kinds.extend(j().kind for j in jobs[:12])
        return jobs

    method.plan = plan
    events = list(train(method, spec.out))
    vals = [e for e in events if e.kind == "validation"]
    assert [e.epoch for e in vals] == [2, 4]  # stage 2 at the end of each round only
    assert method._pseudo, "the E-step of round 2 wrote pseudo-label maps"
    assert {"fine", "negative", "pseudo"} <= set(kinds)
    assert (spec.out / "best.safetensors").is_file()


def _painted_val_cohort(cohort: Path, out: Path) -> Path:
    """The painted cohort with its painted slide and one benign slide as the validation split."""
    rows = _rows(_painted_cohort(cohort, out))
    benign = next(r for r in rows if r["label"] == "0")
    for r in rows:
        r["split"] = "val" if r["pixel_labels"] or r is benign else "train"
    return write_rows(rows, out / "painted_val.csv")


def test_painted_validation_slides_choose_the_checkpoint(cohort: Path, tmp_path: Path) -> None:
    from napari_wsimil.train.engine import train
    from napari_wsimil.train.run import RunSpec
    from napari_wsimil.workflow.live import prepare_run

    source = _painted_val_cohort(cohort, tmp_path)
    best = {}
    for by in ("auto", "loss"):
        spec = RunSpec(source=source, method="pinchaud", out=tmp_path / by, epochs=4, mpp=4.0, patch=32,
                          device="cpu", config=dict(width=8, depth=3, patches_per_epoch=32, batch_size=8,
                                                    map_tile=128, val_patches=8, read_workers=1, w_pixel=0,
                                                    checkpoint_by=by, min_epochs=4))
        method = prepare_run(spec).method
        vals = [e for e in train(method, spec.out) if e.kind == "validation"]
        dice = [e.metrics["val_pixel_dice"] for e in vals]
        total = [e.losses["total"] for e in vals]
        state = json.loads((spec.out / "last.json").read_text())
        want = dice.index(max(dice)) if by == "auto" else total.index(min(total))
        assert state["best_epoch"] == vals[want].epoch
        best[by] = state["best_epoch"]

    # Its operating threshold: painted validation slides, so 'auto' takes the best pooled Dice on their pixels,
    # from the same counts (the best weights' map levels) that chose the checkpoint.
    from napari_wsimil.seg.operating_point import read_operating_point, threshold_for_val_dice
    from napari_wsimil.seg.predict import load_seg_run

    point = read_operating_point(spec.out)
    assert point is not None and point["rule"] == "val-dice" and point["operating_rule"] == "auto"
    run = load_seg_run(spec.out, device="cpu")
    tumour, normal = method.painted_val_levels(run.net, run.device, lambda m, x: m(x))
    assert point["threshold"] == threshold_for_val_dice(tumour.counts, normal.counts)[0] >= 0.5
    assert point["val_pixel_dice_at_threshold"] >= point["val_pixel_dice_at_0.5"]
    assert main(["calibrate", str(spec.out), "--device", "cpu"]) == 0  # the run's rule again: the same point
    assert json.loads((spec.out / "operating_point.json").read_text()) == point
    assert main(["calibrate", str(spec.out), "--device", "cpu", "--rule", "benign-fpr"]) == 0
    benign = json.loads((spec.out / "operating_point.json").read_text())
    assert benign["rule"] == "benign-fpr" and benign["threshold"] == point["benign_fpr_threshold"]

    # The Dice itself: an all-tumour prediction scores 2T / (2T + N) on the painted and benign pixels.
    painted = method._painted_val_set()
    labels = np.stack([p.labels for p in painted])
    assert (labels == 1).any() and (labels == 0).any()  # half the patches are centred on painted tumour
    benign_tissue = sum(int(p.tissue.sum()) for lab, pats in method._val_set() if lab == 0 for p in pats)
    t, n = int((labels == 1).sum()), int((labels == 0).sum()) + benign_tissue
    method.forward_eval = lambda model, x: torch.stack([torch.zeros_like(x[:, 0]), torch.ones_like(x[:, 0])], 1)
    assert method.painted_val_dice(method.model, torch.device("cpu")) == pytest.approx(2 * t / (2 * t + n))
    method.forward_eval = lambda model, x: torch.stack([torch.ones_like(x[:, 0]), torch.zeros_like(x[:, 0])], 1)
    assert method.painted_val_dice(method.model, torch.device("cpu")) == 0.0


def test_confkd_trains_teacher_and_student_and_predicts(cohort: Path, tmp_path: Path) -> None:
    painted = _painted_cohort(cohort, tmp_path)
    run, pred = tmp_path / "run", tmp_path / "pred"
    assert main(["train", str(painted), "--method", "confkd", "--out", str(run), "--epochs", "1", *SMALL]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["predict_with"] == "student" and info["pixel_labelled_slides"]
    assert main(["predict", str(run), "--cohort", str(painted), "--out", str(pred), "--device", "cpu",
                 "--slide-score", "topk"]) == 0
    assert len(list((pred / "maps").glob("*.tif"))) == 6


# ---------------------------------------------------------------------------------------------- bad input

def test_all_benign_cohort_is_refused_before_training(cohort: Path, tmp_path: Path, capsys) -> None:
    rows = [r for r in _rows(cohort) if r["label"] == "0"]
    for r in rows:
        r["path"] = str(cohort.parent / r["path"])
    benign = write_rows(rows + [{**rows[0], "slide_id": "x", "label": "1", "split": "test"}], tmp_path / "benign.csv")
    assert main(["train", str(benign), "--method", "pinchaud", "--out", str(tmp_path / "r"), *SMALL]) == 2
    assert "malignant" in capsys.readouterr().err
    assert not (tmp_path / "r" / "last.json").exists()


def _train_with_extra_slide(cohort: Path, tmp_path: Path, name: str, capsys) -> str:
    """Train pinchaud on the cohort plus benign slide ``tmp_path/<name>.tif``: it must fail before training;
    returns the error printed."""
    rows = _rows(cohort)
    for r in rows:
        r["path"] = str(cohort.parent / r["path"])
    rows.append({"slide_id": name, "path": str(tmp_path / f"{name}.tif"), "label": "0"})
    bad = write_rows(rows, tmp_path / f"{name}.csv")
    assert main(["train", str(bad), "--method", "pinchaud", "--out", str(tmp_path / "r"), *SMALL]) == 2
    assert not (tmp_path / "r" / "last.json").exists()
    return capsys.readouterr().err


def test_slide_without_tissue_is_named(cohort: Path, tmp_path: Path, capsys) -> None:
    from napari_wsimil.slide.tiff_writer import write_image_pyramid

    write_image_pyramid(tmp_path / "blank.tif", np.full((2048, 2048, 3), 245, np.uint8), mpp=0.5)
    err = _train_with_extra_slide(cohort, tmp_path, "blank", capsys)
    assert "no tissue" in err and "blank" in err


def test_pixel_label_mask_of_the_wrong_shape_is_refused(cohort: Path, tmp_path: Path, capsys) -> None:
    import tifffile

    painted = _painted_cohort(cohort, tmp_path)
    tifffile.imwrite(tmp_path / "paint.tif", np.ones((37, 91), np.uint8))  # not the slide's shape at any scale
    rows = _rows(painted)
    for r in rows:
        r.pop("pixel_labels_downsample", None)
    bad = write_rows(rows, tmp_path / "bad.csv")
    assert main(["train", str(bad), "--method", "hybrid", "--out", str(tmp_path / "r"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "paint.tif" in err or "mask" in err


# ---------------------------------------------------------------------------------------------- pseudo-labels

def test_pseudo_labels_become_a_label_set_that_keeps_paint(cohort: Path, tmp_path: Path) -> None:
    from napari_wsimil.project import Project
    from napari_wsimil.io.raster_store import LabelStore
    from napari_wsimil.seg.maps import open_map
    from napari_wsimil.seg.pseudo import write_pseudo_labels

    slide = _slides(cohort, with_labels=False)[0]
    run = tmp_path / "runs" / "r1"
    store = open_map(run / "maps" / f"{slide.slide_id}.zarr", slide, 4.0)
    p = np.zeros(store.shape, np.uint8)
    p[:, 128:] = 230  # the model calls the right half tumour
    store.write_all(p)
    with Project.create_from_csv(tmp_path / "proj", cohort) as proj:
        tumour = proj.class_by_name("tumour").id
        normal = proj.class_by_name("normal").id
        painted = proj.pixel_labels(slide.slide_id)
        painted[:10, -10:] = normal  # the pathologist already said this corner is normal
        proj.save_pixel_labels(slide.slide_id, painted)
        path, labels = write_pseudo_labels(proj, run, slide.slide_id, tumour, normal)
        assert path.parent.name == "r1" and path.parent.parent.name == "pseudo_labels"
        saved = LabelStore.open(path).read()
        assert np.array_equal(saved, labels)
        w = labels.shape[1]
        assert (labels[:, w // 2 + 2:][labels[:, w // 2 + 2:] > 0] == tumour).mean() > 0.9
        assert (labels[:, : w // 2 - 2] == tumour).sum() == 0
        assert (labels[:10, -10:] == normal).all()  # paint wins over the model
    slide.close()


def test_autoencoder_pretraining_starts_a_segmentation_run(cohort: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    from napari_wsimil.seg.configs import PinchaudConfig
    from napari_wsimil.seg.methods import build_net, load_init_weights
    from napari_wsimil.train.engine import TrainingError

    ae = tmp_path / "ae"
    assert main(["pretrain", str(cohort), "--out", str(ae), "--epochs", "1", "--mpp", "4", "--patch", "32",
                 "--width", "8", "--depth", "3", "--patches-per-epoch", "16", "--device", "cpu"]) == 0
    weights = ae / "autoencoder.safetensors"
    net = build_net(PinchaudConfig(width=8, depth=3))
    copied = load_init_weights(net, weights)
    assert any(n.startswith("encoder.") for n in copied)
    saved = load_file(str(weights))
    name = next(n for n in copied if n.startswith("encoder.") and n.endswith("weight"))
    assert torch.equal(net.state_dict()[name], saved[f"model.{name}"])
    with pytest.raises(TrainingError, match="width 8, depth 3"):
        load_init_weights(build_net(PinchaudConfig(width=16, depth=3)), weights)
    assert main(["train", str(cohort), "--method", "pinchaud", "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--set", f"init_weights={weights}", *SMALL]) == 0


def test_mapper_maps_each_slide_once_per_weights_then_idles(cohort: Path) -> None:
    import time

    from napari_wsimil.seg.mapper import MappingWorker
    from napari_wsimil.seg.nets import SegUNet
    from napari_wsimil.seg.sampling import GridBoard

    slides = _slides(cohort, with_labels=False)[:3]
    net = SegUNet(width=8, depth=3)
    board = GridBoard(slides, 4.0, 16, 2.0)
    worker = MappingWorker(net, slides, board, mpp=4.0, maps_dir=None, tile=128, margin=24).start()
    try:
        def until(cond) -> None:
            deadline = time.time() + 60
            while not cond() and time.time() < deadline:
                time.sleep(0.05)

        worker.update_weights(net.state_dict(), 1)
        until(lambda: (board.mapped_epochs() == 1).all())
        assert (board.mapped_epochs() == 1).all()
        done = worker.maps_done
        time.sleep(1.0)
        assert worker.maps_done == done  # same weights: nothing to redo
        worker.update_weights(net.state_dict(), 2)
        until(lambda: (board.mapped_epochs() == 2).all())
        time.sleep(0.5)
        assert (board.mapped_epochs() == 2).all() and worker.maps_done == done + 3  # each slide once
        worker.check()
    finally:
        worker.stop()
        for s in slides:
            s.close()


def test_slide_without_pixel_size_is_named(cohort: Path, tmp_path: Path, capsys) -> None:
    from napari_wsimil.slide.tiff_writer import write_image_pyramid

    img = np.full((1024, 1024, 3), 240, np.uint8)
    img[200:800, 200:800] = (150, 80, 160)  # tissue, but the file records no µm/px
    write_image_pyramid(tmp_path / "nompp.tif", img, mpp=None)
    err = _train_with_extra_slide(cohort, tmp_path, "nompp", capsys)
    assert "nompp" in err and "pixel size" in err


def test_segmentation_metrics_split_dice_into_precision_and_recall(tmp_path):
    """A map that covers the tumour plus a halo: recall 1, precision = tumour / (tumour + halo), and
    Dice and IoU from the same counts, on hand-made files (mask and map at the same grid)."""
    from napari_wsimil.infer.evaluation import TruthItem
    from napari_wsimil.infer.heatmap import write_heatmap
    from napari_wsimil.seg.evaluation import segmentation_metrics
    from napari_wsimil.slide.tiff_writer import write_image_pyramid

    truth = np.zeros((64, 64), np.uint8)
    truth[20:30, 20:30] = 1  # 100 px of tumour
    prob = np.zeros((64, 64), np.float32)
    prob[18:32, 18:32] = 0.9  # 196 px called tumour: the tumour and a 2-px halo
    prob[40:44, 40:44] = 0.4  # below the threshold: not counted
    write_image_pyramid(tmp_path / "s1_gt.tiff", truth, mpp=4.0)
    write_heatmap(tmp_path / "maps" / "s1.tif", prob, slide_mpp=0.5, downsample=8)
    seg = segmentation_metrics([TruthItem("s1", tmp_path / "s1_gt.tiff", 8.0)], tmp_path / "maps")
    assert seg["precision_pooled"] == pytest.approx(100 / 196, abs=1e-9)
    assert seg["recall_pooled"] == pytest.approx(1.0)
    assert seg["dice"] == pytest.approx(2 * 100 / (100 + 196))
    assert seg["iou"] == pytest.approx(100 / 196)
    assert "dice_at_0.5" not in seg
    # at a threshold above the halo's 0.9 nothing is called tumour; Dice at 0.5 is still reported
    strict = segmentation_metrics([TruthItem("s1", tmp_path / "s1_gt.tiff", 8.0)], tmp_path / "maps", threshold=0.95)
    assert strict["threshold"] == 0.95 and strict["dice"] == 0.0
    assert strict["dice_at_0.5"] == pytest.approx(seg["dice"])


def test_a_run_whose_threshold_calls_nothing_tumour_is_evaluated(tmp_path) -> None:
    """When more than operating_fpr of benign tissue sits at the top stored level, the operating threshold is
    level 256's, just above 1: nothing is tumour. Evaluation scores it (Dice 0, and Dice at 0.5) instead of
    refusing it as if the user had typed a --threshold above 1 (a FedMix run on the colorectal cohort did)."""
    from napari_wsimil.infer.evaluation import TruthItem
    from napari_wsimil.infer.heatmap import write_heatmap
    from napari_wsimil.errors import WsimilError
    from napari_wsimil.seg.family import FAMILY
    from napari_wsimil.seg.operating_point import LevelHistogram, threshold_for_fpr
    from napari_wsimil.slide.tiff_writer import write_image_pyramid

    hist = LevelHistogram()
    hist.counts[[100, 255]] = [990, 10]  # 1 % of benign tissue at p = 1
    threshold, achieved = threshold_for_fpr(hist, 0.001)
    assert threshold > 1.0 and achieved == 0.0
    truth = np.zeros((64, 64), np.uint8)
    truth[20:30, 20:30] = 1
    prob = np.zeros((64, 64), np.float32)
    prob[20:30, 20:30] = 1.0
    write_image_pyramid(tmp_path / "s1_gt.tiff", truth, mpp=4.0)
    write_heatmap(tmp_path / "maps" / "s1.tif", prob, slide_mpp=0.5, downsample=8)
    items = [TruthItem("s1", tmp_path / "s1_gt.tiff", 8.0)]
    kind, seg = FAMILY.evaluate(tmp_path, items, {"threshold": threshold})
    assert kind == "segmentation" and seg["dice"] == 0.0 and seg["dice_at_0.5"] == pytest.approx(1.0)
    with pytest.raises(WsimilError, match="--threshold is a probability"):
        FAMILY.evaluate(tmp_path, items, {"threshold": 0.5}, threshold=threshold)  # typed by a user: refused


def test_operating_threshold_is_the_lowest_level_within_the_benign_rate() -> None:
    from napari_wsimil.seg.operating_point import LevelHistogram, level_threshold, threshold_for_fpr

    hist = LevelHistogram()
    hist.counts[[100, 150, 250]] = [900, 90, 10]  # 1000 benign tissue pixels
    assert threshold_for_fpr(hist, 0.01) == (level_threshold(151), 0.01)  # levels ≥ 151 hold 10 of 1000
    assert threshold_for_fpr(hist, 0.2) == (0.5, 0.1)  # 10 % ≥ 0.5 already: never below 0.5
    assert threshold_for_fpr(hist, 0.005) == (level_threshold(251), 0.0)
    levels = np.arange(256)
    p = (levels / 255).astype(np.float32)  # what evaluation reads back from a stored map
    assert ((p >= level_threshold(151)) == (levels >= 151)).all() and level_threshold(128) == 0.5
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="operating_fpr"):
            threshold_for_fpr(hist, bad)


def test_operating_threshold_counts_every_benign_tissue_pixel_once(cohort: Path) -> None:
    """With a net that says p = 0.8 everywhere, every benign tissue pixel sits at level 204, and glass
    counts for nothing."""
    import math

    from napari_wsimil.seg.maps import tissue_tile
    from napari_wsimil.seg.operating_point import benign_histogram, level_threshold, threshold_for_fpr

    slides = _slides(cohort)
    benign = [s for s in slides if s.label == 0]

    def net(x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(x.shape[0], 1, *x.shape[2:])
        return torch.cat([z, z + math.log(4.0)], 1)

    hist = benign_histogram(net, benign, 4.0, margin=0, patch=32, tile=128)
    n_tissue = sum(int(tissue_tile(s, 4.0, 0, 0, *s.map_shape(4.0)).sum()) for s in benign)
    assert hist.counts[204] == hist.total and 0.98 * n_tissue <= hist.total <= n_tissue
    assert threshold_for_fpr(hist, 0.001) == (level_threshold(205), 0.0)
    for s in slides:
        s.close()


def test_context_makes_training_logits_those_of_the_maps(cohort: Path) -> None:
    from napari_wsimil.seg.configs import PinchaudConfig
    from napari_wsimil.seg.loader import stack
    from napari_wsimil.seg.maps import predict_tile
    from napari_wsimil.seg.methods import make_method
    from napari_wsimil.seg.sampling import PatchRequest

    slides = _slides(cohort, with_labels=False)
    s = next(x for x in slides if x.label == 1)
    torch.manual_seed(0)
    probs = {}
    for context in (0, -1):
        cfg = PinchaudConfig(width=8, depth=3, context=context, augment=False, dynamic_sampling=False)
        method = make_method("pinchaud", cfg, slides, (), mpp=4.0, patch=32)
        if context == 0:
            net = method.build_model().eval()
        method.model = net  # the same weights for both
        c = method.context
        d = s.downsample(4.0)
        y0 = x0 = 128  # on the U-Net's 4 px grid, well inside the slide
        p = method._read(s, PatchRequest(0, x0 * d, y0 * d))
        assert p.rgb.shape == (32 + 2 * c, 32 + 2 * c, 3)
        if c:
            ring = np.ones(p.labels.shape, bool)
            ring[c:-c, c:-c] = False
            assert not p.tissue[ring].any() and (p.labels[ring] == -1).all()  # the losses never see the ring
            assert p.tissue[~ring].any()
        b = stack([p])
        with torch.no_grad():
            logits = net(torch.from_numpy(b.rgb).permute(0, 3, 1, 2).float().div(255))
        probs[context] = torch.softmax(logits, 1)[0, 1, c:c + 32, c:c + 32].numpy()
    assert c == 24  # the receptive margin of a 3-level U-Net (see test_nets_losses), a multiple of the 4 px grid
    mapped = predict_tile(net, s, 4.0, 128, 128, 32, 32, c, "cpu", multiple=4)
    np.testing.assert_allclose(probs[-1], mapped, atol=1e-5)  # what training sees = what the map shows
    assert np.abs(probs[0] - mapped).max() > 1e-3  # without context, zero padding changes the patch's pixels


@pytest.mark.parametrize("method", ["hybrid", "confkd", "pinchaud"])
def test_every_method_trains_with_context(cohort: Path, tmp_path: Path, method: str) -> None:
    """Pseudo-labels (hybrid), the all-pixel entropy and KL (confkd) and the slide logits (pinchaud) take
    the patch inside its context ring; the ring's pixels never enter a loss."""
    from napari_wsimil.train.engine import train
    from napari_wsimil.train.run import RunSpec
    from napari_wsimil.workflow.live import prepare_run

    painted = _painted_cohort(cohort, tmp_path)
    config = {"width": 8, "depth": 3, "patches_per_epoch": 16, "batch_size": 8, "map_tile": 128, "val_patches": 4,
              "read_workers": 1, "context": -1}
    if method == "hybrid":  # two rounds of one epoch; T = 0 keeps every pseudo-label
        config.update(epochs_per_round=1, threshold=0.0)
    spec = RunSpec(source=painted, method=method, out=tmp_path / "run", epochs=2, mpp=4.0, patch=32,
                      device="cpu", config=config)
    prepared = prepare_run(spec)
    m = prepared.method
    shapes, softs = set(), []
    orig = m.step

    def step(model, batch, device):
        shapes.add(batch.rgb.shape[1:3])
        assert not batch.tissue[:, :24].any() and (batch.labels[:, :24] == -1).all()
        if batch.soft is not None:
            assert np.isnan(batch.soft[:, :24]).all()
            softs.append(batch.soft)
        out = orig(model, batch, device)
        assert all(torch.isfinite(v) for v in out.losses.values())
        return out

    m.step = step
    kinds = {e.kind for e in train(m, spec.out)}
    assert "validation" in kinds
    assert shapes == {(80, 80)}  # 32 px patches with 24 px of context a side
    if method == "hybrid":  # round 2's pseudo-labels, padded with "no target" over the ring
        assert softs and any(np.isfinite(s[:, 24:56, 24:56]).any() for s in softs)
    assert (tmp_path / "run" / "best.safetensors").is_file()


def test_normalised_logits_close_the_benign_loophole(cohort: Path) -> None:
    """Half of a benign patch called tumour (p = 0.73) behind pixels whose two logits are both raised: the
    paper's pooling calls the patch benign, the normalised pooling does not; and only the normalised loss is
    unchanged when every pixel's two logits move together (which leaves every pixel's probability as it is)."""
    from napari_wsimil.seg.configs import PinchaudConfig
    from napari_wsimil.seg.methods import make_method

    slides = _slides(cohort, with_labels=False)
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 0, :2] = 20.0  # rows 0-1: benign, sure of it
    logits[0, 1, 2:] = 1.0  # rows 2-3: tumour, p = 0.73
    tissue = torch.ones(1, 4, 4, dtype=torch.bool)
    shift = torch.zeros(1, 1, 4, 4)  # the same shift to both logits of each pixel: lower the sure-benign pair
    shift[0, 0, :2] = -20.0
    losses = {}
    for norm in (False, True):
        m = make_method("pinchaud", PinchaudConfig(width=8, depth=3, normalise_logits=norm, beta0=0.0), slides, (),
                        mpp=4.0, patch=32)
        losses[norm] = [float(m.val_loss(x, 0, tissue)) for x in (logits, logits + shift)]
    assert losses[False][0] < 1e-3  # the paper's pooling: a confident "benign" for a half-tumour patch
    assert losses[True][0] > 0.5  # normalised: KL of "benign" against q0 = 0.41
    assert losses[False][1] > 1.0  # the same pixel probabilities, now "tumour" to the paper's pooling
    assert losses[True][1] == pytest.approx(losses[True][0], abs=1e-5)
