"""A tiny synthetic cohort split into three sites (CSV each), shared by the federated tests."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest


def split_sites(cohort_csv: Path, n_sites: int = 3) -> list[Path]:
    """One CSV per site, slides dealt round-robin (paths stay relative to the cohort's folder)."""
    rows = list(csv.DictReader(cohort_csv.open()))
    out = []
    for k in range(n_sites):
        path = cohort_csv.parent / f"site{k}.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(r for i, r in enumerate(rows) if i % n_sites == k)
        out.append(path)
    return out


@pytest.fixture(scope="session")
def fed_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic slides of 1024² (6 malignant, with ground truth), ``cohort.csv``."""
    from napari_wsimil.slide.synthetic import synthesize_cohort

    return Path(synthesize_cohort(tmp_path_factory.mktemp("fedcohort"), 12, seed=0, size=1024, workers=1))


@pytest.fixture(scope="session")
def site_csvs(fed_cohort: Path) -> list[Path]:
    return split_sites(fed_cohort)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Every federated test trains on one torch thread (see the root conftest)."""
