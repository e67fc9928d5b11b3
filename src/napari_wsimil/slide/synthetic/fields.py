"""Smooth scalar fields on coarse grids, read anywhere by Catmull-Rom interpolation.

Why: a slide's layout (tissue, holes, tumour, mucin, aggregates) and the textured renderer's class and look
fields are all such fields; storing them on grids of at most ~1000 cells a side (or periodic ones of fixed
size) keeps memory independent of slide size, and the same value comes out whichever tile asks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from napari_wsimil.slide.synthetic.noise import smooth_noise

_POWERS = np.arange(4.0)
# rows: coefficients of 1, t, t^2, t^3; columns: the 4 taps (Catmull-Rom spline, tension 0.5)
_CATMULL_ROM = np.array([[0.0, 1.0, 0.0, 0.0],
                         [-0.5, 0.0, 0.5, 0.0],
                         [1.0, -2.5, 2.0, -0.5],
                         [-0.5, 1.5, -1.5, 0.5]])


class Grid:
    """A smooth scalar field stored on a coarse grid of square cells covering the slide.

    Read by separable Catmull-Rom interpolation: C1-continuous, so thresholded boundaries are smooth
    curves rather than polygons, and the same value comes out whichever tile asks. Past the grid's
    edge a plain grid repeats its edge value; a ``periodic`` one wraps around, which lets textures
    defined in micrometres (holes, edge roughness) use a grid of fixed size on any slide size.
    """

    def __init__(self, values: np.ndarray, cell: float, shape: tuple[int, int], periodic: bool = False):
        self.cell = float(cell)
        self.shape = shape
        self.periodic = periodic
        self.v = np.ascontiguousarray(values, np.float32)
        # row weights of the last few tile rows: tiles are rendered row by row, so all tiles of a
        # row share them (read and written by several threads; entries are immutable, races benign)
        self._row_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _wrap(self, idx: np.ndarray, axis: int) -> np.ndarray:
        n = self.v.shape[axis]
        return idx % n if self.periodic else np.minimum(np.maximum(idx, 0), n - 1)

    def _taps(self, p: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        g = np.minimum(np.maximum(p, 0.0), limit - 1.0)
        g *= 1.0 / self.cell
        g += 0.5 / self.cell - 0.5
        i = np.floor(g)
        t = g - i
        powers = t[:, None] ** _POWERS
        return i.astype(np.intp) - 1, powers @ _CATMULL_ROM  # grid index of the first of 4 taps

    def _matrix(self, p: np.ndarray, limit: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
        i, w = self._taps(p, limit)
        lo = int(i.min())
        span = int(i.max()) - lo + 4
        mat = np.zeros((len(p), span), np.float32)
        mat[np.arange(len(p))[:, None], (i - lo)[:, None] + np.arange(4)] = w
        return self._wrap(np.arange(lo, lo + span), axis), mat

    def sample(self, ys: np.ndarray, xs: np.ndarray, row_key: int | None = None) -> np.ndarray:
        """Values on the outer product of pixel rows ``ys`` and columns ``xs`` (float32).

        ``row_key`` (a tile's first row) lets the tiles of one row reuse the row weights.
        """
        cached = None if row_key is None else self._row_cache.get(row_key)
        if cached is None:
            cached = self._matrix(ys, self.shape[0], 0)
            if row_key is not None:
                if len(self._row_cache) >= 8:
                    self._row_cache.clear()
                self._row_cache[row_key] = cached
        ry, my = cached
        rx, mx = self._matrix(xs, self.shape[1], 1)
        return _matmul(my @ self.v[np.ix_(ry, rx)], mx.T)

    def points(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Values at the points (ys[i], xs[i]) (float64)."""
        iy, wy = self._taps(np.asarray(ys, np.float64), self.shape[0])
        ix, wx = self._taps(np.asarray(xs, np.float64), self.shape[1])
        r = np.arange(4)
        vals = self.v[self._wrap(iy[:, None] + r, 0)[:, :, None], self._wrap(ix[:, None] + r, 1)[:, None, :]]
        return np.einsum("ni,nij,nj->n", wy, vals, wx)


class Field:
    """A weighted sum of grids plus an offset, in units where 1 is about one pixel of displacement."""

    def __init__(self, terms: list[tuple[float, Grid]], offset: float = 0.0):
        self.terms = terms
        self.offset = float(offset)

    def sample(self, ys: np.ndarray, xs: np.ndarray, row_key: int | None = None) -> np.ndarray:
        out = None
        for c, g in self.terms:
            v = g.sample(ys, xs, row_key)
            v *= np.float32(c)
            out = v if out is None else out + v
        assert out is not None
        if self.offset:
            out += np.float32(self.offset)
        return out

    def points(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Values at the points (ys[i], xs[i]) (float64)."""
        return sum(c * g.points(ys, xs) for c, g in self.terms) + self.offset


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b, cut into row blocks small enough that OpenBLAS stays on the calling thread.

    Tile-sized products (256x12 @ 12x256) are just over OpenBLAS's threading threshold; threading them
    from several render workers on a busy machine made each 100x slower. Large products (ground-truth
    strips, computed once) are left whole, where threads pay off.
    """
    m, k = a.shape
    n = b.shape[1]
    if m * n * k < 200_000 or m * n * k > 20_000_000:
        return a @ b
    step = max(1, 200_000 // (n * k))
    out = np.empty((m, n), np.result_type(a, b))
    for s in range(0, m, step):
        np.matmul(a[s:s + step], b, out=out[s:s + step])
    return out


def blockwise(gy: np.ndarray, gx: np.ndarray,
              fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Evaluate a boolean field on the grid gy x gx in 256 x 256 blocks, so the interpolation
    matrices stay small whatever the slide size (a whole row of a 60k slide would need ~20 MB).

    The model's ground truth and tissue mask are computed this way."""
    out = np.zeros((len(gy), len(gx)), np.uint8)
    for r in range(0, len(gy), 256):
        for c in range(0, len(gx), 256):
            out[r:r + 256, c:c + 256] = fn(gy[r:r + 256], gx[c:c + 256])
    return out


def _window_max(a: np.ndarray, r: int, mode: str = "edge") -> np.ndarray:
    """Maximum over the (2r+1)^2 neighbourhood (np.pad ``mode`` past the edges), separably."""
    h, w = a.shape
    padded = np.pad(a, ((r, r), (0, 0)), mode=mode)
    out = a.copy()
    for d in range(2 * r + 1):
        np.maximum(out, padded[d:d + h], out=out)
    padded = np.pad(out, ((0, 0), (r, r)), mode=mode)
    for d in range(2 * r + 1):
        np.maximum(out, padded[:, d:d + w], out=out)
    return out


class Cull:
    """Which coarse cells of a grid could interpolate to a value >= ``lower``: a per-tile shortcut.

    Catmull-Rom output exceeds the largest of its 4x4 taps by at most 0.14x their range (its
    negative lobes sum to about -0.13), so testing max + 0.15 * (max - min) over a 5x5 window, then
    growing by one cell, never misses a pixel where the value could reach ``lower``.
    """

    def __init__(self, grid: Grid, lower: float):
        mode = "wrap" if grid.periodic else "edge"
        hi = _window_max(grid.v, 2, mode)
        span = _window_max(-grid.v, 2, mode)  # -min
        span += hi  # max - min
        span *= 0.15
        span += hi
        self.ok = _window_max(span >= lower, 1, mode)
        self.grid = grid

    def any_near(self, y0: float, y1: float, x0: float, x1: float) -> bool:
        """Whether rows [y0, y1) x columns [x0, x1) (level-0 px) may reach the level."""
        g = self.grid
        H, W = g.shape
        iy0, iy1 = (int(np.floor((min(max(v, 0), H - 1) + 0.5) / g.cell - 0.5)) for v in (y0, y1))
        ix0, ix1 = (int(np.floor((min(max(v, 0), W - 1) + 0.5) / g.cell - 0.5)) for v in (x0, x1))
        rows = g._wrap(np.arange(iy0 - 1, iy1 + 3), 0)
        cols = g._wrap(np.arange(ix0 - 1, ix1 + 3), 1)
        return bool(self.ok[np.ix_(rows, cols)].any())


PHYSICAL_PERIOD = 512  # cells: micrometre-scale noise repeats after 512 cells (>= 15 mm), never seen


def physical_grid(rng: np.random.Generator, shape: tuple[int, int], cell: float, sigma: float,
                  offset: float = 0.0) -> Grid:
    """Smooth noise at a scale fixed in micrometres, on a periodic grid of bounded size, so its
    memory does not grow with the slide.

    Public because both the model's layout (roughness, holes, regional variation, mucin) and the textured
    renderer's class and look fields are made of it."""
    gh, gw = (min(n, PHYSICAL_PERIOD) for n in grid_shape(shape, cell))
    return Grid(smooth_noise(rng, (gh, gw), sigma, periodic=True) + offset, cell, shape, periodic=True)


def bump_axes(shape: tuple[int, int], sigmas: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Cell size and cell-centre coordinates of a grid fine enough for the narrowest of ``sigmas`` (three
    cells per sigma) and at most ~1024 cells a side: where ``layout`` lays the bumps of tumour regions and
    aggregates."""
    tcell = max(float(sigmas.min()) / 3.0, max(shape) / 1024)
    gh, gw = grid_shape(shape, tcell)
    return tcell, (np.arange(gh) + 0.5) * tcell - 0.5, (np.arange(gw) + 0.5) * tcell - 0.5


def grid_shape(shape: tuple[int, int], cell: float) -> tuple[int, int]:
    """Cells a side of a grid of ``cell``-px cells covering a slide of ``shape`` px (at least 1): shared by
    the grids here and the tissue sections of ``layout``, so both cover the slide the same way."""
    return max(1, math.ceil(shape[0] / cell)), max(1, math.ceil(shape[1] / cell))
