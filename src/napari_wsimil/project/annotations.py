"""Boxes and polygons in QuPath's GeoJSON, so annotations move between QuPath and napari unchanged.

Format written (what QuPath 0.3+ exports and imports): a ``FeatureCollection`` of ``Feature``s,
each with a top-level ``"id"`` (uuid), a ``Polygon``/``MultiPolygon`` geometry in level-0 pixel
coordinates (x, y; (0, 0) is the top-left corner of the first pixel) and
``"properties": {"objectType": "annotation", "classification": {"name", "color": [r, g, b]},
"isLocked": false}``. QuPath stores rectangles as plain polygons; we add ``"wsimil_kind": "box"``
so that a box comes back as a box (QuPath ignores unknown properties and keeps them).

Read: also a bare list of features, a single Feature, a bare geometry, ``classification`` with
QuPath 0.2's ``colorRGB`` (signed ARGB int), holes, MultiPolygon, and GeometryCollections of
polygons. A feature without a classification gets the class name ``"unclassified"``
(:data:`UNCLASSIFIED`): it is then an ordinary unknown class, so importing it into a project fails
with the list of unknown classes unless the caller lets missing classes be added. Points and lines
enclose no area and are refused with the feature's number, never dropped silently.

Coordinates are written with Python's shortest round-trip float repr, so export then import gives
exactly the same numbers.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import short
from ..io.atomic import write_text
from .classes import ClassDef, UNLABELLED, hex_to_rgb, normalize_color
from .errors import ProjectError, problems_error

if TYPE_CHECKING:  # pragma: no cover
    from shapely.geometry.base import BaseGeometry

UNCLASSIFIED = "unclassified"
KINDS = ("box", "polygon")
#: How far (level-0 px) an annotation may stick out of the slide: drawing tools round to the pixel edge.
EDGE_TOLERANCE = 1.0


def _new_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Annotation:
    """A labelled region of a slide.

    ``geometry`` is a shapely Polygon or MultiPolygon in level-0 pixels (x, y); ``kind`` says how it
    was drawn ("box": axis-aligned rectangle, "polygon": anything else); ``id`` is a uuid string
    that survives QuPath round trips. ``color`` is the colour the file gave the class, used only
    when importing adds that class to a project.
    """

    geometry: BaseGeometry
    class_name: str
    kind: Literal["box", "polygon"] = "polygon"
    id: str = field(default_factory=_new_id)
    name: str | None = None
    color: str | None = field(default=None, compare=False)

    @classmethod
    def box(cls, x0: float, y0: float, x1: float, y1: float, class_name: str, **kw: Any) -> Annotation:
        from shapely.geometry import box

        return cls(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), class_name, "box", **kw)

    @classmethod
    def polygon(cls, xy: Sequence[Sequence[float]], class_name: str, **kw: Any) -> Annotation:
        from shapely.geometry import Polygon

        return cls(Polygon(xy), class_name, "polygon", **kw)


# ----------------------------------------------------------------------------------------- validation


def check_annotations(
    annotations: Sequence[Annotation], class_names: Iterable[str], dimensions: tuple[int, int] | None,
) -> list[str]:
    """Every problem with a list of annotations (empty when all are fine), one readable line each."""
    import shapely

    names = set(class_names) - {UNLABELLED}
    problems: list[str] = []
    seen_ids: dict[str, int] = {}
    for i, ann in enumerate(annotations, 1):
        label = f"annotation {i}" + (f" ({ann.name})" if ann.name else "")
        if not isinstance(ann, Annotation):
            problems.append(f"{label}: is a {type(ann).__name__}, not an Annotation")
            continue
        geom = ann.geometry
        if ann.class_name == UNLABELLED:
            problems.append(f"{label}: class {UNLABELLED!r} means no label; give the annotation a class")
        elif ann.class_name not in names:
            problems.append(f"{label}: class {ann.class_name!r} is not one of the project's classes "
                            f"({', '.join(sorted(names)) or 'none'})")
        if ann.kind not in KINDS:
            problems.append(f"{label}: kind {ann.kind!r} is not 'box' or 'polygon'")
        if not isinstance(ann.id, str) or not ann.id:
            problems.append(f"{label}: id must be non-empty text")
        elif ann.id in seen_ids:
            problems.append(f"{label}: id {ann.id} is also used by annotation {seen_ids[ann.id]}")
        else:
            seen_ids[ann.id] = i
        gtype = getattr(geom, "geom_type", None)
        if gtype not in ("Polygon", "MultiPolygon"):
            problems.append(f"{label}: geometry is {gtype or type(geom).__name__}; only Polygon and "
                            "MultiPolygon enclose an area")
            continue
        if geom.is_empty:
            problems.append(f"{label}: the outline is empty")
            continue
        if not geom.is_valid:
            problems.append(f"{label}: invalid outline ({shapely.is_valid_reason(geom)}); "
                            "redraw it without crossing edges")
            continue
        if geom.area <= 0:
            problems.append(f"{label}: the outline encloses no area")
            continue
        if ann.kind == "box" and not (gtype == "Polygon" and geom.equals(geom.envelope)):
            problems.append(f"{label}: marked as a box but is not an axis-aligned rectangle")
        if dimensions is not None:
            w, h = dimensions
            x0, y0, x1, y1 = geom.bounds
            t = EDGE_TOLERANCE
            if x0 < -t or y0 < -t or x1 > w + t or y1 > h + t:
                where = "lies outside" if (x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h) else "extends beyond"
                problems.append(f"{label}: {where} the slide (bounds x {x0:g}-{x1:g}, y {y0:g}-{y1:g}; "
                                f"the slide is {w} x {h} px)")
    return problems


def validate_annotations(
    annotations: Sequence[Annotation], class_names: Iterable[str], dimensions: tuple[int, int] | None,
    what: str = "annotations",
) -> None:
    problems = check_annotations(annotations, class_names, dimensions)
    if problems:
        raise problems_error(f"cannot save {what}", problems)


# ------------------------------------------------------------------------------------------ writing


def _color_table(classes: Iterable[ClassDef] | Mapping[str, str]) -> dict[str, str]:
    if isinstance(classes, Mapping):
        return {str(k): normalize_color(v) for k, v in classes.items()}
    return {c.name: c.color for c in classes}


def to_feature_collection(annotations: Iterable[Annotation],
                          classes: Iterable[ClassDef] | Mapping[str, str]) -> dict:
    from shapely.geometry import mapping

    colors = _color_table(classes)
    features = []
    for ann in annotations:
        color = colors.get(ann.class_name) or ann.color
        if color is None:
            raise ProjectError(f"annotation {ann.id}: class {ann.class_name!r} has no colour; "
                               f"known classes: {', '.join(sorted(colors))}")
        props: dict[str, Any] = {
            "objectType": "annotation",
            "classification": {"name": ann.class_name, "color": list(hex_to_rgb(color))},
            "isLocked": False,
            "wsimil_kind": ann.kind,
        }
        if ann.name:
            props["name"] = ann.name
        features.append({"type": "Feature", "id": ann.id, "geometry": _plain(mapping(ann.geometry)),
                         "properties": props})
    return {"type": "FeatureCollection", "features": features}


def _plain(obj: Any) -> Any:
    """shapely's mapping() gives nested tuples; JSON wants lists (same numbers, exactly)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def write_geojson(path: str | os.PathLike[str], annotations: Iterable[Annotation],
                  classes: Iterable[ClassDef] | Mapping[str, str]) -> Path:
    """Write annotations as QuPath GeoJSON, atomically. ``classes`` gives each class its colour."""
    path = Path(path)
    doc = to_feature_collection(annotations, classes)
    # one feature per line: diffable and greppable, without one line per coordinate
    lines = [json.dumps(f, allow_nan=False, ensure_ascii=False) for f in doc["features"]]
    body = ",\n".join(lines)
    write_text(path, '{"type": "FeatureCollection", "features": [\n' + body + ("\n" if lines else "") + "]}\n",
               keep_previous=True)
    return path


