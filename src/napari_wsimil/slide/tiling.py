"""Patch grids over tissue, and a reader that streams their pixels in batches.

A patch is defined physically (``patch_size`` px at ``mpp`` µm/px) so that models see the same
scale whatever scanner made the slide; its position is stored in level-0 pixels so it can be read
back, drawn in napari or matched to annotations without knowing which level was used.
"""

from __future__ import annotations

import csv
import math
import threading
import weakref
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import MissingMppError

if TYPE_CHECKING:  # pragma: no cover
    from .slide import Slide
    from .tissue import TissueMask

#: Name prefix of PatchReader threads, so leaks are easy to spot (and to test for).
THREAD_PREFIX = "wsimil-patches"

_CSV_FIELDS = ("x", "y", "tissue_fraction", "patch_size", "mpp", "level", "size_level0", "stride_level0")


@dataclass(eq=False)  # arrays inside: identity, not elementwise ==
class PatchGrid:
    """Square patches on a regular level-0 grid, in row-major order (rows top to bottom)."""

    coords: np.ndarray
    patch_size: int
    mpp: float | None
    size_level0: float
    tissue_fraction: np.ndarray
    stride_level0: float
    level: int | None = None
    slide_path: str | None = None

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)
        self.tissue_fraction = np.asarray(self.tissue_fraction, dtype=np.float64).reshape(-1)
        if len(self.tissue_fraction) != len(self.coords):
            raise ValueError(f"{len(self.coords)} coords but {len(self.tissue_fraction)} tissue fractions")

    def __len__(self) -> int:
        return len(self.coords)

    def subset(self, index: np.ndarray | slice | list[int]) -> PatchGrid:
        """The same grid restricted to some patches (a sample, a split), keeping their order as given."""
        return PatchGrid(
            coords=self.coords[index], patch_size=self.patch_size, mpp=self.mpp, size_level0=self.size_level0,
            tissue_fraction=self.tissue_fraction[index], stride_level0=self.stride_level0, level=self.level,
            slide_path=self.slide_path,
        )

    def boxes(self) -> np.ndarray:
        """(N, 4) level-0 boxes x0, y0, x1, y1 (float: a patch need not cover whole level-0 pixels)."""
        xy = self.coords.astype(np.float64)
        return np.concatenate([xy, xy + self.size_level0], axis=1)

    def to_csv(self, path: str | Path) -> Path:
        """Write one row per patch, every row self-describing, so pandas or a spreadsheet can read it."""
        path = Path(path)
        mpp = "" if self.mpp is None else repr(float(self.mpp))
        level = "" if self.level is None else str(self.level)
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(_CSV_FIELDS)
            for (x, y), frac in zip(self.coords.tolist(), self.tissue_fraction.tolist()):
                writer.writerow(
                    (x, y, f"{frac:.4f}", self.patch_size, mpp, level, repr(self.size_level0), repr(self.stride_level0))
                )
        return path

    @classmethod
    def from_csv(cls, path: str | Path) -> PatchGrid:
        """Read a grid written by :meth:`to_csv`."""
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            raise ValueError(f"{path} holds no patches; an empty grid cannot say its patch size")
        first = rows[0]
        return cls(
            coords=np.array([[int(r["x"]), int(r["y"])] for r in rows], dtype=np.int64),
            patch_size=int(first["patch_size"]),
            mpp=float(first["mpp"]) if first["mpp"] else None,
            size_level0=float(first["size_level0"]),
            tissue_fraction=np.array([float(r["tissue_fraction"]) for r in rows]),
            stride_level0=float(first["stride_level0"]),
            level=int(first["level"]) if first["level"] else None,
        )


def patch_grid(
    slide: Slide,
    patch_size: int = 256,
    mpp: float | None = 0.5,
    overlap: float = 0.0,
    min_tissue: float = 0.5,
    tissue: TissueMask | None = None,
    *,
    level: int | None = None,
) -> PatchGrid:
    """Patches of ``patch_size`` px at ``mpp`` µm/px whose tissue fraction is at least ``min_tissue``.

    Each patch covers ``patch_size * mpp / slide.mpp`` level-0 px and lies wholly inside the slide
    (no white padding reaches a model); neighbours are ``(1 - overlap)`` of that apart. ``tissue`` is
    computed with :func:`tissue_mask` when not given, except with ``min_tissue=0``, which keeps
    every patch. ``level`` reads native pixels of that pyramid level instead of a physical
    resolution (and then ``mpp`` is ignored): the way out for slides whose pixel size is unknown.
    """
    patch_size = int(patch_size)
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap is a fraction of the patch in [0, 1), got {overlap}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue is a fraction in [0, 1], got {min_tissue}")

    if level is not None:
        if not 0 <= level < len(slide.downsamples):
            raise ValueError(f"level {level} does not exist (the slide has {len(slide.downsamples)})")
        size0 = patch_size * float(slide.downsamples[level])
        grid_mpp = None if slide.mpp is None else slide.level_mpp(level)
    else:
        if mpp is None:
            raise ValueError("give mpp= (µm/px of the patches) or level= (a pyramid level)")
        if mpp <= 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        if slide.mpp is None:
            raise MissingMppError(slide.path)
        size0 = patch_size * float(mpp) / slide.mpp
        grid_mpp = float(mpp)
    stride0 = max(size0 * (1.0 - overlap), 1.0)

    height, width = slide.level_shapes[0]
    xs = _positions(width, size0, stride0)
    ys = _positions(height, size0, stride0)
    gx, gy = np.meshgrid(xs, ys)  # rows of y, x varying fastest: row-major reading order
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)

    if tissue is None and min_tissue > 0:
        from .tissue import tissue_mask

        tissue = tissue_mask(slide)
    if tissue is not None:
        if tuple(tissue.slide_shape) != (height, width):
            raise ValueError(
                f"the tissue mask was made for a {tissue.slide_shape[1]}x{tissue.slide_shape[0]} slide, "
                f"not this {width}x{height} one"
            )
        fractions = tissue.fractions(coords, size0)
        keep = fractions >= min_tissue if min_tissue > 0 else np.ones(len(coords), bool)
        if min_tissue > 0:
            keep &= fractions > 0
        coords, fractions = coords[keep], fractions[keep]
    else:
        fractions = np.full(len(coords), np.nan)
    return PatchGrid(
        coords=coords, patch_size=patch_size, mpp=grid_mpp, size_level0=size0, tissue_fraction=fractions,
        stride_level0=stride0, level=level, slide_path=str(slide.path),
    )


