"""Tile (instance) labels for MS-CLAM from what the user drew: painted pixel labels, boxes and polygons.

MS-CLAM's gain over CLAM comes from a few slides whose tiles are known to be tumour or normal. Users
never label tiles; they paint pixels at the label resolution (a project's zarr labels, or a cohort
CSV's ``pixel_labels`` mask) and draw boxes or polygons (GeoJSON). This module turns both into one
label per patch of a feature bag:

* every patch is sampled on an ``s × s`` grid of points (sub-cell centres), so a patch that is 60 %
  painted "tumour" is a tumour tile and a patch with a few painted pixels is not;
* pixel and annotation class *names* map to tile labels (slide class indices): by default a class named
  like a slide class maps to it, "tumour"-like names to the positive class and "normal"-like names to
  class 0; unmapped classes ("unlabelled", "artefact"…) say nothing;
* a patch is labelled with the positive class that covers at least ``min_fraction`` of it, else class
  0 if that covers ``min_fraction``, else -1 (unknown). With ``exhaustive`` (the annotator marked *all*
  tumour on the slide, as in CAMELYON16), unpainted points of an annotated slide count as class 0.

Boxes and polygons are drawn over the painted pixels (an annotation wins where both exist).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import WsimilError
from ..slide.mask_sampling import Lookup, patch_samples

POSITIVE_NAMES = ("tumour", "tumor", "cancer", "carcinoma", "malignant", "metastasis", "metastases", "lesion",
                  "positive")
NEGATIVE_NAMES = ("normal", "benign", "healthy", "non-tumour", "non-tumor", "negative", "stroma", "background")


class TileLabelError(WsimilError):
    """Tile labels cannot be derived as asked (unknown class names, masks that do not fit)."""


def sample_offsets(size_level0: float, samples: int) -> np.ndarray:
    """Offsets from a patch corner of the ``samples`` sub-cell centres along one axis (level-0 px), the
    same points :func:`~napari_wsimil.slide.mask_sampling.patch_samples` reads masks at."""
    return (np.arange(samples, dtype=np.float64) + 0.5) * (float(size_level0) / samples)


def annotation_samples(coords: np.ndarray, size_level0: float, annotations: Iterable[Any],
                       class_ids: Mapping[str, int], samples: int = 8) -> np.ndarray:
    """Like :func:`patch_samples`, but the values are the class ids of the annotations (boxes,
    polygons) covering each sample point; later annotations win; classes not in ``class_ids`` are
    left out. Level-0 (x, y) geometry as stored by the project."""
    import shapely

    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    off = sample_offsets(size_level0, samples)
    gx = (coords[:, 0][:, None, None] + off[None, None, :]).repeat(samples, 1)  # (N, s_row, s_col)
    gy = (coords[:, 1][:, None, None] + off[None, :, None]).repeat(samples, 2)
    x, y = gx.reshape(-1), gy.reshape(-1)
    out = np.zeros(x.shape, np.uint8)
    for ann in annotations:
        cid = class_ids.get(ann.class_name)
        if not cid:
            continue
        x0, y0, x1, y1 = ann.geometry.bounds
        near = np.flatnonzero((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1))
        if len(near):
            inside = shapely.contains_xy(ann.geometry, x[near], y[near])
            out[near[inside]] = cid
    return out.reshape(len(coords), samples * samples)


def default_class_map(class_names: Mapping[int, str], slide_classes: Sequence[str]) -> dict[int, int]:
    """Pixel class id → tile label (slide class index) by name; ids with no mapping are left out.

    A class named exactly like a slide class maps to it; otherwise, for two slide classes, tumour-like
    names map to 1 and normal-like names to 0."""
    lowered = {c.strip().lower(): i for i, c in enumerate(slide_classes)}
    out: dict[int, int] = {}
    for cid, name in class_names.items():
        if cid == 0:
            continue
        key = name.strip().lower()
        if key in lowered:
            out[cid] = lowered[key]
        elif len(slide_classes) == 2 and key in POSITIVE_NAMES:
            out[cid] = 1
        elif key in NEGATIVE_NAMES:
            out[cid] = 0
    return out


def pseudo_label_class_ids(class_names: Mapping[int, str]) -> tuple[int, int]:
    """(tumour id, normal id) among a project's pixel classes, matched by name like tile labels are: the
    classes pseudo-labels are painted with. Both the interactive session and a segmentation run writing
    its E-step pseudo-labels ask this, so they always agree."""
    mapping = default_class_map(class_names, ["normal", "tumour"])
    tumour = [cid for cid, t in mapping.items() if t == 1]
    normal = [cid for cid, t in mapping.items() if t == 0]
    if not tumour or not normal:
        raise TileLabelError("pseudo-labels need a tumour-like and a normal-like pixel class (e.g. 'tumour' and "
                             f"'normal'); the project has {', '.join(class_names.values())}")
    return tumour[0], normal[0]


def parse_class_map(text: str, class_names: Mapping[int, str], slide_classes: Sequence[str]) -> dict[int, int]:
    """``"tumour=malignant,normal=0"`` → pixel class id → tile label; every problem in one error."""
    by_name = {n.strip().lower(): cid for cid, n in class_names.items()}
    slide_index = {c.strip().lower(): i for i, c in enumerate(slide_classes)}
    out: dict[int, int] = {}
    problems = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, target = part.partition("=")
        name, target = name.strip().lower(), target.strip().lower()
        if not sep or not name or not target:
            problems.append(f"{part!r} is not CLASS=SLIDE_CLASS")
            continue
        if name not in by_name:
            problems.append(f"no pixel class named {name!r} (classes: {', '.join(class_names.values())})")
            continue
        if target in slide_index:
            out[by_name[name]] = slide_index[target]
        elif target.isdigit() and int(target) < len(slide_classes):
            out[by_name[name]] = int(target)
        else:
            problems.append(f"{target!r} is not a slide class ({', '.join(slide_classes)}) or its index")
    if problems:
        raise TileLabelError("cannot read the tile-class mapping: " + "; ".join(problems))
    return out


def tile_labels(values: np.ndarray, id_to_tile: Mapping[int, int], min_fraction: float = 0.5,
                exhaustive: bool = False) -> np.ndarray:
    """(N,) int64 tile labels from (N, S) sampled class ids; -1 where nothing decides."""
    values = np.asarray(values)
    n, s = values.shape
    lut = np.full(256, -1, np.int64)
    for cid, tile in id_to_tile.items():
        lut[int(cid)] = int(tile)
    if exhaustive:
        lut[0] = 0
    mapped = lut[values]  # (N, S), -1 = says nothing
    n_tiles = max([*id_to_tile.values(), 0]) + 1
    frac = np.stack([(mapped == k).mean(1) for k in range(n_tiles)], 1) if n else np.zeros((0, n_tiles))
    out = np.full(n, -1, np.int64)
    if n_tiles > 1:
        pos = frac[:, 1:]
        best = pos.argmax(1)
        hit = pos[np.arange(n), best] >= min_fraction
        out[hit] = best[hit] + 1
    normal = (out == -1) & (frac[:, 0] >= min_fraction)
    out[normal] = 0
    return out


@dataclass
class TileLabelSource:
    """What one slide has to derive tile labels from: a pixel-label lookup at ``downsample`` and/or
    annotations; ``class_ids`` maps annotation class names to the same ids the pixels use."""

    lookup: Lookup | None = None
    downsample: float | None = None
    annotations: Sequence[Any] = ()
    class_ids: Mapping[str, int] | None = None

    @property
    def empty(self) -> bool:
        return self.lookup is None and not self.annotations


def slide_tile_labels(coords: np.ndarray, size_level0: float, source: TileLabelSource,
                      id_to_tile: Mapping[int, int], *, min_fraction: float = 0.5, exhaustive: bool = False,
                      samples: int = 8) -> np.ndarray | None:
    """Tile labels of one bag, or None when the slide has no usable label (all -1 is also None:
    a slide counts as annotated only if it says something about at least one tile)."""
    if source.empty:
        return None
    vals = np.zeros((len(coords), samples * samples), np.uint8)
    if source.lookup is not None:
        vals = patch_samples(coords, size_level0, source.lookup, float(source.downsample or 1.0), samples)
        vals = vals.astype(np.uint8)
    if source.annotations:
        ann = annotation_samples(coords, size_level0, source.annotations, source.class_ids or {}, samples)
        vals = np.where(ann > 0, ann, vals)
    if not (vals > 0).any():
        return None
    labels = tile_labels(vals, id_to_tile, min_fraction, exhaustive)
    return labels if (labels >= 0).any() else None


__all__ = ["NEGATIVE_NAMES", "POSITIVE_NAMES", "TileLabelError", "TileLabelSource", "annotation_samples",
           "default_class_map", "parse_class_map", "pseudo_label_class_ids", "sample_offsets", "slide_tile_labels",
           "tile_labels"]
