"""A one-slide synthetic cohort and a project on it, shared by the reliability tests (~1 s, once per session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_wsimil.slide.synthetic import synthesize_cohort

    out = tmp_path_factory.mktemp("rel-cohort")
    synthesize_cohort(out, 2, seed=3, size=2048, workers=1)
    return out


@pytest.fixture
def small_project(small_cohort_dir: Path, tmp_path: Path) -> Path:
    """A closed project folder with painted labels and a box on its first slide; returns its folder."""
    import numpy as np

    from napari_wsimil.project import Project

    cohort = tmp_path / "cohort"
    shutil.copytree(small_cohort_dir, cohort)
    root = tmp_path / "proj"
    with Project.create_from_csv(root, cohort / "cohort.csv") as p:
        sid = p.slide_ids[0]
        g = p.label_geometry(sid)
        labels = np.zeros(g.shape, np.uint8)
        labels[10:60, 20:90] = 1
        p.save_pixel_labels(sid, labels)
        labels[100:140, 100:150] = 2
        p.save_pixel_labels(sid, labels, dirty=[(100, 140, 100, 150)])
    return root
