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
def abmil_run(synth_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An abmil run (1 epoch, handcrafted features, 128 px at 0.5 µm/px) on the synthetic cohort; its bag store is
    RUN/../features/handcrafted. Tests that predict with it use slide ids of their own there."""
    from napari_wsimil.cli import main

    out = tmp_path_factory.mktemp("work") / "run"
    assert main(["train", str(synth_cohort / "cohort.csv"), "--method", "abmil", "--out", str(out), "--epochs", "1",
                 "--encoder", "handcrafted", "--patch", "128", "--mpp", "0.5", "--device", "cpu"]) == 0
    return out