def _positions(extent: int, size0: float, stride0: float) -> np.ndarray:
    """Top-left positions of whole patches along one axis, floored so the last patch stays inside."""
    if extent < size0:
        return np.zeros(0, np.int64)
    count = int(math.floor((extent - size0) / stride0 + 1e-9)) + 1
    return np.floor(np.arange(count) * stride0).astype(np.int64)


class PatchReader:
    """Batches ``(coords (B, 2), patches (B, P, P, 3) uint8)`` of a grid, in grid order.

    Patches are read by ``num_workers`` threads (tile decoding and resizing release the GIL), each
    taking a contiguous run of the batch so that neighbours reuse the tiles just decoded into the
    slide's tile cache. At most ``prefetch`` batches are being read ahead of the one handed out, so
    memory stays at ``(prefetch + 1) * batch_size`` patches however long the grid. Stopping early
    (``break``, ``close()``, leaving a ``with`` block) cancels what is queued and joins the threads.
    """

    def __init__(self, slide: Slide, grid: PatchGrid, batch_size: int = 64, num_workers: int = 4, prefetch: int = 2):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 (read in the calling thread) or more, got {num_workers}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        if grid.level is None and grid.mpp is None:
            raise ValueError("the grid has neither an mpp nor a level to read at")
        self.slide = slide
        self.grid = grid
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.prefetch = int(prefetch)
        # Weak: an iteration dropped by its consumer is collected (and its pool joined) as usual.
        self._active: weakref.WeakSet[Generator[tuple[np.ndarray, np.ndarray], None, None]] = weakref.WeakSet()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Number of batches."""
        return -(-len(self.grid) // self.batch_size)

    def read_patch(self, index: int) -> np.ndarray:
        """One patch of the grid, (P, P, 3) uint8: exactly what the batches contain."""
        x, y = (int(v) for v in self.grid.coords[index])
        p = self.grid.patch_size
        if self.grid.level is not None:
            return self.slide.read_region((x, y), (p, p), level=self.grid.level)
        return self.slide.read_region((x, y), (p, p), mpp=self.grid.mpp)

    def _fill(self, out: np.ndarray, start: int, stop: int, offset: int, cancelled: threading.Event) -> None:
        for i in range(start, stop):
            if cancelled.is_set():
                return
            out[i - offset] = self.read_patch(i)

    def _submit(
        self, pool: ThreadPoolExecutor, start: int, cancelled: threading.Event
    ) -> tuple[np.ndarray, np.ndarray, list[Future[None]]]:
        stop = min(start + self.batch_size, len(self.grid))
        p = self.grid.patch_size
        out = np.empty((stop - start, p, p, 3), np.uint8)
        pieces = min(self.num_workers, stop - start)
        bounds = np.linspace(start, stop, pieces + 1).round().astype(int)
        futures = [
            pool.submit(self._fill, out, int(a), int(b), start, cancelled)
            for a, b in zip(bounds[:-1], bounds[1:])
            if b > a
        ]
        return self.grid.coords[start:stop].copy(), out, futures

    def _batches(self) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
        n = len(self.grid)
        starts = iter(range(0, n, self.batch_size))
        if self.num_workers == 0:
            for start in starts:
                stop = min(start + self.batch_size, n)
                out = np.empty((stop - start, self.grid.patch_size, self.grid.patch_size, 3), np.uint8)
                self._fill(out, start, stop, start, threading.Event())
                yield self.grid.coords[start:stop].copy(), out
            return
        cancelled = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix=THREAD_PREFIX)
        pending: deque[tuple[np.ndarray, np.ndarray, list[Future[None]]]] = deque()
        try:
            for start in starts:
                pending.append(self._submit(pool, start, cancelled))
                if len(pending) >= self.prefetch:
                    break
            while pending:
                coords, out, futures = pending.popleft()
                for future in futures:
                    future.result()  # re-raises a reading error (a SlideError naming the file) here
                start = next(starts, None)
                if start is not None:
                    pending.append(self._submit(pool, start, cancelled))
                yield coords, out
        finally:
            cancelled.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        gen = self._batches()
        with self._lock:
            self._active.add(gen)
        return gen

    def close(self) -> None:
        """Stop every iteration still running over this reader and join its threads."""
        with self._lock:
            active = list(self._active)
            self._active.clear()
        for gen in active:
            gen.close()  # runs the generator's finally: cancel queued reads, join the pool

    def __enter__(self) -> PatchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["PatchGrid", "PatchReader", "patch_grid", "THREAD_PREFIX"]
