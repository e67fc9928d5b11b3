"""Layer-data tuples for a project's slide: its image, its pixel labels and its boxes/polygons.

No napari or Qt here (like layers.py): functions return ``(data, kwargs, layer_type)`` tuples and
convert napari Shapes data back to project annotations, so the dock widgets stay thin wiring.

Coordinates. napari's world is µm (see layers.py): level-0 pixel *i* has its centre at world
``i · m`` (m = µm per level-0 px), so its area spans ``(i − ½)·m … (i + ½)·m``. Annotations are
stored in level-0 pixel coordinates with (0, 0) at the top-left *corner* of the first pixel, as
GeoJSON/QuPath do, hence ``px = world / m + ½`` and ``world = (px − ½) · m``. Shapes data is (y, x);
annotation geometry is (x, y).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from .layers import LayerData, overlay_transform, slide_layer_data, world_mpp, world_units
from .slide import Slide

DEFAULT_EDGE = "#c0c0c0"
_ELLIPSE_VERTICES = 64


# --- colours ---------------------------------------------------------------------------------------
def class_colormap(classes: Iterable[Any]) -> dict[int | None, str]:
    """napari Labels colormap: one colour per class id; 0 (unlabelled) and unknown ids transparent."""
    cmap: dict[int | None, str] = {None: "transparent", 0: "transparent"}
    for c in classes:
        if int(c.id) != 0:
            cmap[int(c.id)] = c.color
    return cmap


def class_colors_by_name(classes: Iterable[Any]) -> dict[str, str]:
    return {c.name: c.color for c in classes}


def class_table(classes: Iterable[Any]) -> list[dict[str, Any]]:
    """``[{"id", "name", "color"}, ...]``: the class table a layer carries in its metadata, so that saving
    the layer (the npe2 writers) records what each id means without the project at hand."""
    return [{"id": int(c.id), "name": str(c.name), "color": str(c.color)} for c in classes]


def slide_frame(slide: Slide) -> dict[str, Any]:
    """The slide's µm/px and size (level-0 px, (w, h)) for a layer's metadata: what the writers need to
    put a saved layer back over its slide."""
    return {"slide_mpp": slide.mpp, "slide_dimensions": [int(v) for v in slide.dimensions]}


def edge_colors(class_names: Sequence[Any], classes: Iterable[Any]) -> list[str]:
    """One edge colour per shape, from its class (grey for a class the project does not know)."""
    by_name = class_colors_by_name(classes)
    return [by_name.get(str(n), DEFAULT_EDGE) for n in class_names]


# --- pixel labels ----------------------------------------------------------------------------------
def labels_layer_data(
    labels: np.ndarray, downsample: float, classes: Iterable[Any], slide: Slide, name: str = "labels",
    opacity: float = 0.5,
) -> LayerData:
    """Editable 2-D pixel labels at the label resolution, overlaying the slide in µm.

    Single-scale on purpose: napari cannot paint multiscale Labels.
    """
    classes = list(classes)
    data = np.array(labels, dtype=np.uint8, copy=True)  # writable, owned by the layer
    kwargs = {
        "name": name,
        "opacity": opacity,
        "colormap": class_colormap(classes),
        "metadata": {
            "wsimil": {"kind": "pixel_labels", "path": str(slide.path), "downsample": float(downsample),
                       "classes": class_table(classes), **slide_frame(slide)},
        },
        **overlay_transform(slide, downsample),
        **world_units(slide),
    }
    return (data, kwargs, "labels")


def _atom_points(atom: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, cols) of the pixels one napari Labels history atom changed, in the last two axes.

    Two shapes of atom: napari >= 0.8's masked atoms ``(slice_key, mask, old_values, new_value)`` (a
    named tuple with those fields: the box of the edit as slices, and which of its pixels changed, or
    ``None`` when all did), and the ``(indices, old_values, new_values)`` tuples of ``data_setitem``
    (and of napari < 0.8), whose indices are a numpy multi-index.
    """
    slice_key = getattr(atom, "slice_key", None)
    if slice_key is None and len(atom) == 4 and isinstance(atom[0], tuple) \
            and all(isinstance(k, slice) for k in atom[0]):
        slice_key = atom[0]
    if slice_key is not None:
        mask = atom.mask if hasattr(atom, "mask") else atom[1]
        if len(slice_key) < 2:
            return None
        ys, xs = slice_key[-2], slice_key[-1]
        y0, x0 = int(ys.start or 0), int(xs.start or 0)
        if mask is None:  # every pixel of the box changed
            if ys.stop is None or xs.stop is None or ys.stop <= y0 or xs.stop <= x0:
                return None
            return (np.array([y0, int(ys.stop) - 1]), np.array([x0, int(xs.stop) - 1]))
        nz = np.nonzero(np.asarray(mask))
        if len(nz) < 2 or nz[-1].size == 0:
            return None
        return (nz[-2] + y0, nz[-1] + x0)
    idx = atom[0]
    if len(idx) < 2 or np.size(idx[-2]) == 0:
        return None
    return (np.asarray(idx[-2]).ravel(), np.asarray(idx[-1]).ravel())