# ------------------------------------------------------------------------------------------ reading


def read_geojson(path: str | os.PathLike[str]) -> list[Annotation]:
    """Annotations from a GeoJSON file (QuPath's or any FeatureCollection of polygons).

    Raises ProjectError naming the file and listing every feature that cannot be read.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ProjectError(f"annotation file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectError(f"cannot read annotation file {path}: {short(exc)}") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ProjectError(f"{path.name} is not valid JSON ({short(exc)}); expected GeoJSON as QuPath exports it") from None
    return parse_geojson(doc, source=path.name)


def parse_geojson(doc: Any, source: str = "GeoJSON") -> list[Annotation]:
    features = _features(doc, source)
    anns: list[Annotation] = []
    problems: list[str] = []
    ids: set[str] = set()
    for i, feat in enumerate(features, 1):
        try:
            ann = _feature(feat, i)
        except ProjectError as exc:
            problems.append(str(exc))
            continue
        if ann.id in ids:  # duplicated ids (copy-pasted features) would make edits ambiguous
            ann = Annotation(ann.geometry, ann.class_name, ann.kind, _new_id(), ann.name, ann.color)
        ids.add(ann.id)
        anns.append(ann)
    if problems:
        raise problems_error(f"cannot read {source}", problems)
    return anns


def _features(doc: Any, source: str) -> list[Any]:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        kind = doc.get("type")
        if kind == "FeatureCollection":
            feats = doc.get("features")
            if not isinstance(feats, list):
                raise ProjectError(f"{source}: a FeatureCollection without a 'features' list")
            return feats
        if kind == "Feature":
            return [doc]
        if kind in ("Polygon", "MultiPolygon", "GeometryCollection"):
            return [{"type": "Feature", "geometry": doc, "properties": {}}]
        raise ProjectError(f"{source}: GeoJSON of type {kind!r}; expected a FeatureCollection, "
                           "a Feature or a list of features")
    raise ProjectError(f"{source}: expected GeoJSON (a FeatureCollection), found {type(doc).__name__}")


def _feature(feat: Any, i: int) -> Annotation:
    from shapely.geometry import MultiPolygon, shape

    if not isinstance(feat, dict) or feat.get("type") != "Feature":
        raise ProjectError(f"feature {i}: not a GeoJSON Feature")
    props = feat.get("properties") or {}
    if not isinstance(props, dict):
        raise ProjectError(f"feature {i}: 'properties' is not an object")
    gj = feat.get("geometry")
    if not isinstance(gj, dict):
        raise ProjectError(f"feature {i}: has no geometry")
    gtype = gj.get("type")
    try:
        geom = shape(gj)
    except Exception as exc:  # shapely raises several types for malformed coordinates
        raise ProjectError(f"feature {i}: malformed {gtype} coordinates ({short(exc)})") from None
    if geom.geom_type == "GeometryCollection":
        parts = list(geom.geoms)
        if parts and all(p.geom_type in ("Polygon", "MultiPolygon") for p in parts):
            polys = [q for p in parts for q in (p.geoms if p.geom_type == "MultiPolygon" else [p])]
            geom = MultiPolygon(polys)
    if geom.geom_type not in ("Polygon", "MultiPolygon"):
        raise ProjectError(f"feature {i}: a {geom.geom_type} encloses no area; only Polygon and "
                           "MultiPolygon annotations can be imported")
    name, color = _classification(props, i)
    kind = props.get("wsimil_kind")
    if kind not in KINDS:
        kind = "polygon"
    fid = feat.get("id") or props.get("id")
    label = props.get("name")
    return Annotation(geom, name, kind, str(fid) if fid else _new_id(),
                      str(label) if isinstance(label, (str, int, float)) and label != "" else None, color)


def _classification(props: dict, i: int) -> tuple[str, str | None]:
    cls = props.get("classification")
    if cls is None:
        # QuPath <= 0.2 wrote the class as a bare name under "classification" or "class"
        cls = props.get("class")
    if cls is None or cls == {}:
        return UNCLASSIFIED, None
    if isinstance(cls, str):
        return cls, None
    if not isinstance(cls, dict):
        raise ProjectError(f"feature {i}: 'classification' is neither an object nor a name")
    name = cls.get("name")
    if name is None and isinstance(cls.get("names"), list):  # QuPath derived classes: "A: B"
        name = ": ".join(str(n) for n in cls["names"])
    if not isinstance(name, str) or not name:
        return UNCLASSIFIED, None
    color = None
    try:
        if "color" in cls:
            color = normalize_color(tuple(int(v) for v in cls["color"][:3]))
        elif "colorRGB" in cls:
            v = int(cls["colorRGB"]) & 0xFFFFFF
            color = f"#{v:06x}"
    except (ProjectError, TypeError, ValueError):
        color = None  # a bad colour is not worth refusing the annotation for
    return name, color
