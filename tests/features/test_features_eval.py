"""The linear probe and `wsimil features-eval`: probe maths, synthetic tile folders whose answer is
known (separable colours → 1, identical classes → chance), splits, one-line errors, real tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from napari_wsimil.cli import main
from napari_wsimil.features import probe
from napari_wsimil.features.evaluate import TileSetError, evaluate_encoder, find_tumour_class, scan_tiles

from conftest import SHARED_DATA


def _write_tiles(folder, n: int, rng: np.random.Generator, colour=(180, 80, 160), size: int = 24,
                 suffix: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        noise = rng.normal(0, 25, (size, size, 3))
        tile = np.clip(np.asarray(colour, float) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(tile).save(folder / f"t{i:03d}{suffix}")


def test_auc_and_balanced_accuracy_by_hand() -> None:
    y = np.array([1, 1, 0, 0, 0])
    assert probe.roc_auc(y, np.array([0.9, 0.4, 0.5, 0.1, 0.2])) == pytest.approx(5 / 6)
    assert probe.roc_auc(y, np.array([1, 1, 1, 1, 1])) == 0.5  # ties count half
    assert probe.balanced_accuracy(y, np.array([1, 0, 0, 0, 0])) == pytest.approx(0.75)
    folds = probe.stratified_folds(np.array([0] * 10 + [1] * 5), 5, seed=1)
    assert np.bincount(folds).tolist() == [3] * 5
    assert np.bincount(folds[:10], minlength=5).tolist() == [2] * 5  # each stratum spread evenly


def test_logistic_probe_separates_and_regularises() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = x[:, 0] + 0.1 * rng.normal(size=200) > 0.3  # imbalanced, linearly separable but for noise
    (xs,) = probe.standardise(x)
    w, _ = probe.fit_logistic(xs, y)
    assert np.argmax(np.abs(w)) == 0
    scores = probe.cross_validated_scores(x, y, y, k=5)
    assert probe.roc_auc(y, scores) > 0.98 and probe.balanced_accuracy(y, scores > 0) > 0.9
    w_strong, _ = probe.fit_logistic(xs, y, c=1e-3)
    assert np.abs(w_strong).sum() < np.abs(w).sum()


def test_separable_colours_score_one(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    _write_tiles(tmp_path / "tiles" / "TUM", 12, rng, (120, 40, 150))
    _write_tiles(tmp_path / "tiles" / "STR", 12, rng, (230, 150, 190))
    _write_tiles(tmp_path / "tiles" / "ADI", 8, rng, (245, 240, 245), suffix=".jpg")
    out = tmp_path / "eval.json"
    assert main(["features-eval", str(tmp_path / "tiles"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TUM vs STR" in text and "TUM vs all" in text and "5-fold" in text
    report = json.loads(out.read_text())
    assert report["tumour_class"] == "TUM" and report["classes"] == {"ADI": 8, "STR": 12, "TUM": 12}
    for task in report["tasks"]:
        assert task["balanced_accuracy"] == pytest.approx(1.0) and task["auc"] == pytest.approx(1.0), task


def test_identical_classes_score_chance(tmp_path) -> None:
    rng = np.random.default_rng(1)
    _write_tiles(tmp_path / "tumour", 50, rng, (170, 90, 160), size=16)
    _write_tiles(tmp_path / "normal", 50, rng, (170, 90, 160), size=16)
    report = evaluate_encoder(tmp_path, "handcrafted", folds=5)
    (task,) = report.tasks
    # chance, within about two standard deviations of cross-validated AUC on 50 + 50 null samples
    assert task.task == "tumour vs normal" and 0.35 < task.balanced_accuracy < 0.65 and 0.35 < task.auc < 0.65


def test_given_splits_are_used_and_resampling(tmp_path) -> None:
    rng = np.random.default_rng(2)
    for split, n in (("train", 10), ("valid", 6), ("extra", 3)):
        _write_tiles(tmp_path / "tumor" / split, n, rng, (110, 40, 140), size=32)
        _write_tiles(tmp_path / "normal" / split, n, rng, (200, 160, 200), size=32)
    tiles = scan_tiles(tmp_path, max_per_class=4)
    assert (tiles.train_split, tiles.test_split) == ("train", "valid")
    assert sorted(set(tiles.splits)) == ["train", "valid"] and len(tiles) == 16  # 4 per split and class
    report = evaluate_encoder(tmp_path, "handcrafted", tile_mpp=1.0, mpp=2.0)  # 32 px tiles read as 16 px
    assert report.protocol.startswith("fit on the train split") and report.tasks[0].folds is None
    assert report.tasks[0].n_tumour == 6 and report.tasks[0].balanced_accuracy == pytest.approx(1.0)


def test_bad_input_one_line_errors(tmp_path, capsys) -> None:
    rng = np.random.default_rng(3)
    _write_tiles(tmp_path / "a" / "STR", 3, rng)
    _write_tiles(tmp_path / "a" / "LYM", 3, rng)
    assert main(["features-eval", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no class look like the tumour class" in err
    assert "--tumour-class" in err
    assert main(["features-eval", str(tmp_path / "a"), "--tumour-class", "lym"]) == 0  # case-insensitive
    capsys.readouterr()

    (tmp_path / "a" / "EMPTY").mkdir()
    assert main(["features-eval", str(tmp_path / "a"), "--tumour-class", "LYM"]) == 2
    assert "EMPTY holds no images" in capsys.readouterr().err
    (tmp_path / "a" / "EMPTY").rmdir()

    (tmp_path / "a" / "LYM" / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["features-eval", str(tmp_path / "a"), "--tumour-class", "LYM"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot read tile broken.jpg" in err

    assert main(["features-eval", str(tmp_path / "a"), "--mpp", "0.5"]) == 2
    assert "--tile-mpp" in capsys.readouterr().err
    with pytest.raises(TileSetError, match="2 classes"):
        find_tumour_class(["TUM", "tumour_2", "NORM"])


@pytest.mark.skipif(not (SHARED_DATA / "crc_val_he_7k").is_dir(),
                    reason="../shared/data/crc_val_he_7k is absent beside the checkout")
def test_real_colorectal_tiles_handcrafted() -> None:
    """70 real H&E tiles, 7 classes: colour and texture statistics already tell tumour from most tissue."""
    report = evaluate_encoder(SHARED_DATA / "crc_val_he_7k", "handcrafted", folds=5)
    assert report.tumour_class == "TUM" and len(report.tasks) == 7
    by = {t.other: t for t in report.tasks}
    assert by["ADI"].balanced_accuracy > 0.9 and by["all"].auc > 0.8
