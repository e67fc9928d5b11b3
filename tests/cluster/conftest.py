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
