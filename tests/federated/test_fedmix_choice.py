"""FedMix's checkpoint and operating threshold come from numbers the sites measure on their own held-out slides
(:mod:`napari_wsimil.federated.fedmix_validation`), in both round loops: ``run_local`` and the server's loop
(``run_server``, here with every site in this process). The threshold the server sets from the sites' summed
benign histograms is the one a centralised calibration gives on the union of those benign slides; ``wsimil
predict`` uses it for maps and masks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.cli import main
from napari_wsimil.federated.fedmix_sites import make_sites, rows, write

TINY = dict(mpp=4.0, patch=32, width=8, depth=2, batch_size=8, patches_per_round=32, val_patches=4,
            read_workers=2, device="cpu", seed=3, operating_fpr=0.01)
ROUNDS = 3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 slides; per class, the first three are validation slides: each of the three sites gets one benign and
    one malignant slide to train on and the same to validate on."""
    from napari_wsimil.slide.synthetic import synthesize_cohort

    path = synthesize_cohort(tmp_path_factory.mktemp("choicecohort"), 12, seed=7, size=1024, workers=2)
    rs = rows(path)
    for label in ("0", "1"):
        for i, r in enumerate([r for r in rs if r["label"] == label]):
            r["split"] = "val" if i < 3 else "train"
    return write(rs, path.parent / "split.csv")


