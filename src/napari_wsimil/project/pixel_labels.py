"""Pixel labels of a project's slides: their geometry over the slide, and checks of painted arrays.

Each slide's labels are stored in a chunked, durable raster (:mod:`napari_wsimil.io.raster_store`:
512x512 zarr chunks, each written atomically), so a brush stroke rewrites a few kilobytes.

Geometry. The array covers the whole slide at ``downsample`` level-0 px per label pixel:
``shape = ceil(slide_dim / downsample)``; label pixel (i, j) covers level-0 corners
``[j·d, (j+1)·d) x [i·d, (i+1)·d)``. The downsample comes from the project's label µm/px and the
slide's µm/px and is stored in the array's attributes, so labels stay aligned with the slide even
if the slide's µm/px override changes later.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io.raster_store import label_shape
from .classes import MAX_CLASS_ID, ClassDef
from .errors import ProjectError

NO_MPP_DOWNSAMPLE = 8.0

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), end-exclusive, label pixels


@dataclass(frozen=True)
class LabelGeometry:
    """Where a slide's label array sits: ``downsample`` level-0 px per label px, its µm/px (None when
    the slide's pixel size is unknown) and ``shape`` (h, w). ``note`` explains anything unusual."""

    downsample: float
    mpp: float | None
    shape: tuple[int, int]
    note: str | None = None


def compute_geometry(dimensions: tuple[int, int], slide_mpp: float | None, label_mpp: float) -> LabelGeometry:
    if slide_mpp is None:
        ds = NO_MPP_DOWNSAMPLE
        return LabelGeometry(ds, None, label_shape(dimensions, ds),
                             f"the slide does not record its pixel size, so its labels use a fixed downsample "
                             f"of {ds:g} instead of {label_mpp:g} µm/px; set the slide's µm/px before labelling "
                             "to get the project's resolution")
    ds = label_mpp / slide_mpp
    if ds < 1.0:
        return LabelGeometry(1.0, slide_mpp, label_shape(dimensions, 1.0),
                             f"the slide's pixels ({slide_mpp:g} µm) are coarser than the label resolution "
                             f"({label_mpp:g} µm/px); labels use the slide's own pixels")
    return LabelGeometry(ds, float(label_mpp), label_shape(dimensions, ds))  # exactly, not slide_mpp * ds




def count_values(array: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Pixels per value 0-255 of a uint8 array, added to ``counts``.

    bincount is linear (np.unique would sort 156 MB) but casts its input to int64, 8 bytes a pixel:
    going through ~1 Mpx row blocks keeps that temporary at 8 MB whatever the array size.
    """
    if counts is None:
        counts = np.zeros(256, np.int64)
    arr = np.asarray(array, np.uint8)
    if arr.ndim != 2:
        arr = arr.reshape(1, -1)
    step = max(1, (1 << 20) // max(1, arr.shape[1]))
    for y in range(0, arr.shape[0], step):
        block = arr[y:y + step]
        if block.size:
            counts += np.bincount(block.ravel(), minlength=256)
    return counts


def class_counts(array: np.ndarray, boxes: Iterable[Box] | None = None) -> np.ndarray:
    """Pixels per value 0-255 in the whole array or in the given (y0, y1, x0, x1) boxes."""
    counts = np.zeros(256, np.int64)
    if boxes is None:
        return count_values(array, counts)
    for y0, y1, x0, x1 in boxes:
        count_values(array[max(0, y0):max(0, y1), max(0, x0):max(0, x1)], counts)
    return counts


def as_label_array(array: Any, shape: tuple[int, int], slide_id: str) -> np.ndarray:
    """The caller's array as uint8 of the label shape, or a ProjectError saying what is wrong."""
    arr = np.asarray(array)
    if arr.shape != tuple(shape):
        raise ProjectError(f"pixel labels of '{slide_id}' must be {shape[0]} x {shape[1]} (h x w, the slide at "
                           f"label resolution), got {' x '.join(map(str, arr.shape))}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ProjectError(f"pixel labels of '{slide_id}' must be integer class ids, got {arr.dtype}")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0 or hi > 255:
        raise ProjectError(f"pixel labels of '{slide_id}' hold values {lo}..{hi}; class ids are 0-255")
    return arr.astype(np.uint8)


def store_path(root: Path, slide_id: str) -> Path:
    return root / "labels" / f"{slide_id}.zarr"


def check_class_ids(counts: np.ndarray, slide_id: str, classes: Sequence[ClassDef]) -> None:
    """Refuse labels holding values that are not ids of ``classes`` (``counts``: pixels per value 0-255)."""
    known = {c.id for c in classes}
    bad = [int(v) for v in np.flatnonzero(counts) if int(v) not in known]
    if bad:
        raise ProjectError(f"labels of '{slide_id}' contain values that are not class ids: "
                           + ", ".join(f"{v} ({counts[v]:,} px)" for v in bad)
                           + f"; classes: {', '.join(f'{c.id} {c.name}' for c in classes)}")


def value_lut(values: Mapping[int, int] | None) -> np.ndarray:
    """A 256-entry lookup table mapping mask values to class ids: identity except where ``values`` says."""
    lut = np.arange(256, dtype=np.uint8)
    for k, v in (values or {}).items():
        if not (0 <= int(k) <= 255 and 0 <= int(v) <= MAX_CLASS_ID):
            raise ProjectError(f"value mapping {k} -> {v}: both must be 0-255")
        lut[int(k)] = int(v)
    return lut
