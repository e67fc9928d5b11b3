"""The ZoomMIL benchmark counts a torch encoder's FLOPs per patch (the figure multiplied by the patches each
method encodes): a TorchEncoder keeps its network in ``module``, which the count must find."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_encoder_flops_are_counted_for_a_torch_encoder_and_not_for_handcrafted(one_torch_thread) -> None:
    from bench_zoommil import encoder_flops

    from napari_wsimil.features.encoders import build_encoder

    flops = encoder_flops(build_encoder("resnet18", device="cpu"), 64)
    # ResNet-18 is 1.82 GMACs at 224 px; convolutions scale with the area: at 64 px 2 × 1.82e9 × (64/224)²
    assert flops == pytest.approx(2 * 1.82e9 * (64 / 224) ** 2, rel=0.1)
    assert encoder_flops(build_encoder("handcrafted", device="cpu"), 64) is None


def test_training_seeds_start_with_the_cohort_seed_and_the_auc_is_given_as_mean_and_spread() -> None:
    from bench_zoommil import auc_summary, train_seeds

    assert train_seeds(3, 1) == [3] and train_seeds(3, 3) == [3, 103, 203]
    with pytest.raises(SystemExit, match="at least 1"):
        train_seeds(3, 0)
    assert auc_summary([{"auc": 0.95}]) == "0.950"
    runs = [{"auc": 0.84}, {"auc": 0.95}, {"auc": 0.91}]
    assert auc_summary(runs) == "0.900 ± 0.056 (0.840, 0.950, 0.910)"


def test_a_procedural_cohort_gets_train_val_and_test_slides(tmp_path) -> None:
    import csv

    from bench_zoommil import with_split

    cohort = tmp_path / "cohort.csv"
    with open(cohort, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "label"])
        w.writerows([f"s{i}", f"s{i}.tiff", i % 2] for i in range(12))
    split = with_split(cohort, seed=1)
    rows = list(csv.DictReader(open(split)))
    assert split.name == "cohort_split.csv" and [r["slide_id"] for r in rows] == [f"s{i}" for i in range(12)]
    for label in "01":  # stratified: every class in every split
        assert {r["split"] for r in rows if r["label"] == label} == {"train", "val", "test"}
    assert all(r["path"] == str(tmp_path / f"{r['slide_id']}.tiff") for r in rows)
    assert with_split(split, seed=1) == split  # a cohort with its split is kept
