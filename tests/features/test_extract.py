"""extract_features on a small synthetic slide: one feature row per grid patch, in grid order."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_wsimil.features import ExtractionCancelled, extract_features, handcrafted_features
from napari_wsimil.slide import PatchReader, open_slide, patch_grid
from napari_wsimil.slide.synthetic import synthesize_slide


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("extract") / "malignant.tif"
    synthesize_slide(path, 2048, seed=5, malignant=True)
    return path


def test_bag_matches_grid(slide_path) -> None:
    slide = open_slide(slide_path)
    grid = patch_grid(slide, 256, 0.5)
    calls = []
    bag = extract_features(slide, "handcrafted", patch_size=256, mpp=0.5, batch_size=8,
                           progress=lambda d, t: calls.append((d, t)))
    assert len(bag) == len(grid) > 0
    np.testing.assert_array_equal(bag.coords, grid.coords)
    assert calls[0] == (0, len(grid)) and calls[-1] == (len(grid), len(grid))
    # row i is the features of patch i (not of some other order)
    with PatchReader(slide, grid, batch_size=len(grid), num_workers=0) as reader:
        _, patches = next(iter(reader))
    np.testing.assert_allclose(bag.features, handcrafted_features(patches), rtol=1e-5, atol=1e-6)
    a = bag.attrs
    assert a["encoder"] == "handcrafted" and a["patch_size"] == 256 and a["mpp"] == 0.5
    assert a["slide_size"] == slide_path.stat().st_size and a["size_level0"] == grid.size_level0


def test_path_input_and_cancel(slide_path) -> None:
    bag = extract_features(slide_path, "handcrafted", patch_size=128, mpp=2.0)
    assert bag.features.shape[1] == 76
    stop = threading.Event()
    stop.set()
    with pytest.raises(ExtractionCancelled):
        extract_features(slide_path, "handcrafted", batch_size=4, cancel=stop)


def test_torch_encoder_small(slide_path) -> None:
    pytest.importorskip("torch")
    bag = extract_features(slide_path, "resnet18", patch_size=32, mpp=4.0, batch_size=16, device="cpu")
    assert bag.features.shape == (len(bag.coords), 512) and np.isfinite(bag.features).all()
    assert bag.attrs["encoder_version"] == "1+random0"
    # a random-weight encoder is the same network in every run (resumed cohorts must not mix two)
    again = extract_features(slide_path, "resnet18", patch_size=32, mpp=4.0, batch_size=16, device="cpu")
    np.testing.assert_allclose(again.features, bag.features, rtol=1e-5, atol=1e-6)


def test_empty_grid(slide_path) -> None:
    slide = open_slide(slide_path)
    grid = patch_grid(slide, 256, 0.5).subset([])
    bag = extract_features(slide, "handcrafted", grid=grid)
    assert bag.coords.shape == (0, 2) and bag.features.shape == (0, 76)
