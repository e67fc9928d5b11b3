"""The project file, ``project.json``: its schema, the slide records it holds, and the checks of every value.

``project.json`` (UTF-8, indented, replaced atomically on every change)::

    {"schema": 1, "name": ..., "label_mpp": 4.0, "created": "2024-01-01T12:00:00+0000",
     "classes": [{"id": 0, "name": "unlabelled", "color": "#000000"}, ...],
     "slide_classes": ["benign", "malignant"],
     "slides": [<SlideRecord.to_json()>, ...]}

A file whose schema is newer than :data:`SCHEMA_VERSION` is refused (update napari-wsimil) rather than
half-read. The checks here (slide ids, µm/px, splits, slide classes and labels) are the project's
rules for these values wherever they come from: the API, the widgets or a cohort CSV
(``cohort_csv.py`` uses them row by row), so each rule and its message exist once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .classes import ClassDef, check_table
from ..errors import short
from .errors import ProjectError

SCHEMA_VERSION = 1
PROJECT_FILE = "project.json"
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "training": "train", "testing": "test"}
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class SlideRecord:
    """One slide of the cohort.

    ``path`` is as stored: relative to the project folder when the file is inside it, else absolute
    (``Project.slide_path`` gives the absolute path). ``mpp`` overrides the file's pixel size;
    ``scan_mpp`` is what the file said when added. ``dimensions`` is (w, h) at level 0.
    ``gt_mask``/``gt_downsample``: a ground-truth mask for evaluation only, never used as training labels.
    ``extra``: further columns of the cohort CSV, kept and written back.
    """

    slide_id: str
    path: Path
    label: str | None = None
    split: str | None = None
    mpp: float | None = None
    dimensions: tuple[int, int] | None = None
    scan_mpp: float | None = None
    gt_mask: Path | None = None
    gt_downsample: float | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "slide_id": self.slide_id, "path": self.path.as_posix(), "label": self.label, "split": self.split,
            "mpp": self.mpp, "dimensions": list(self.dimensions) if self.dimensions else None,
            "scan_mpp": self.scan_mpp, "gt_mask": self.gt_mask.as_posix() if self.gt_mask else None,
            "gt_downsample": self.gt_downsample, "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SlideRecord:
        dims = d.get("dimensions")
        if dims and not (len(dims) == 2 and all(isinstance(v, int) and 0 < v <= MAX_SIDE for v in dims)):
            raise ValueError(f"slide dimensions {short(repr(dims), 60)} are not two sizes of 1 to {MAX_SIDE:,} px")
        return cls(
            slide_id=check_slide_id(d["slide_id"]), path=Path(d["path"]), label=d.get("label"), split=d.get("split"),
            mpp=_opt_float(d.get("mpp")), dimensions=(int(dims[0]), int(dims[1])) if dims else None,
            scan_mpp=_opt_float(d.get("scan_mpp")), gt_mask=Path(d["gt_mask"]) if d.get("gt_mask") else None,
            gt_downsample=_opt_float(d.get("gt_downsample")),
            extra={str(k): str(v) for k, v in (d.get("extra") or {}).items()},
        )


#: No scanner makes a slide wider than this (the largest are ~250,000 px); a larger recorded size is damage.
MAX_SIDE = 2_000_000


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass
class ProjectData:
    """What ``project.json`` holds: the project's name, label resolution, class table, slide classes
    and slide records (by id), and when it was created."""

    name: str
    label_mpp: float
    classes: list[ClassDef]
    slide_classes: list[str]
    records: dict[str, SlideRecord]
    created: str = ""
    schema: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        return {
            "schema": self.schema, "name": self.name, "label_mpp": self.label_mpp, "created": self.created,
            "classes": [c.to_json() for c in self.classes], "slide_classes": list(self.slide_classes),
            "slides": [r.to_json() for r in self.records.values()],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], root: Path) -> ProjectData:
        """The content of ``root``'s project file (as :func:`read_project_file` returns it), with the class
        table checked; anything missing or of the wrong type is a ProjectError saying the file is damaged."""
        try:
            schema = int(data["schema"])
            name = str(data.get("name") or root.name)
            label_mpp = check_mpp(data.get("label_mpp", 4.0), "the label resolution")
            if label_mpp is None:
                raise ValueError("label_mpp is null")
            classes = [ClassDef.from_json(c) for c in data["classes"]]
            check_table(classes)
            slide_classes = [str(s) for s in data.get("slide_classes", [])]
            records: dict[str, SlideRecord] = {}
            for d in data.get("slides", []):
                rec = SlideRecord.from_json(d)
                records[rec.slide_id] = rec
            return cls(name, label_mpp, classes, slide_classes, records, str(data.get("created", "")), schema)
        except ProjectError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
            raise ProjectError(f"{root / PROJECT_FILE} is damaged ({type(exc).__name__}: {short(exc)})") from exc


def stored_path(root: Path, path: Path) -> Path:
    """A slide's (or mask's) path as the project stores it: relative to ``root`` when inside it (the
    folder can then be moved or shared whole), absolute otherwise."""
    path = path.resolve()
    try:
        return path.relative_to(root)
    except ValueError:
        return path


def resolve_stored(root: Path, stored: Path) -> Path:
    """The absolute path of a path as stored in the project (relative ones are relative to ``root``)."""
    return stored if stored.is_absolute() else root / stored


def safe_file_name(name: str) -> bool:
    """Whether ``name`` can be used as one file name inside an output folder without escaping it: no
    separator, no NUL, not '.' or '..', no leading dot (which would hide it). Looser than a project's slide
    ids, so cohort CSVs with spaces or brackets in their ids still train, but never a path."""
    return (bool(name) and "/" not in name and "\\" not in name and "\0" not in name
            and not name.startswith(".") and len(name) <= 255)


def check_slide_id(slide_id: object) -> str:
    if not isinstance(slide_id, str) or not _ID_RE.match(slide_id) or slide_id in (".", ".."):
        raise ProjectError(f"slide id {slide_id!r} is not usable as a file name: use letters, digits, '.', '_' and "
                           "'-' (at most 128, starting with a letter or digit)")
    return slide_id


def id_from_path(path: Path) -> str:
    """A slide id from a file name: the stem (without .ome), unsafe characters as '_'."""
    stem = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = path.stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "slide"
    return stem[:120]


def unique_id(base: str, taken: Iterable[str]) -> str:
    """``base``, or ``base_2``, ``base_3``… for the first that is not taken."""
    taken = set(taken)
    if base not in taken:
        return base
    i = 2
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def check_mpp(mpp: Any, what: str = "pixel size") -> float | None:
    if mpp is None:
        return None
    try:
        v = float(mpp)
    except (TypeError, ValueError):
        raise ProjectError(f"{what} must be a number of µm per pixel, got {short(repr(mpp), 60)}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ProjectError(f"{what} must be a positive number of µm per pixel, got {short(repr(mpp), 60)}")
    return v


def normalize_split(split: Any) -> str | None:
    if split is None or (isinstance(split, str) and not split.strip()):
        return None
    s = str(split).strip().lower()
    s = _SPLIT_ALIASES.get(s, s)
    if s not in SPLITS:
        raise ProjectError(f"split {split!r} is not one of {', '.join(SPLITS)} (or empty)")
    return s


def check_slide_classes(names: Sequence[str]) -> list[str]:
    """The slide-level class names, stripped; refuses a bare string, empty names and duplicates.

    Public because both ways of making a project check the list the same way: ``create`` and
    ``set_slide_classes`` (folder.py) and the cohort CSV import (cohort_csv.py), which checks it
    before reading a single row so that a bad list is reported before any slide is opened."""
    if isinstance(names, str):
        raise ProjectError(f"slide classes must be a list of names, got the single string {names!r}")
    out = [str(n).strip() for n in names]
    if not out or any(not n for n in out):
        raise ProjectError(f"slide classes must be non-empty names, got {list(names)!r}")
    dups = sorted({n for n in out if out.count(n) > 1})
    if dups:
        raise ProjectError(f"slide classes are listed twice: {', '.join(dups)}")
    return out


def check_slide_label(label: Any, slide_classes: Sequence[str]) -> str | None:
    """A slide-level label as stored: one of ``slide_classes`` given by name or by index (``0`` = the
    first), or None for no label (None or an empty string)."""
    if label is None or (isinstance(label, str) and not label.strip()):
        return None
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if 0 <= int(label) < len(slide_classes):
            return slide_classes[int(label)]
    elif str(label) in slide_classes:
        return str(label)
    valid = ", ".join(f"{i} {n}" for i, n in enumerate(slide_classes))
    raise ProjectError(f"slide label {label!r} is not one of the project's slide classes ({valid})")


def read_project_file(root: Path) -> dict:
    """The parsed ``project.json`` of ``root``, after checking it is a project file of a schema this
    version reads; a ProjectError says what is wrong (no project, damaged JSON, newer schema)."""
    path = root / PROJECT_FILE
    if not path.is_file():
        if not root.exists():
            raise ProjectError(f"{root} does not exist")
        raise ProjectError(f"{root} is not a napari-wsimil project (no {PROJECT_FILE}); create one with "
                           "Project.create or `wsimil project create`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProjectError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ProjectError(f"{path} is not valid JSON ({exc}); was it edited by hand?") from exc
    if not isinstance(data, dict) or "schema" not in data:
        raise ProjectError(f"{path} is not a napari-wsimil project file (no \"schema\")")
    try:
        schema = int(data["schema"])
    except (TypeError, ValueError):
        raise ProjectError(f"{path}: schema {data['schema']!r} is not a version number") from None
    if schema > SCHEMA_VERSION:
        raise ProjectError(f"{root} was saved by a newer napari-wsimil (project schema {schema}; this version "
                           f"reads up to {SCHEMA_VERSION}); update napari-wsimil to open it")
    if schema < 1:
        raise ProjectError(f"{path}: schema {schema} is not a valid version")
    return data

