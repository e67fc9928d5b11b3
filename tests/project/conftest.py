"""A small synthetic cohort shared by the project tests (made once per session: ~2 s)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_wsimil.slide.synthetic import synthesize_cohort

    out = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(out, 3, seed=7, size=2048, workers=2)
    return out


@pytest.fixture
def cohort(cohort_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the cohort folder (tests may add files beside it); returns cohort.csv."""
    dst = tmp_path / "cohort"
    shutil.copytree(cohort_dir, dst)
    return dst / "cohort.csv"


@pytest.fixture
def project(cohort: Path, tmp_path: Path):
    from napari_wsimil.project import Project

    p = Project.create_from_csv(tmp_path / "proj", cohort)
    yield p
    p.close()
