"""npe2 writers: a Labels layer as an OME-TIFF mask with its class table, a Shapes layer as QuPath GeoJSON.

So that *File > Save Selected Layers* gives the files the rest of the plugin and QuPath read: the mask
is written by the project export's own pyramidal OME-TIFF writer (:func:`~napari_wsimil.io.mask_writers.
write_ome_tiff`: tiled, SubIFD pyramid, PhysicalSizeX/Y in µm) with the same JSON ``Description``
(``downsample``, ``mpp``, ``slide_dimensions``, ``classes``), so ``wsimil project import-mask`` and
:class:`~napari_wsimil.project.mask_io.MaskImage` read it back as they read an export; the outlines go
through :func:`~napari_wsimil.project.annotations.write_geojson`, QuPath's format.

Where the numbers come from. A layer made by the plugin carries ``metadata["wsimil"]`` (the slide's
µm/px, its size in level-0 px, the label downsample, the class table). Another layer is written in its
own frame: a Labels layer at its ``scale`` when its units are µm (else with no physical size), a Shapes
layer's world coordinates as level-0 pixels when its units are pixels. Plain Python, no napari import:
napari hands writers the layer's data and its state as a dict.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .errors import ProjectError
from .io.mask_writers import LabelSampler, write_ome_tiff
from .project.annotations import UNCLASSIFIED, write_geojson
from .project.classes import UNLABELLED, rgb_to_hex
from .project.export import AnnotatedSampler
from .project_layers import shapes_to_annotations

log = logging.getLogger(__name__)

MICRONS = {"µm", "um", "micrometer", "micron", "micrometre"}


def _meta(attributes: dict[str, Any]) -> dict[str, Any]:
    meta = (attributes.get("metadata") or {}).get("wsimil")
    return meta if isinstance(meta, dict) else {}


def _in_microns(attributes: dict[str, Any]) -> bool:
    units = attributes.get("units") or ()
    return bool(units) and all(str(u).strip().lower() in MICRONS for u in list(units)[-2:])


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


# --- labels -> OME-TIFF ----------------------------------------------------------------------------
class _Geometry(NamedTuple):
    downsample: float
    shape: tuple[int, int]


class ArrayLabels:
    """The label store interface of :class:`~napari_wsimil.io.mask_writers.LabelSampler` over a layer's
    array (numpy, or a lazy array: only the rows asked for are read), checking that ids fit in 8 bits."""

    def __init__(self, data: Any, name: str):
        self.data = data
        self.name = name

    def _checked(self, block: Any) -> np.ndarray:
        block = np.asarray(block)
        if block.size and block.dtype != np.uint8:
            lo, hi = int(block.min()), int(block.max())
            if lo < 0 or hi > 255:
                raise ProjectError(f"labels layer '{self.name}' holds label {lo if lo < 0 else hi}; an 8-bit "
                                   "mask holds class ids 0-255 only")
        return block.astype(np.uint8, copy=False)

    def read_block(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._checked(self.data[y0:y1, x0:x1])

    def read_points(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        block = self._checked(self.data[r0:r1, c0:c1])
        return block[np.ix_(rows - r0, cols - c0)]


def _plane(data: Any, name: str) -> Any:
    """The 2-D array of a Labels layer (a multiscale one's finest level; leading axes of length 1 dropped)."""
    if isinstance(data, (list, tuple)):
        data = data[0]
    while getattr(data, "ndim", 0) > 2 and data.shape[0] == 1:
        data = data[0]
    if getattr(data, "ndim", 0) != 2:
        raise ProjectError(f"labels layer '{name}' has {getattr(data, 'ndim', 0)} dimensions; a slide mask "
                           "is 2-D (y, x)")
    if not np.issubdtype(np.dtype(data.dtype), np.integer) and np.dtype(data.dtype) != np.bool_:
        raise ProjectError(f"labels layer '{name}' holds {data.dtype} values; a mask holds whole class ids")
    return data


def _class_table(attributes: dict[str, Any], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The plugin's class table; else one entry per colour of a napari direct colormap (``label <id>``)."""
    if isinstance(meta.get("classes"), list) and meta["classes"]:
        return [dict(c) for c in meta["classes"]]
    table = [{"id": 0, "name": UNLABELLED, "color": "#000000"}]
    colors = getattr(attributes.get("colormap"), "color_dict", None) or {}
    for key, rgba in colors.items():
        if key is None or int(key) <= 0 or int(key) > 255:
            continue
        rgb = [round(float(v) * 255) for v in list(np.asarray(rgba, float).ravel())[:3]]
        table.append({"id": int(key), "name": f"label {int(key)}", "color": rgb_to_hex(rgb)})
    return table


def write_labels_mask(path: str, data: Any, attributes: dict[str, Any],
                      outlines: tuple[Any, dict[str, Any]] | None = None) -> list[str]:
    """npe2 single-layer writer: the Labels layer as a pyramidal OME-TIFF mask (uint8 class ids) at the
    layer's own resolution, with its µm/px and class table; returns the path written.

    ``outlines``, a Shapes layer's ``(data, attributes)`` over the same slide (the "Export mask" command
    passes it; napari's *Save* does not), fills the boxes and polygons with their class id under the
    painted pixels, as QuPath's labelled-image export and ``wsimil project export`` do.
    """
    name = str(attributes.get("name") or "labels")
    plane = _plane(data, name)
    meta = _meta(attributes)
    h, w = (int(s) for s in plane.shape)
    ds = _positive(meta.get("downsample")) or 1.0
    slide_mpp = _positive(meta.get("slide_mpp"))
    scale = [float(s) for s in (attributes.get("scale") or [1.0, 1.0])][-2:]
    if slide_mpp is not None:
        mpp: float | None = slide_mpp * ds
    elif _in_microns(attributes) and math.isclose(scale[0], scale[1], rel_tol=1e-6):
        mpp = _positive(scale[1])
    else:
        mpp = None
    dims = meta.get("slide_dimensions")
    dims = (int(dims[0]), int(dims[1])) if isinstance(dims, (list, tuple)) and len(dims) == 2 else \
        (round(w * ds), round(h * ds))
    description = {"wsimil": {
        "slide_id": meta.get("project_slide") or name, "slide_path": meta.get("path"), "downsample": ds,
        "mpp": mpp, "slide_dimensions": list(dims), "classes": _class_table(attributes, meta),
    }}
    sampler: Any = LabelSampler(ArrayLabels(plane, name), _Geometry(ds, (h, w)))  # type: ignore[arg-type]
    if outlines is not None:
        ids = {str(c["name"]): int(c["id"]) for c in description["wsimil"]["classes"]}
        shapes = _fill_list(shapes_annotations(*outlines), ids)
        if shapes:
            sampler = AnnotatedSampler(sampler, shapes)
    out = Path(path)
    write_ome_tiff(out, sampler, dims, ds, mpp, name, json.dumps(description))
    return [str(out)]


def _color_table(meta: dict[str, Any]) -> dict[str, str]:
    """``{class name: #rrggbb}`` of the class table a plugin layer carries (empty for other layers)."""
    classes = meta.get("classes") or []
    return {str(c["name"]): str(c["color"]) for c in classes if "name" in c and "color" in c}


# --- shapes -> QuPath GeoJSON ----------------------------------------------------------------------
class SlideFrame(NamedTuple):
    """What the shapes conversion needs of a slide: its size in level-0 px (w, h) and µm/px (None: px)."""

    dimensions: tuple[int, int]
    mpp: float | None


def _hex(rgba: Any) -> str:
    rgb = np.clip(np.round(np.asarray(rgba, float).ravel()[:3] * 255), 0, 255)
    return rgb_to_hex([int(v) for v in rgb])


def _column(features: Any, name: str, n: int) -> list[Any]:
    if features is None or name not in getattr(features, "columns", ()):
        return [None] * n
    return list(features[name])


def _fill_list(annotations: list[Any], ids: dict[str, int]) -> list[tuple[np.ndarray, list[np.ndarray], int]]:
    """(exterior, holes, class id) of each polygon part, for :class:`AnnotatedSampler`; classes the mask's
    table does not know are not drawn (as in ``wsimil project export``)."""
    out = []
    for ann in annotations:
        cid = ids.get(ann.class_name)
        if cid is None or cid <= 0:
            continue
        for g in getattr(ann.geometry, "geoms", [ann.geometry]):
            if g.geom_type == "Polygon" and not g.is_empty:
                holes = [np.asarray(r.coords, float) for r in g.interiors]
                out.append((np.asarray(g.exterior.coords, float), holes, cid))
    return out


def shapes_annotations(data: Any, attributes: dict[str, Any]) -> list[Any]:
    """A Shapes layer's boxes and polygons as annotations in level-0 px, each with its class colour; lines
    and paths enclose no area and are left out (logged)."""
    name = str(attributes.get("name") or "shapes")
    meta = _meta(attributes)
    scale = np.asarray([float(s) for s in (attributes.get("scale") or [1.0, 1.0])][-2:])
    translate = np.asarray([float(t) for t in (attributes.get("translate") or [0.0, 0.0])][-2:])
    world = [np.asarray(d, float)[:, -2:] * scale + translate for d in data]
    n = len(world)
    types = list(attributes.get("shape_type") or ["polygon"] * n)
    features = attributes.get("features")
    class_names = [UNCLASSIFIED if c is None or (isinstance(c, float) and math.isnan(c)) or c == ""
                   else str(c) for c in _column(features, "class", n)]
    mpp = _positive(meta.get("slide_mpp"))
    if mpp is None and _in_microns(attributes) and n:
        raise ProjectError(f"shapes layer '{name}' is in µm but says nothing of its slide's pixel size, so "
                           "its outlines cannot be written in slide pixels; draw them in the slide's boxes "
                           "layer")
    dims = meta.get("slide_dimensions")
    if isinstance(dims, (list, tuple)) and len(dims) == 2:
        frame = SlideFrame((int(dims[0]), int(dims[1])), mpp)
    else:  # the layer's own frame: wide enough for every shape
        far = max((float((w / (mpp or 1.0)).max()) + 1.0 for w in world if len(w)), default=1.0)
        frame = SlideFrame((math.ceil(far), math.ceil(far)), mpp)
    conv = shapes_to_annotations(world, types, class_names, frame,  # type: ignore[arg-type]
                                 ids=_column(features, "id", n))
    for message in conv.skipped:
        log.warning("%s: %s", name, message)
    table = _color_table(meta)
    edges = np.asarray(attributes.get("edge_color") if attributes.get("edge_color") is not None else [])
    first_shape = {ann_id: i for i, ann_id in reversed(list(enumerate(conv.shape_ids))) if ann_id is not None}
    annotations = []
    for ann in conv.annotations:
        i = first_shape.get(ann.id)
        color = table.get(ann.class_name)
        if color is None and i is not None and len(edges) > i:
            color = _hex(edges[i])
        annotations.append(replace(ann, color=color or "#c0c0c0"))
    return annotations


def write_shapes_geojson(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: boxes and polygons of a Shapes layer as QuPath GeoJSON (level-0 px);
    lines and paths enclose no area and are left out (logged). Returns the path written."""
    meta = _meta(attributes)
    table = _color_table(meta)
    out = Path(path)
    write_geojson(out, shapes_annotations(data, attributes), table)
    return [str(out)]


__all__ = ["ArrayLabels", "SlideFrame", "shapes_annotations", "write_labels_mask", "write_shapes_geojson"]