@pytest.fixture(scope="module")
def sites(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_sites(cohort, tmp_path_factory.mktemp("choicesites"), paint_val=True)


@pytest.fixture(scope="module")
def local_run(sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_wsimil.federated.fedmix import run_local
    from napari_wsimil.federated.fedmix_config import FedMixConfig

    out = tmp_path_factory.mktemp("choice") / "run"
    run_local(sites, FedMixConfig(**TINY), ROUNDS, out)
    return out


def _benign_validation_slides(sites: list[Path]) -> list[dict]:
    return [r for s in sites for r in csv.DictReader(s.open()) if r["label"] == "0" and r["split"] == "val"]


def _check_choice(out: Path) -> dict:
    """What both round loops must leave: per-round summed validation, the best round's weights, its threshold."""
    from napari_wsimil.seg.operating_point import read_operating_point

    info = json.loads((out / "run.json").read_text())
    vals = {r["round"]: r["validation"] for r in info["rounds"] if "validation" in r}
    assert sorted(vals) == list(range(1, ROUNDS + 1))  # every global model was measured by the sites
    for v in vals.values():
        assert v["sites"] == 3 and v["val_slides"] == 6 and np.isfinite(v["val_loss"])
        assert v["painted_sites"] == 1 and 0.0 <= v["val_pixel_dice"] <= 1.0 and v["val_tumour_pixels"] > 0
        assert v["select_by"] == "1 - val_pixel_dice" and v["select"] == pytest.approx(1 - v["val_pixel_dice"])
    best = info["best"]
    chosen = min(vals, key=lambda r: (vals[r]["select"], r))  # ties: the earlier round, as strict improvement
    assert best["round"] == chosen and best["select"] == pytest.approx(vals[chosen]["select"])
    assert json.loads((out / "last.json").read_text())["round"] == ROUNDS
    from safetensors import safe_open

    with safe_open(str(out / "best.safetensors"), "np") as fh:
        assert fh.metadata()["epoch"] == str(chosen)
    point = read_operating_point(out)  # present, and for the weights now in best.safetensors
    assert point is not None and point["round"] == chosen and point["federated"] is True
    assert 0.5 <= point["threshold"] and point["operating_fpr"] == TINY["operating_fpr"]
    assert point["slides"] == [] and point["n_slides"] == 3 and point["sites"] == 3  # no slide is named
    # the pixel site's validation slides are painted, so 'auto' sets the threshold by the summed painted pixels'
    # pooled Dice, as a centralised run with painted validation slides does; 0.5 is one of its candidates
    assert point["rule"] == "val-dice" and point["operating_rule"] == "auto"
    assert point["val_pixel_dice_at_threshold"] >= point["val_pixel_dice_at_0.5"] == vals[chosen]["val_pixel_dice"]
    assert 0.5 <= point["benign_fpr_threshold"] and point["benign_pixels"] > 0  # what the benign-FPR rule gives
    return point


def test_local_run_chooses_its_round_and_threshold_from_the_sites_numbers(local_run: Path) -> None:
    point = _check_choice(local_run)
    hist = json.loads((local_run / "last.json").read_text())["history"]
    assert not any("_L0" in k for h in hist for s in h["sites"] for k in s)  # sums are kept, not histograms
    assert point["source"] == "validation"


def test_the_summed_threshold_is_the_centralised_one(local_run: Path, sites: list[Path], cohort: Path,
                                                      tmp_path: Path) -> None:
    """Each site counted its own benign pixels; a centralised benign-FPR calibration of the same weights on all
    those benign validation slides at once gives the same threshold and false-positive share as the benign-FPR
    rule on the summed counts (recorded beside the val-dice threshold the run uses)."""
    from napari_wsimil.seg.data import open_seg_slides
    from napari_wsimil.seg.operating_point import calibrate_run
    from napari_wsimil.train.cohort import load_cohort

    point = json.loads((local_run / "operating_point.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(local_run, copy)
    ids = {r["slide_id"] for r in _benign_validation_slides(sites)}
    c = load_cohort(cohort)
    slides = open_seg_slides(c, [s for s in c.slides if s.slide_id in ids], ["0", "1"])
    try:
        central = calibrate_run(copy, slides, TINY["operating_fpr"], source="validation", device="cpu")
    finally:
        for s in slides:
            s.close()
    assert central is not None and len(central["slides"]) == 3 and central["rule"] == "benign-fpr"
    assert (point["benign_fpr_threshold"], point["benign_pixels"]) == (central["threshold"], central["benign_pixels"])
    assert point["benign_fpr_at_0.5"] == pytest.approx(central["benign_fpr_at_0.5"])


def test_predict_and_masks_use_the_federated_threshold(local_run: Path, cohort: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    point = json.loads((local_run / "operating_point.json").read_text())
    pred = tmp_path / "pred"
    assert main(["predict", str(local_run), "--cohort", str(cohort), "--out", str(pred), "--device", "cpu",
                 "--masks"]) == 0
    out = capsys.readouterr().out
    assert f"operating threshold {point['threshold']:.3f}" in out and "at 3 sites" in out
    meta = json.loads((pred / "prediction.json").read_text())
    assert meta["threshold"] == point["threshold"] and meta["operating_point"]["round"] == point["round"]
    import tifffile

    from napari_wsimil.seg.operating_point import threshold_level

    for r in rows(cohort):  # masks cut at the federated threshold, pixel for pixel the stored maps' levels
        stored = tifffile.imread(pred / "maps" / f"{r['slide_id']}.tif", level=0)
        mask = tifffile.imread(pred / "masks" / f"{r['slide_id']}.ome.tif", level=0)
        mask = mask[:stored.shape[0], :stored.shape[1]]
        assert np.array_equal(mask, (stored >= threshold_level(point["threshold"])).astype(np.uint8))
    assert main(["evaluate", str(pred), "--cohort", str(cohort)]) == 0
    assert f"p ≥ {point['threshold']:.3f}" in capsys.readouterr().out


def test_the_server_loop_chooses_the_same_way(sites: list[Path], tmp_path: Path) -> None:
    """``run_server`` (what the Flower ServerApp runs) with the three sites in this process."""
    from napari_wsimil.federated.fedmix import FedMix
    from napari_wsimil.federated.fedmix_config import FedMixConfig
    from napari_wsimil.federated.rounds import LocalTransport, ServerSettings, run_server

    cfg = FedMixConfig(**TINY)
    method = FedMix()
    trainers = {f"site{k}": method.site_trainer(s, cfg, tmp_path / f"w{k}") for k, s in enumerate(sites)}
    try:
        info = run_server(method, cfg, tmp_path / "run", LocalTransport(trainers),
                          ServerSettings(rounds=ROUNDS, min_sites=3))
    finally:
        for t in trainers.values():
            t.close()
    _check_choice(tmp_path / "run")
    assert info["operating_point"]["threshold"] >= 0.5
    final = info["rounds"][-1]["final_evaluation"]
    assert sorted(final) == ["site0", "site1", "site2"] and not any("_L" in k for m in final.values() for k in m)


def test_what_a_site_sends_is_numbers_named_without_its_slides(sites: list[Path], cohort: Path,
                                                               tmp_path: Path) -> None:
    """The pixel site's reply to an evaluate message: single finite numbers only, no key naming a slide."""
    from napari_wsimil.federated.fedmix import FedMix
    from napari_wsimil.federated.fedmix_config import FedMixConfig

    cfg = FedMixConfig(**TINY)
    method = FedMix()
    site = method.site_trainer(sites[0], cfg, tmp_path)
    try:
        g = method.initial_arrays(cfg)
        metrics = site.evaluate(g)
        update = site.fit(g, 2)
    finally:
        site.close()
    ids = [r["slide_id"] for r in rows(cohort)]
    for m in (metrics, update.metrics):
        assert all(type(v) is float and np.isfinite(v) for v in m.values())
        assert not any(i in k for k in m for i in ids)
    assert {"val_loss", "benign_L255", "val_tumour_L000", "val_normal_L128"} <= set(metrics)
    assert {"global_val_loss", "global_val_tumour_L000"} <= set(update.metrics)
    assert sum(v for k, v in metrics.items() if k.startswith("benign_L")) > 0
    # a site without painted validation slides sends its benign validation tissue as normal pixels, no tumour
    box = method.site_trainer(sites[1], cfg, tmp_path / "box")
    try:
        other = box.evaluate(g)
    finally:
        box.close()
    assert sum(v for k, v in other.items() if k.startswith("val_normal_L")) > 0
    assert sum(v for k, v in other.items() if k.startswith("val_tumour_L")) == 0
