"""A small synthetic cohort shared by the cluster tests (written once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_wsimil.slide.synthetic import synthesize_cohort

    out = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(out, 6, seed=3, size=(2048, 2048))
    return out


@pytest.fixture(scope="session")
def reference(synth_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bags the single-process path writes for every slide of the cohort (handcrafted, 64 px at 0.5 µm/px,
    batch 32): what the cluster's slide and region tasks must reproduce array for array. Made once, because the
    cluster and region tests compare against the same slides."""
    from napari_wsimil.features.extract import extract_cohort

    out = tmp_path_factory.mktemp("single")
    res = extract_cohort(sorted(synth_cohort.glob("slide_*[0-9].tiff")), out, "handcrafted", 64, 0.5, 32, device="cpu")
    assert all(r.status == "done" for r in res)
    return out


@pytest.fixture(scope="session")
def abmil_run(synth_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An abmil run (1 epoch, handcrafted features, 128 px at 0.5 µm/px) on the synthetic cohort; its bag store is
    RUN/../features/handcrafted. Tests that predict with it use slide ids of their own there."""
    from napari_wsimil.cli import main

    out = tmp_path_factory.mktemp("work") / "run"
    assert main(["train", str(synth_cohort / "cohort.csv"), "--method", "abmil", "--out", str(out), "--epochs", "1",
                 "--encoder", "handcrafted", "--patch", "128", "--mpp", "0.5", "--device", "cpu"]) == 0
    return out