def paint_bbox(atoms: Iterable[Any]) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) bounding box of the pixels napari Labels history atoms changed (None: none).

    ``atoms`` is one history item, the ``value`` of a ``Labels.events.paint`` event: masked atoms
    (napari >= 0.8) and ``(indices, before, after)`` tuples are both understood (see
    :func:`_atom_points`).
    """
    ys: list[np.ndarray] = []
    xs: list[np.ndarray] = []
    for atom in atoms:
        points = _atom_points(atom)
        if points is None:
            continue
        ys.append(points[0])
        xs.append(points[1])
    if not ys:
        return None
    y, x = np.concatenate(ys), np.concatenate(xs)
    return (int(y.min()), int(y.max()) + 1, int(x.min()), int(x.max()) + 1)


# --- annotations <-> shapes ------------------------------------------------------------------------
def level0_to_world(xy: np.ndarray, slide: Slide) -> np.ndarray:
    """(N, 2) level-0 px (x, y), corner convention -> (N, 2) world µm (y, x)."""
    xy = np.asarray(xy, dtype=float)
    return (xy[:, ::-1] - 0.5) * world_mpp(slide)


def world_to_level0(yx: np.ndarray, slide: Slide) -> np.ndarray:
    """(N, 2) world µm (y, x) -> (N, 2) level-0 px (x, y), corner convention."""
    yx = np.asarray(yx, dtype=float)[:, -2:]
    return yx[:, ::-1] / world_mpp(slide) + 0.5


def annotation_shapes(ann: Any, slide: Slide) -> list[tuple[np.ndarray, str]]:
    """napari shapes (world (y, x) vertices, shape type) of one annotation: one per polygon part.

    napari shows no holes, so a polygon with holes shows its outline (the holes are kept on disk as
    long as the shape is not edited, see :func:`shapes_to_annotations`).
    """
    geom = ann.geometry
    if ann.kind == "box":
        x0, y0, x1, y1 = geom.bounds
        xy = np.array([[x0, y0], [x0, y1], [x1, y1], [x1, y0]], dtype=float)  # napari's corner order
        return [(level0_to_world(xy, slide), "rectangle")]
    parts = list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
    return [(level0_to_world(np.asarray(p.exterior.coords, dtype=float)[:-1], slide), "polygon")
            for p in parts]


def default_edge_width(slide: Slide) -> float:
    w, h = slide.dimensions
    return max(min(w, h) * world_mpp(slide) / 300.0, 1e-3)


def annotations_layer_data(
    annotations: Sequence[Any], classes: Iterable[Any], slide: Slide, name: str = "boxes",
    edge_width: float | None = None,
) -> LayerData:
    """Boxes and polygons as a Shapes layer in world µm.

    Each shape carries its annotation's class and id in ``features`` ("class", "id"); the parts of a
    MultiPolygon are separate shapes sharing one id.
    """
    classes = list(classes)
    data, types, names, ids = [], [], [], []
    for ann in annotations:
        for yx, kind in annotation_shapes(ann, slide):
            data.append(yx)
            types.append(kind)
            names.append(ann.class_name)
            ids.append(ann.id)
    kwargs: dict[str, Any] = {
        "name": name,
        "ndim": 2,
        "shape_type": types if types else "rectangle",
        "edge_color": edge_colors(names, classes) if data else DEFAULT_EDGE,
        "face_color": "transparent",
        "edge_width": default_edge_width(slide) if edge_width is None else edge_width,
        "features": {"class": np.array(names, dtype=object), "id": np.array(ids, dtype=object)},
        "metadata": {"wsimil": {"kind": "annotations", "path": str(slide.path),
                                "classes": class_table(classes), **slide_frame(slide)}},
        **world_units(slide),
    }
    return (data, kwargs, "shapes")


def _ellipse_polygon(corners_xy: np.ndarray) -> np.ndarray:
    """napari ellipses are stored as their 4 bounding-box corners; approximate by a polygon."""
    c = corners_xy.mean(0)
    u = (corners_xy[1] - corners_xy[0]) / 2.0
    v = (corners_xy[3] - corners_xy[0]) / 2.0
    t = np.linspace(0, 2 * np.pi, _ELLIPSE_VERTICES, endpoint=False)[:, None]
    return c + np.cos(t) * u + np.sin(t) * v


def _is_axis_aligned(xy: np.ndarray) -> bool:
    x0, y0 = xy.min(0)
    x1, y1 = xy.max(0)
    tol = 1e-6 * max(1.0, x1 - x0, y1 - y0)
    on_x = np.isclose(xy[:, 0], x0, atol=tol) | np.isclose(xy[:, 0], x1, atol=tol)
    on_y = np.isclose(xy[:, 1], y0, atol=tol) | np.isclose(xy[:, 1], y1, atol=tol)
    return bool(len(xy) == 4 and on_x.all() and on_y.all())


def _clean(geom: Any) -> Any:
    """Valid polygonal part of a geometry (self-crossing outlines repaired), or None."""
    if not geom.is_valid:
        import shapely

        geom = shapely.make_valid(geom)
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return None if geom.is_empty else geom
    polys = [g for g in getattr(geom, "geoms", []) if g.geom_type == "Polygon" and not g.is_empty]
    if not polys:
        return None
    from shapely.geometry import MultiPolygon

    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value == ""


class ShapesConversion(NamedTuple):
    annotations: list[Any]
    skipped: list[str]
    shape_ids: list[str | None]


def shapes_to_annotations(
    data: Sequence[np.ndarray], shape_types: Sequence[str], class_names: Sequence[Any], slide: Slide,
    ids: Sequence[Any] | None = None, originals: Sequence[Any] = (),
) -> ShapesConversion:
    """napari Shapes (world µm) -> project annotations (level-0 px), messages for shapes skipped, and
    the id of the annotation each shape went into (None when skipped).

    Axis-aligned rectangles become boxes; rotated rectangles, ellipses and polygons become polygons;
    lines and paths enclose no area and are skipped. Outlines are repaired when they cross
    themselves and clipped to the slide. An annotation in ``originals`` whose shapes were not edited
    comes back unchanged (exact coordinates, holes, name); the parts of a MultiPolygon are regrouped.
    """
    from shapely.geometry import MultiPolygon, Polygon, box

    from .project import Annotation

    w, h = slide.dimensions
    frame = box(0, 0, w, h)
    by_id = {a.id: a for a in originals}
    ids = list(ids) if ids is not None else [None] * len(data)
    groups: dict[Any, list[int]] = {}
    for i, value in enumerate(ids):
        key: Any = ("new", i)
        if not _missing(value) and value in by_id:
            multipart = by_id[value].geometry.geom_type == "MultiPolygon"
            key = value if (value not in groups or multipart) else key  # a pasted copy gets a new id
        groups.setdefault(key, []).append(i)
    anns: list[Any] = []
    skipped: list[str] = []
    used: set[str] = set()
    shape_ids: list[str | None] = [None] * len(data)
    for key, members in sorted(groups.items(), key=lambda kv: kv[1][0]):
        name = "" if _missing(class_names[members[0]]) else str(class_names[members[0]])
        orig = by_id.get(key) if not isinstance(key, tuple) else None
        same = orig is not None and orig.class_name == name
        if same and _unchanged(orig, [data[i] for i in members], [shape_types[i] for i in members], slide):
            anns.append(orig)
            used.add(orig.id)
            for i in members:
                shape_ids[i] = orig.id
            continue
        parts, kind = [], "polygon"
        for i in members:
            xy, st = world_to_level0(data[i], slide), shape_types[i]
            if st == "rectangle" and _is_axis_aligned(xy) and len(members) == 1:
                (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
                parts.append(box(x0, y0, x1, y1))
                kind = "box"
            elif st in ("rectangle", "polygon", "ellipse") and len(xy) >= 3:
                parts.append(Polygon(_ellipse_polygon(xy) if st == "ellipse" else xy))
            else:
                skipped.append(f"shape {i + 1} is a {st}: only boxes and polygons are saved")
        if not parts:
            continue
        geom = parts[0] if len(parts) == 1 else MultiPolygon(parts)
        geom = _clean(geom)
        if geom is not None and not frame.contains(geom):
            geom = _clean(geom.intersection(frame))
        if geom is None or geom.area <= 0:
            skipped.append(f"shape {members[0] + 1} encloses no area inside the slide and was not saved")
            continue
        if kind == "box":
            geom = box(*geom.bounds)
        extra: dict[str, Any] = {}
        if orig is not None:
            extra["id"], extra["name"] = orig.id, orig.name
        elif not _missing(ids[members[0]]) and str(ids[members[0]]) not in used | set(by_id):
            extra["id"] = str(ids[members[0]])
        ann = Annotation(geometry=geom, class_name=name, kind=kind, **extra)
        used.add(ann.id)
        anns.append(ann)
        for i in members:
            shape_ids[i] = ann.id
    return ShapesConversion(anns, skipped, shape_ids)


def _unchanged(orig: Any, data: list[np.ndarray], types: list[str], slide: Slide) -> bool:
    expected = annotation_shapes(orig, slide)
    if len(expected) != len(data):
        return False
    return all(
        # napari stores vertices as float32: compare to its precision
        et == t and np.shape(e) == np.shape(d) and np.allclose(e, np.asarray(d)[:, -2:], rtol=1e-6, atol=1e-6)
        for (e, et), d, t in zip(expected, data, types)
    )


def project_slide_layers(project: Any, slide_id: str, slide: Slide,
                         annotations: Sequence[Any] | None = None) -> list[LayerData]:
    """The three layers of a project slide: image, pixel labels (editable), boxes/polygons."""
    geometry = project.label_geometry(slide_id)
    classes = project.classes
    if annotations is None:
        annotations = project.annotations(slide_id)
    image = slide_layer_data(slide, name=slide_id)
    labels = labels_layer_data(project.pixel_labels(slide_id), geometry.downsample, classes, slide,
                               name=f"{slide_id} labels")
    shapes = annotations_layer_data(annotations, classes, slide, name=f"{slide_id} boxes")
    for _, kwargs, _ in (image, labels, shapes):
        kwargs["metadata"]["wsimil"]["project_slide"] = slide_id
    return [image, labels, shapes]
