"""Tumour masks and outlines cut from a probability map at the run's threshold, for QuPath and other tools.

``wsimil predict --masks`` writes, per slide, ``PRED/masks/<slide_id>.ome.tif`` (1 = tumour, 0 = the rest, at
the map's µm/px, pyramidal: the project's mask writer, fed band by band from the zarr map, so a mask never sits
in memory whole) and ``PRED/masks/<slide_id>.geojson`` (the tumour as QuPath polygons in level-0 px).

Outlines need the mask as one array. Up to ``max_side`` px a side that is the map itself; a larger map is
reduced by powers of two first, a coarse pixel being tumour when any map pixel under it is, so that a lesion
smaller than a coarse pixel still gets an outline (a slightly larger one). Memory is then bounded by
``max_side``² bytes, whatever the slide's size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..io.mask_writers import LabelSampler, write_ome_tiff
from ..io.raster_store import LabelStore
from ..project.pixel_labels import LabelGeometry
from .data import SegSlide
from .operating_point import threshold_level

BAND = 256  # coarse rows per read when reducing for outlines
TUMOUR_CLASS = "Tumor"  # QuPath's built-in class name
TUMOUR_COLOR = "#c83232"


class _TumourSampler(LabelSampler):
    """The map's pixels as class ids: 1 where p ≥ threshold, else 0."""

    def __init__(self, store: LabelStore, geometry: LabelGeometry, threshold: float):
        super().__init__(store, geometry)
        self.level = threshold_level(threshold)

    def band(self, out_ds: float, y0: int, y1: int, width: int) -> np.ndarray:
        return (super().band(out_ds, y0, y1, width) >= self.level).astype(np.uint8)


def write_tumour_mask(map_zarr: Path, path: Path, slide: SegSlide, mpp: float, threshold: float,
                      extra: dict[str, Any] | None = None) -> Path:
    """The map (at ``mpp``) cut at ``threshold`` as a pyramidal OME-TIFF of class ids (0 other, 1 tumour)."""
    store = LabelStore.open(map_zarr, readonly=True)
    g = LabelGeometry(slide.downsample(mpp), float(mpp), store.shape)
    meta = {"wsimil": {"slide_id": slide.slide_id, "downsample": g.downsample, "mpp": g.mpp,
                       "slide_dimensions": [slide.shape0[1], slide.shape0[0]], "threshold": float(threshold),
                       "classes": [{"id": 0, "name": "other"}, {"id": 1, "name": "tumour"}], **(extra or {})}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_ome_tiff(path, _TumourSampler(store, g, threshold), (slide.shape0[1], slide.shape0[0]), g.downsample, g.mpp,
                   slide.slide_id, json.dumps(meta))
    return path


def tumour_grid(map_zarr: Path, downsample: float, threshold: float, max_side: int = 8192
                ) -> tuple[np.ndarray, float]:
    """(mask, level-0 px per mask px) of a map at ``downsample`` level-0 px per px: the map at or above
    ``threshold``, max-reduced by 2^k until its long side is at most ``max_side``."""
    store = LabelStore.open(map_zarr, readonly=True)
    h, w = store.shape
    f = 1
    while max(-(-h // f), -(-w // f)) > max_side:
        f *= 2
    level = threshold_level(threshold)
    gh, gw = -(-h // f), -(-w // f)
    out = np.zeros((gh, gw), bool)
    for r0 in range(0, gh, BAND):
        r1 = min(gh, r0 + BAND)
        block = store.read_block(r0 * f, min(h, r1 * f), 0, w) >= level
        block = np.pad(block, ((0, (r1 - r0) * f - block.shape[0]), (0, gw * f - w)))
        out[r0:r1] = block.reshape(r1 - r0, f, gw, f).any(axis=(1, 3))
    return out, float(downsample) * f


def write_tumour_outlines(map_zarr: Path, path: Path, slide: SegSlide, mpp: float, threshold: float,
                          max_side: int = 8192) -> tuple[Path, int]:
    """The tumour (p ≥ ``threshold``) as QuPath GeoJSON polygons in level-0 px; returns the path and the count."""
    from ..infer.heatmap import threshold_polygons
    from ..project.annotations import Annotation, write_geojson

    mask, ds = tumour_grid(map_zarr, slide.downsample(mpp), threshold, max_side)
    polys = threshold_polygons(mask.astype(np.float32), ds, 0.5, bounds=(slide.shape0[1], slide.shape0[0]))
    name = f"p ≥ {threshold:.3f}"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_geojson(path, [Annotation(p, TUMOUR_CLASS, "polygon", name=name) for p in polys],
                  {TUMOUR_CLASS: TUMOUR_COLOR})
    return path, len(polys)


__all__ = ["tumour_grid", "write_tumour_mask", "write_tumour_outlines"]
