"""Mask values under patches: a grid of points in each patch, read from a low-resolution mask.

Shared by tile labels (what the user painted under each patch) and localisation metrics (how much of a
patch is tumour in the ground truth). Masks cover the slide at ``downsample`` level-0 px per pixel:
mask pixel (i, j) covers level-0 x in [j·d, (j+1)·d), y in [i·d, (i+1)·d). Patches are level-0 (x, y)
top-left corners with a side of ``size_level0`` level-0 px.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import numpy as np

#: a 2-D mask array, or ``lookup(rows, cols) -> mask[np.ix_(rows, cols)]`` (MaskImage.points, LabelStore.read_points)
Lookup = Union[np.ndarray, Callable[[np.ndarray, np.ndarray], np.ndarray]]


def lookup_shape(lookup: Lookup) -> tuple[int, int] | None:
    """The mask's (rows, cols) when it can be found: an array, or a bound method of an object with .shape
    (``MaskImage.points``), or a callable with .shape.

    Public because a :data:`Lookup` is read elsewhere too: :mod:`napari_wsimil.seg.data` scans painted
    label masks given the same way, band by band, and needs their size first."""
    for obj in (lookup, getattr(lookup, "__self__", None)):
        shape = getattr(obj, "shape", None)
        if shape is not None and len(shape) >= 2:
            return int(shape[0]), int(shape[1])
    return None


def patch_samples(coords: np.ndarray, size_level0: float, lookup: Lookup, downsample: float,
                  samples: int = 8, *, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Mask values at ``samples`` × ``samples`` points (sub-cell centres) of each patch: (N, samples²).

    Points map to mask pixel (floor(y/d), floor(x/d)), clipped into the mask so edge patches that reach
    past it read the edge pixel. The clipping needs the mask shape: from the array, from
    ``lookup.__self__.shape`` / ``lookup.shape``, or ``shape=``; without one, only negatives are clipped.
    Patches whose sample points fall in the same mask rows (patches sharing a y; or, for single points,
    every point in one mask row) are read with one call (sorted unique rows and the sorted unique columns of
    those patches): few calls, and never an index grid over the whole mask.
    """
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    d = float(downsample)
    if not d > 0:
        raise ValueError(f"downsample must be > 0, got {downsample}")
    if isinstance(lookup, np.ndarray):
        arr = lookup
        if arr.ndim != 2:
            raise ValueError(f"a mask array must be 2-D, got shape {arr.shape}")
        read: Callable[[np.ndarray, np.ndarray], np.ndarray] = lambda r, c: arr[np.ix_(r, c)]  # noqa: E731
    else:
        read = lookup
    if n == 0:
        return np.zeros((0, samples * samples), np.uint8)
    mshape = shape if shape is not None else lookup_shape(lookup)
    hi_r, hi_c = (mshape[0] - 1, mshape[1] - 1) if mshape is not None else (None, None)

    offsets = (np.arange(samples) + 0.5) * (float(size_level0) / samples)
    rows = np.clip(np.floor((xy[:, 1:2] + offsets) / d).astype(np.int64), 0, hi_r)  # (N, s)
    cols = np.clip(np.floor((xy[:, 0:1] + offsets) / d).astype(np.int64), 0, hi_c)  # (N, s)

    out = None
    # by the mask rows read, not by y: points a few level-0 px apart in y mostly read the same mask row
    _, group = np.unique(rows, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])
    for members in np.split(order, starts[1:]):
        ur, ir = np.unique(rows[members[0]], return_inverse=True)
        uc, ic = np.unique(cols[members], return_inverse=True)
        vals = np.asarray(read(ur, uc))
        if vals.shape != (len(ur), len(uc)):
            raise ValueError(f"lookup(rows, cols) returned shape {vals.shape}, expected {(len(ur), len(uc))}")
        if out is None:
            out = np.zeros((n, samples * samples), vals.dtype)
        grid = vals[ir.reshape(-1)[None, :, None], ic.reshape(len(members), samples)[:, None, :]]
        out[members] = grid.reshape(len(members), -1)
    return out


__all__ = ["Lookup", "lookup_shape", "patch_samples"]
