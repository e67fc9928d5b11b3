"""Where things are on a synthetic slide: tissue sections, tumour regions, their mucinous parts, lymphoid
aggregates.

Each is a smooth field (``fields.Field``) that is positive where the thing is; the model thresholds them for
rendering and for the ground truth alike, so the truth is exact. Every function draws from the random stream
it is given, in a fixed order: the same seed places everything in the same place.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from napari_wsimil.slide.synthetic.fields import Cull, Field, Grid, bump_axes, grid_shape, physical_grid
from napari_wsimil.slide.synthetic.noise import smooth_noise

#: ``quantile(field, q)``: the ``q`` quantile of a field over the slide's tissue (the model's)
Quantile = Callable[[Field, float], float]


def sections(rng: np.random.Generator, shape: tuple[int, int], cell: float, k: int) -> np.ndarray:
    """Max of k elliptical potentials (1 at a centre, 0 on the rim) laid out along the long axis."""
    H, W = shape
    gh, gw = grid_shape(shape, cell)
    gy = (np.arange(gh) + 0.5) * cell
    gx = (np.arange(gw) + 0.5) * cell
    long_is_x = W >= H
    length, short = (W, H) if long_is_x else (H, W)
    band = length / k
    pot = np.full((gh, gw), -1.0)
    for j in range(k):
        c_long = band * (j + 0.5) + rng.uniform(-0.06, 0.06) * band
        c_short = short * (0.5 + rng.uniform(-0.08, 0.08))
        a = 0.42 * min(band, 1.6 * short) * rng.uniform(0.75, 1.0)  # along the long axis
        b = 0.40 * short * rng.uniform(0.65, 1.0)
        ang = rng.uniform(-0.35, 0.35)
        cy, cx = (c_short, c_long) if long_is_x else (c_long, c_short)
        dy = gy[:, None] - cy
        dx = gx[None, :] - cx
        if long_is_x:
            u, v = dx * np.cos(ang) + dy * np.sin(ang), -dx * np.sin(ang) + dy * np.cos(ang)
        else:
            u, v = dy * np.cos(ang) + dx * np.sin(ang), -dy * np.sin(ang) + dx * np.cos(ang)
        pot = np.maximum(pot, 1.0 - np.sqrt((u / a) ** 2 + (v / b) ** 2))
    return pot


def place_tumour(rng: np.random.Generator, pot: np.ndarray, cell: float, scale_px: float,
                 shape: tuple[int, int], um: float, rough: Grid, quantile: Quantile,
                 share: tuple[float, float] = (0.005, 0.08)) -> tuple[Field, float, Cull]:
    """1-3 tumour regions inside tissue, irregular, sized to a target share of the tissue area.

    ``pot`` is the tissue potential on cells of ``cell`` px (``scale_px`` px per unit of it), ``um``
    pixels per micrometre, ``rough`` the tissue edge's roughness, ``share`` the range the target share is
    drawn from (log-uniform; the default is the generator's original range, the same draw). Returns the
    tumour field (tumour where it
    is > 0), the target share of the tissue, and where the field can be positive.
    """
    inside = pot * scale_px  # approximate distance into tissue, px
    tissue_area = float((inside > 0).sum()) * cell * cell
    target = float(np.exp(rng.uniform(np.log(share[0]), np.log(share[1]))))
    n = int(rng.integers(1, 4))
    shares = rng.dirichlet(np.full(n, 2.0))
    sigmas = np.sqrt(target * tissue_area * shares / (2 * np.pi * np.log(2)))
    sigmas = np.maximum(sigmas, 20 * um)  # a region is at least a few nuclei across
    ys, xs = (np.arange(s) * cell + cell / 2 for s in pot.shape)
    centres = []
    for s in sigmas:
        ok = np.argwhere(inside > 2.2 * s)
        if len(ok) == 0:
            ok = np.argwhere(inside >= inside.max() * 0.8)
        iy, ix = ok[rng.integers(len(ok))]
        centres.append((ys[iy], xs[ix]))
    centres_a = np.array(centres, np.float64)

    tcell, gy, gx = bump_axes(shape, sigmas)
    field = np.zeros((len(gy), len(gx)), np.float32)
    for (cy, cx), s in zip(centres_a, sigmas):
        e = rng.uniform(0.6, 1.0)  # elongation
        a = rng.uniform(0, np.pi)
        dy = gy[:, None] - cy
        dx = gx[None, :] - cx
        u = (dy * np.cos(a) + dx * np.sin(a)) / (s / np.sqrt(e))
        v = (-dy * np.sin(a) + dx * np.cos(a)) / (s * np.sqrt(e))
        bump = np.exp(-0.5 * (u * u + v * v)).astype(np.float32)
        field = np.maximum(field, bump * float(rng.uniform(0.85, 1.0)))
    # multiplicative lobulation: irregular, with satellite nodules, and zero far from every region
    field *= 1.0 + 0.55 * smooth_noise(rng, field.shape, 1.5)
    grid = Grid(field, tcell, shape)
    # ~px of boundary displacement per unit of field: 1/(slope of a gaussian at half maximum)
    slope_px = float(np.median(sigmas)) / 0.59
    thr = quantile(Field([(slope_px, grid), (4 * um, rough)]), 1 - target)
    tumour = Field([(slope_px, grid), (4 * um, rough)], offset=-thr)
    # cull: tumour pixels (ramp > 0, i.e. field > -1/0.35) need the grid term above this level
    rough_max = float(np.abs(rough.v).max()) * 1.3
    return tumour, target, Cull(grid, (thr - 1.5 - 4 * um * rough_max) / slope_px)


def place_mucin(seed: int, shape: tuple[int, int], um: float, gt_axes: tuple[np.ndarray, np.ndarray],
                tumour: np.ndarray, share: float) -> Field:
    """Which parts of the tumour are mucinous: a smooth field thresholded so that ``share`` of the tumour
    area (``tumour``, the ground truth on the grid ``gt_axes``) is above 0. Its own random stream (from
    ``seed``), so the rest of the slide is the same as without it."""
    rng = np.random.default_rng(np.random.SeedSequence([seed & (2**64 - 1), 0x3C1D]))
    cell = 60 * um
    grid = physical_grid(rng, shape, cell, 1.5)
    gain = cell / 2  # unit SD over a cell -> about a pixel of boundary displacement per unit
    gy, gx = gt_axes
    tumour = tumour.astype(bool)
    vals = (grid.sample(gy, gx) * np.float32(gain))[tumour]
    if share >= 1.0 or not vals.size:
        thr = -np.inf if share >= 1.0 else np.inf
    else:
        thr = float(np.quantile(vals, 1.0 - share))
    return Field([(gain, grid)], offset=-thr if np.isfinite(thr) else (1e9 if thr < 0 else -1e9))


def place_aggregates(rng: np.random.Generator, pot: np.ndarray, cell: float, scale_px: float,
                     shape: tuple[int, int], um: float, share: float, quantile: Quantile
                     ) -> tuple[Field, Cull]:
    """Round lymphoid aggregates inside tissue covering ``share`` of it (arguments as ``place_tumour``'s).

    Returns their field (aggregate where it is > 0) and where it can be positive."""
    inside = pot * scale_px
    tissue_area = float((inside > 0).sum()) * cell * cell
    n = int(rng.integers(3, 7))
    # bumps whose half-maximum discs together hold ~1.5x the target area, at least 25 µm across
    sigmas = np.full(n, np.sqrt(1.5 * share * tissue_area / n / (2 * np.pi * np.log(2))))
    sigmas *= rng.uniform(0.7, 1.3, n)
    sigmas = np.maximum(sigmas, 12 * um)
    ys, xs = (np.arange(k) * cell + cell / 2 for k in pot.shape)
    tcell, gy, gx = bump_axes(shape, sigmas)
    field = np.zeros((len(gy), len(gx)), np.float32)
    for s in sigmas:
        ok = np.argwhere(inside > 1.5 * s)
        if len(ok) == 0:
            ok = np.argwhere(inside >= inside.max() * 0.8)
        iy, ix = ok[rng.integers(len(ok))]
        d2 = (gy[:, None] - ys[iy]) ** 2 + (gx[None, :] - xs[ix]) ** 2
        field = np.maximum(field, np.exp(-0.5 * d2 / (s * s)).astype(np.float32))
    grid = Grid(field, tcell, shape)
    slope_px = float(np.median(sigmas)) / 0.59
    thr = quantile(Field([(slope_px, grid)]), 1 - share)
    return Field([(slope_px, grid)], offset=-thr), Cull(grid, (thr - 3.0) / slope_px)
