"""Tiny synthetic MIL problems: positive bags hide a few instances shifted along one direction."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wsimil.mil import BagDataset
from napari_wsimil.train import make_config


def make_bags(n_bags: int = 40, dim: int = 32, seed: int = 0, annotate: float = 0.0, shift: float = 3.0,
              sizes: tuple[int, int] = (20, 60)) -> BagDataset:
    """Even bags negative, odd bags positive with 3–5 shifted instances (instance label 1)."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    feats, labels, inst = [], [], []
    for i in range(n_bags):
        n = int(rng.integers(sizes[0], sizes[1] + 1))
        y = i % 2
        x = rng.normal(size=(n, dim)).astype(np.float32)
        il = np.zeros(n, dtype=np.int64)
        if y:
            idx = rng.choice(n, min(n, int(rng.integers(3, 6))), replace=False)
            x[idx] += shift * direction
            il[idx] = 1
        feats.append(x)
        labels.append(y)
        inst.append(il if rng.random() < annotate else None)
    return BagDataset.from_arrays(feats, labels, inst)


def small_config(name: str, **kw):
    """Narrow networks and a higher learning rate so the tests run in seconds on a busy CPU."""
    base = dict(epochs=8, seed=0, hidden=64, attn_hidden=32, lr=1e-3, device="cpu")
    base.update(kw)
    return make_config(name, **base)


def run_all(gen):
    """Drain a training generator: (events, returned model)."""
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Every training test here runs on one torch thread (see the root conftest)."""
