"""``wsimil train`` → ``predict`` → ``evaluate`` on a tiny synthetic cohort, plus the metrics by hand."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.errors import WsimilError
from napari_wsimil.infer import metrics as M
from napari_wsimil.workflow.cli import register
from napari_wsimil.train.cohort import assign_splits, class_names, load_cohort


def run_cli(argv: list[str]) -> int:
    """What ``napari_wsimil.cli.main`` does for these commands, without depending on its wiring."""
    parser = argparse.ArgumentParser(prog="wsimil")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WsimilError as exc:
        print(f"wsimil {args.command}: error: {exc}")
        return 2


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_wsimil.slide.synthetic import synthesize_cohort

    return synthesize_cohort(tmp_path_factory.mktemp("cohort"), 8, seed=0, size=2048)


def test_train_predict_evaluate(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, pred = tmp_path / "run", tmp_path / "pred"
    assert run_cli(["train", str(cohort), "--method", "abmil", "--out", str(run), "--epochs", "3",
                    "--encoder", "handcrafted", "--patch", "128", "--mpp", "1.0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("\nepoch ") + out.startswith("epoch ") == 3 and "ETA" in out and "val loss" in out
    assert (run / "last.json").is_file() and list(run.glob("ckpt-*.safetensors"))
    assert (run / "best.safetensors").is_file()
    info = json.loads((run / "run.json").read_text())
    assert info["method"] == "abmil" and info["encoder"] == "handcrafted"
    assert info["patch"] == 128 and info["mpp"] == 1.0 and info["classes"] == ["0", "1"]
    assert len(info["train_slides"]) == 6 and len(info["val_slides"]) == 2
    assert (tmp_path / "features" / "handcrafted").is_dir()  # RUN/../features/ENCODER

    # a second train into the same folder without --resume is refused; with --resume it is a no-op
    assert run_cli(["train", str(cohort), "--method", "abmil", "--out", str(run), "--epochs", "3",
                    "--patch", "128", "--mpp", "1.0", "--device", "cpu"]) == 2
    assert run_cli(["train", str(cohort), "--method", "abmil", "--out", str(run), "--epochs", "3",
                    "--patch", "128", "--mpp", "1.0", "--device", "cpu", "--resume"]) == 0
    capsys.readouterr()

    assert run_cli(["predict", str(run), "--cohort", str(cohort), "--out", str(pred), "--device", "cpu"]) == 0
    with open(pred / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(cohort, newline="") as fh:
        ids = [r["slide_id"] for r in csv.DictReader(fh)]
    assert [r["slide_id"] for r in rows] == ids
    assert list(rows[0]) == ["slide_id", "prob_0", "prob_1", "patches_encoded", "seconds"]
    assert all(int(r["patches_encoded"]) > 0 and float(r["seconds"]) > 0 for r in rows)
    for r in rows:
        assert float(r["prob_0"]) + float(r["prob_1"]) == pytest.approx(1.0, abs=1e-6)
        with np.load(pred / "attention" / f"{r['slide_id']}.npz") as z:
            assert z["coords"].shape == (len(z["attention"]), 2)
            assert z["attention"].sum() == pytest.approx(1.0, abs=1e-4)

    assert run_cli(["evaluate", str(pred), "--cohort", str(cohort)]) == 0
    assert "AUC" in capsys.readouterr().out
    m = json.loads((pred / "metrics.json").read_text())
    assert m["n_slides"] == 8
    for key in ("auc", "accuracy", "balanced_accuracy", "f1"):
        assert 0.0 <= m[key] <= 1.0


def test_one_class_cohort_is_a_readable_error(cohort: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    one = tmp_path / "one.csv"
    with open(cohort, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] == "1"]
    with open(one, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["slide_id", "path", "label"])
        w.writeheader()
        for r in rows:
            w.writerow({"slide_id": r["slide_id"], "path": str(cohort.parent / r["path"]), "label": r["label"]})
    assert run_cli(["train", str(one), "--method", "abmil", "--out", str(tmp_path / "run"), "--epochs", "1"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "only class" in out[0] and "two classes" in out[0]
    assert not (tmp_path / "run").exists()

    # a label outside the given classes
    assert run_cli(["train", str(cohort), "--method", "abmil", "--out", str(tmp_path / "run"),
                    "--classes", "0,2"]) == 2
    assert "not one of the classes" in capsys.readouterr().out


def test_split_is_stratified_and_seeded(cohort: Path) -> None:
    c = load_cohort(cohort)
    classes = class_names([s.label for s in c.slides])
    a = assign_splits(c.slides, classes, seed=3)
    assert a == assign_splits(c.slides, classes, seed=3)
    for label in classes:
        assert sum(s.split == "val" and s.label == label for s in a) == 1
    assert class_names(["10", "2", "1"]) == ["1", "2", "10"]
    assert class_names(["tumour", "normal"]) == ["normal", "tumour"]


def test_metrics_by_hand() -> None:
    # scores of positives 0.9, 0.4; negatives 0.5, 0.1 → pairs won: (0.9>0.5, 0.9>0.1, 0.4>0.1) = 3 of 4
    probs = np.array([[0.1, 0.9], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
    labels = np.array([1, 1, 0, 0])
    assert M.auc(probs, labels) == pytest.approx(0.75)
    # argmax: 1, 0, 0 (tie → first), 0 → correct 1, 0, 1, 1
    m = M.slide_metrics(probs, labels)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["f1"] == pytest.approx(2 * 1 / (2 * 1 + 0 + 1))  # tp 1, fp 0, fn 1
    assert M.binary_auc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5  # ties count half
    assert math.isnan(M.auc(probs, np.zeros(4)))

    # three classes: predictions 0, 1, 2, 2 for labels 0, 1, 1, 2
    p3 = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.1, 0.2, 0.7]])
    y3 = np.array([0, 1, 1, 2])
    m3 = M.slide_metrics(p3, y3)
    assert m3["accuracy"] == pytest.approx(0.75)
    assert m3["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    # F1 per class: 0 → 1; 1 → tp 1, fn 1 → 2/3; 2 → tp 1, fp 1 → 2/3
    assert m3["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # weighted by the classes' shares of the labels: 1/4, 2/4, 1/4 (scikit-learn's average="weighted")
    assert m3["weighted_f1"] == pytest.approx(1 / 4 * 1 + 2 / 4 * 2 / 3 + 1 / 4 * 2 / 3)
    # two classes: (F1 of class 0 = 2·2/(2·2+1+0) = 0.8, share 1/2) + (F1 of class 1 = 2/3, share 1/2)
    assert m["weighted_f1"] == pytest.approx(0.5 * 0.8 + 0.5 * 2 / 3)
    # one-vs-rest AUC: class 0 → 1; class 1 scores pos 0.7, 0.3 vs neg 0.1, 0.2 → 1;
    # class 2 pos 0.7 vs neg 0.1, 0.1, 0.6 → 1
    assert m3["auc"] == pytest.approx(1.0)
    p3b = p3.copy()
    p3b[:, 1] = [0.5, 0.1, 0.3, 0.2]  # class 1: pos 0.1, 0.3 vs neg 0.5, 0.2 → (0 + 1) / 4
    assert M.auc(p3b, y3) == pytest.approx((1 + 0.25 + 1) / 3)


def test_slide_without_tissue_is_named_before_training(cohort: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A blank scan (glass only) in the cohort: one error naming it, before any epoch runs."""
    from napari_wsimil.slide.tiff_writer import write_image_pyramid

    blank = tmp_path / "blank.tiff"
    write_image_pyramid(blank, np.full((1024, 1024, 3), 242, np.uint8), mpp=0.5)
    with open(cohort, newline="") as fh:
        rows = [{"slide_id": r["slide_id"], "path": str(cohort.parent / r["path"]), "label": r["label"]}
                for r in csv.DictReader(fh)]
    rows.append({"slide_id": "blank", "path": str(blank), "label": "0"})
    csv_path = tmp_path / "with_blank.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["slide_id", "path", "label"])
        w.writeheader()
        w.writerows(rows)
    run = tmp_path / "run"
    assert run_cli(["train", str(csv_path), "--method", "clam-sb", "--out", str(run), "--epochs", "2",
                    "--patch", "128", "--mpp", "1.0", "--device", "cpu"]) == 2
    out = capsys.readouterr().out
    err_line = out.strip().splitlines()[-1]
    assert "no tissue found on 1 slide(s): blank" in err_line
    assert "epoch 1/" not in out and not (run / "last.json").exists()
