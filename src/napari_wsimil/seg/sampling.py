"""Pinchaud's dynamic sampling: which slides, and where on them, the next patches come from.

* Slides: malignant and benign at the same rate; benign slides in proportion to their summed malignant
  probability ΣQ (the ones the model gets most wrong are revisited most); a slide not drawn for
  ``revisit_epochs`` epochs is drawn first, so none is forgotten. The mapping worker and the trainer
  each keep a :class:`SlideScheduler`.
* Places: a patch centre is drawn with probability ∝ Q^α from the slide's latest map (α = 0: uniformly
  over tissue). The map is summarised per block (:class:`~.maps.SamplingGrid`): the block is drawn ∝ its
  Σ Q^α, the centre uniformly inside it, an approximation of pixel-level Q^α that keeps memory per slide
  at a few kilobytes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .data import SegSlide
from .maps import SamplingGrid, default_grid


class SlideScheduler:
    """Draws slide indices: half malignant, half benign, benign ∝ ΣQ, the overdue first."""

    def __init__(self, labels: Sequence[int | None], revisit_epochs: int = 5):
        self.labels = list(labels)
        self.revisit = max(1, int(revisit_epochs))
        self.last = np.full(len(self.labels), -10**9)  # epoch each slide was last drawn
        self.malignant = [i for i, y in enumerate(self.labels) if y == 1]
        self.benign = [i for i, y in enumerate(self.labels) if y == 0]

    def draw(self, n: int, epoch: int, rng: np.random.Generator, q_sums: Sequence[float]) -> np.ndarray:
        """``n`` slide indices for ``epoch`` (with repeats), alternating malignant and benign."""
        out: list[int] = []
        overdue = [i for i in (self.malignant + self.benign) if epoch - self.last[i] >= self.revisit]
        rng.shuffle(overdue)
        groups = [g for g in (self.malignant, self.benign) if g]
        k = int(rng.integers(len(groups))) if groups else 0
        while len(out) < n and groups:
            if overdue:
                i = overdue.pop()
            else:
                g = groups[k % len(groups)]
                k += 1
                if g is self.benign:
                    w = np.asarray([max(float(q_sums[j]), 1e-12) for j in g])
                    i = g[int(rng.choice(len(g), p=w / w.sum()))]
                else:
                    i = g[int(rng.integers(len(g)))]
            out.append(i)
            self.last[i] = epoch
        return np.asarray(out, dtype=np.int64)


class GridBoard:
    """The latest :class:`SamplingGrid` of every slide: written by the mapper, read by the trainer."""

    def __init__(self, slides: Sequence[SegSlide], mpp: float, block: int, alpha: float):
        self._lock = threading.Lock()
        self._grids = [default_grid(s, mpp, block, alpha=alpha) for s in slides]
        self.mpp, self.block, self.alpha = mpp, block, alpha
        self.version = 0
        self.latest_epoch = 0  # the newest weights any published map came from

    def publish(self, index: int, grid: SamplingGrid) -> None:
        with self._lock:
            self.version += 1
            self._grids[index] = SamplingGrid(grid.weights, grid.q_sum, grid.tissue, grid.block, grid.mpp,
                                              grid.epoch, self.version)
            self.latest_epoch = max(self.latest_epoch, grid.epoch)

    def get(self, index: int) -> SamplingGrid:
        with self._lock:
            return self._grids[index]

    def q_sums(self) -> list[float]:
        """ΣQ per slide; unmapped slides get the mean of the mapped ones (the paper's "default value")."""
        with self._lock:
            grids = list(self._grids)
        mapped = [g.total_q for g in grids if g.version > 0]
        default = float(np.mean(mapped)) if mapped else 1.0
        return [g.total_q if g.version > 0 else default for g in grids]

    def mapped_epochs(self) -> np.ndarray:
        with self._lock:
            return np.asarray([g.epoch if g.version > 0 else -1 for g in self._grids])


@dataclass(frozen=True)
class PatchRequest:
    """Where to read one training patch: slide index and level-0 top-left corner."""

    slide: int
    x0: float
    y0: float


def draw_centres(grid: SamplingGrid, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) map-pixel (x, y) centres ∝ Q^α by block, uniform within the block; tissue-uniform when the
    map has no weight at all (e.g. Q = 0 everywhere on a benign slide)."""
    w = grid.weights.ravel()
    if not w.sum() > 0:
        w = grid.tissue.ravel()
    if not w.sum() > 0:
        w = np.ones_like(w)
    cells = rng.choice(len(w), size=n, p=w / w.sum())
    gy, gx = np.divmod(cells, grid.weights.shape[1])
    off = rng.uniform(0, grid.block, size=(n, 2))
    return np.column_stack([gx * grid.block + off[:, 0], gy * grid.block + off[:, 1]])


def plan_epoch(slides: Sequence[SegSlide], board: GridBoard, scheduler: SlideScheduler, n: int, size: int,
               mpp: float, epoch: int, rng: np.random.Generator) -> list[PatchRequest]:
    """The ``n`` patches of one epoch, drawn from the latest maps (see the module doc)."""
    picks = scheduler.draw(n, epoch, rng, board.q_sums())
    out = []
    for i in np.unique(picks):
        k = int((picks == i).sum())
        centres = draw_centres(board.get(int(i)), k, rng)
        d = slides[int(i)].downsample(mpp)
        for cx, cy in centres:
            out.append(PatchRequest(int(i), (cx - size / 2) * d, (cy - size / 2) * d))
    order = rng.permutation(len(out))
    return [out[j] for j in order]


__all__ = ["GridBoard", "PatchRequest", "SlideScheduler", "draw_centres", "plan_epoch"]
