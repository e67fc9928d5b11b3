"""The project folder: a cohort of slides, their slide-level labels, pixel labels and annotations.

Layout (everything a human may want to read is plain text)::

    DIR/project.json              schema, name, label µm/px, class table, slide-level classes, slides
    DIR/.lock                     held (flock) by the one process that may write; says who it is
    DIR/labels/<slide_id>.zarr    pixel labels, zarr v3 uint8, 512² chunks (see pixel_labels.py)
    DIR/annotations/<id>.geojson  boxes and polygons, QuPath GeoJSON (see annotations.py)
    DIR/removed/                  labels of removed slides, kept rather than deleted
    DIR/runs, features, predictions   room for training, feature caches and outputs

Why one writer: the napari widgets save after every stroke; two windows on one folder would
silently overwrite each other's labels. The second opener gets the project read-only and is told
which process holds it. Every file is replaced atomically (see atomic.py), so a crash at any moment
leaves the previous project.json, GeoJSON or label chunk readable.

Slide paths are stored relative to the project folder when the slide lies inside it (the folder can
then be moved or shared whole), absolute otherwise. Slide dimensions and pixel size are recorded
when a slide is added, so labels can be sized, imported and exported without opening the slide,
and so that a relinked file can be checked to be the same slide.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .annotations import Annotation, read_geojson, validate_annotations, write_geojson
from ..io.atomic import clean_temporaries, fsync_dir, write_text
from ..io.raster_store import LabelStore, dirty_chunks, label_shape
from ..io.raster_store import exists as store_exists
from .classes import (MAX_CLASS_ID, UNLABELLED, ClassDef, build_classes, check_name, check_table, next_color,
                      normalize_color)
from .errors import ProjectError
from .lock import LockOwner, ProjectLock
from .pixel_labels import LabelGeometry, as_label_array, class_counts, compute_geometry, count_values, store_path

if TYPE_CHECKING:  # pragma: no cover
    from napari_wsimil.slide import Slide

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
        return cls(
            slide_id=str(d["slide_id"]), path=Path(d["path"]), label=d.get("label"), split=d.get("split"),
            mpp=_opt_float(d.get("mpp")), dimensions=(int(dims[0]), int(dims[1])) if dims else None,
            scan_mpp=_opt_float(d.get("scan_mpp")), gt_mask=Path(d["gt_mask"]) if d.get("gt_mask") else None,
            gt_downsample=_opt_float(d.get("gt_downsample")),
            extra={str(k): str(v) for k, v in (d.get("extra") or {}).items()},
        )


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


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


def check_mpp(mpp: Any, what: str = "pixel size") -> float | None:
    if mpp is None:
        return None
    try:
        v = float(mpp)
    except (TypeError, ValueError):
        raise ProjectError(f"{what} must be a number of µm per pixel, got {mpp!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ProjectError(f"{what} must be a positive number of µm per pixel, got {mpp!r}")
    return v


def normalize_split(split: Any) -> str | None:
    if split is None or (isinstance(split, str) and not split.strip()):
        return None
    s = str(split).strip().lower()
    s = _SPLIT_ALIASES.get(s, s)
    if s not in SPLITS:
        raise ProjectError(f"split {split!r} is not one of {', '.join(SPLITS)} (or empty)")
    return s


class Project:
    """An open project folder. Use :meth:`create`, :meth:`create_from_csv` or :meth:`open`; close it
    (or use ``with``) to release the write lock."""

    # ------------------------------------------------------------------------------ construction
    def __init__(self, root: Path, data: dict, lock: ProjectLock | None, readonly_reason: str | None):
        self.root = root
        self._lock = lock
        self._readonly_reason = readonly_reason
        self._mutex = threading.RLock()
        self._stores: dict[str, LabelStore] = {}
        self._closed = False
        self._load(data)

    @classmethod
    def create(cls, dir: str | os.PathLike[str], name: str | None = None, classes: Iterable[Any] | None = None,
               slide_classes: Sequence[str] = ("benign", "malignant"), label_mpp: float = 4.0) -> Project:
        """Make a new project in ``dir`` (created if missing; may already hold slides). Refuses a folder
        that already has a project."""
        root = Path(dir).expanduser().resolve()
        if (root / PROJECT_FILE).exists():
            raise ProjectError(f"{root} already holds a project; open it with Project.open (or pick another folder)")
        if root.exists() and not root.is_dir():
            raise ProjectError(f"{root} is a file, not a folder")
        label_mpp_v = check_mpp(label_mpp, "the label resolution")
        table = build_classes(classes)
        sc = _check_slide_classes(slide_classes)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProjectError(f"cannot create the project folder {root}: {exc.strerror or exc}") from exc
        lock = ProjectLock(root)
        if not lock.acquire():
            raise ProjectError(f"{root} is being created by another process ({lock.owner()})")
        data = {
            "schema": SCHEMA_VERSION, "name": name or root.name, "label_mpp": label_mpp_v,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "classes": [c.to_json() for c in table],
            "slide_classes": sc, "slides": [],
        }
        p = cls(root, data, lock, None)
        try:
            p._save()
        except BaseException:
            lock.release()
            raise
        return p

    @classmethod
    def create_from_csv(cls, dir: str | os.PathLike[str], csv_path: str | os.PathLike[str], label_mpp: float = 4.0,
                        **kwargs: Any) -> Project:
        """A new project holding the cohort of a CSV (see cohort_csv.py for the columns). Every row is
        checked first; all problems come in one ProjectError and nothing is written."""
        from .cohort_csv import create_from_csv

        return create_from_csv(cls, dir, csv_path, label_mpp=label_mpp, **kwargs)

    @classmethod
    def open(cls, dir: str | os.PathLike[str], readonly: bool = False) -> Project:
        """Open a project. Takes the write lock; if another process (or window) holds it, opens read-only
        (``readonly`` True, ``lock_owner`` says who)."""
        root = Path(dir).expanduser().resolve()
        data = _read_project_file(root)
        lock: ProjectLock | None = None
        reason = "opened read-only on request" if readonly else None
        if not readonly:
            lock = ProjectLock(root)
            try:
                got = lock.acquire()
            except OSError as exc:
                got = False
                reason = f"the folder is not writable ({exc.strerror or exc}); opened read-only"
                lock = None
            if lock is not None and not got:
                reason = None  # filled from the owner in _readonly_message
            elif got:
                clean_temporaries(root)
                for sub in ("labels", "annotations"):
                    if (root / sub).is_dir():
                        clean_temporaries(root / sub, recursive=True)
        p = cls(root, data, lock, reason)
        if lock is not None and not lock.held:
            p._owner = lock.owner()
        return p

    def reload(self) -> None:
        """Re-read project.json, e.g. in a read-only window after the writer saved."""
        with self._mutex:
            self._load(_read_project_file(self.root))
            self._stores.clear()

    def _load(self, data: dict) -> None:
        try:
            self.schema_version = int(data["schema"])
            self.name = str(data.get("name") or self.root.name)
            self.label_mpp = float(data.get("label_mpp", 4.0))
            self._classes = [ClassDef.from_json(c) for c in data["classes"]]
            check_table(self._classes)
            self._slide_classes = [str(s) for s in data.get("slide_classes", [])]
            self._records = {}
            for d in data.get("slides", []):
                rec = SlideRecord.from_json(d)
                self._records[rec.slide_id] = rec
            self._created = str(data.get("created", ""))
        except ProjectError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ProjectError(f"{self.root / PROJECT_FILE} is damaged ({type(exc).__name__}: {exc})") from exc

    # ------------------------------------------------------------------------------------ state
    _owner: LockOwner | None = None

    @property
    def readonly(self) -> bool:
        return self._closed or self._lock is None or not self._lock.held

    @property
    def lock_owner(self) -> LockOwner | None:
        """Who holds the write lock when this project was opened read-only because of it."""
        return self._owner

    def _readonly_message(self) -> str:
        if self._closed:
            return f"project '{self.name}' is closed"
        if self._owner is not None:
            return (f"project '{self.name}' is open in another window ({self._owner}); opened read-only. "
                    "Close it there and reopen the project here to make changes")
        return f"project '{self.name}': {self._readonly_reason or 'opened read-only'}"

    def _check_writable(self) -> None:
        if self.readonly:
            raise ProjectError(self._readonly_message())

    def close(self) -> None:
        with self._mutex:
            self._stores.clear()
            if self._lock is not None:
                self._lock.release()
            self._closed = True

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = " read-only" if self.readonly else ""
        return f"<Project {self.name!r} at {self.root}: {len(self._records)} slides{mode}>"

    # ----------------------------------------------------------------------------------- saving
    def _to_json(self) -> dict:
        return {
            "schema": SCHEMA_VERSION, "name": self.name, "label_mpp": self.label_mpp, "created": self._created,
            "classes": [c.to_json() for c in self._classes], "slide_classes": list(self._slide_classes),
            "slides": [r.to_json() for r in self._records.values()],
        }

    def _save(self) -> None:
        write_text(self.root / PROJECT_FILE, json.dumps(self._to_json(), indent=2, ensure_ascii=False) + "\n")

    def _commit(self, apply: Any) -> Any:
        """Apply a change to the in-memory state and save; if the save fails, undo the change."""
        with self._mutex:
            self._check_writable()
            before = (list(self._classes), list(self._slide_classes), dict(self._records), self.name)
            try:
                result = apply()
                self._save()
            except BaseException:
                self._classes, self._slide_classes, self._records, self.name = before
                raise
            return result

    # ------------------------------------------------------------------------------------ folders
    def _subdir(self, name: str) -> Path:
        path = self.root / name
        if not self.readonly:
            path.mkdir(exist_ok=True)
        return path

    @property
    def runs_dir(self) -> Path:
        return self._subdir("runs")

    @property
    def features_dir(self) -> Path:
        return self._subdir("features")

    @property
    def predictions_dir(self) -> Path:
        return self._subdir("predictions")

    # ------------------------------------------------------------------------------------ classes
    @property
    def classes(self) -> list[ClassDef]:
        return list(self._classes)

    def class_by_name(self, name: str) -> ClassDef:
        for c in self._classes:
            if c.name == name:
                return c
        raise ProjectError(f"no class {name!r} in project '{self.name}'; classes: "
                           f"{', '.join(c.name for c in self._classes)}")

    def class_by_id(self, class_id: int) -> ClassDef:
        for c in self._classes:
            if c.id == int(class_id):
                return c
        raise ProjectError(f"no class with id {class_id} in project '{self.name}'; ids: "
                           f"{', '.join(f'{c.id} {c.name}' for c in self._classes)}")

    def add_class(self, name: str, color: str | None = None) -> ClassDef:
        check_name(name)
        if any(c.name == name for c in self._classes):
            raise ProjectError(f"class {name!r} already exists")
        new_id = max(c.id for c in self._classes) + 1
        if new_id > MAX_CLASS_ID:
            raise ProjectError(f"a project holds at most {MAX_CLASS_ID} classes (labels are 8-bit)")
        cd = ClassDef(new_id, name, normalize_color(color) if color else next_color(c.color for c in self._classes))

        def apply() -> ClassDef:
            self._classes.append(cd)
            return cd

        return self._commit(apply)

    def rename_class(self, class_id: int, name: str) -> ClassDef:
        """Rename a class; pixel labels keep their ids, annotation files are rewritten with the new name."""
        check_name(name)
        old = self.class_by_id(class_id)
        if old.id == 0:
            raise ProjectError("class 0 (unlabelled) is reserved and cannot be renamed")
        if old.name == name:
            return old
        if any(c.name == name for c in self._classes):
            raise ProjectError(f"class {name!r} already exists")
        new = replace(old, name=name)

        def apply() -> ClassDef:
            self._classes = [new if c.id == old.id else c for c in self._classes]
            return new

        self._commit(apply)
        with self._mutex:
            for rec in self._records.values():
                path = self._annotation_path(rec.slide_id)
                if path.exists():
                    anns = read_geojson(path)
                    if any(a.class_name == old.name for a in anns):
                        anns = [replace(a, class_name=name) if a.class_name == old.name else a for a in anns]
                        write_geojson(path, anns, self._classes)
        return new

    def recolor_class(self, class_id: int, color: str) -> ClassDef:
        old = self.class_by_id(class_id)
        if old.id == 0:
            raise ProjectError("class 0 (unlabelled) is reserved and always transparent")
        new = replace(old, color=normalize_color(color))

        def apply() -> ClassDef:
            self._classes = [new if c.id == old.id else c for c in self._classes]
            return new

        return self._commit(apply)

    @property
    def slide_classes(self) -> list[str]:
        return list(self._slide_classes)

    def set_slide_classes(self, names: Sequence[str]) -> None:
        """Replace the slide-level label names; refused if a slide's label would disappear."""
        sc = _check_slide_classes(names)
        used = sorted({r.label for r in self._records.values() if r.label is not None} - set(sc))
        if used:
            raise ProjectError(f"slides are labelled {', '.join(used)}, which the new list lacks")

        def apply() -> None:
            self._slide_classes = sc

        self._commit(apply)

    # ------------------------------------------------------------------------------------ slides
    @property
    def slides(self) -> list[SlideRecord]:
        return list(self._records.values())

    @property
    def slide_ids(self) -> list[str]:
        return list(self._records)

    def record(self, slide_id: str) -> SlideRecord:
        try:
            return self._records[slide_id]
        except KeyError:
            known = list(self._records)
            shown = ", ".join(known[:20]) + (f", … ({len(known)} in all)" if len(known) > 20 else "")
            raise ProjectError(f"no slide {slide_id!r} in project '{self.name}'; "
                               f"slides: {shown or 'none yet'}") from None

    def resolve(self, stored: Path) -> Path:
        """Absolute path of a path as stored in the project (relative ones are relative to its folder)."""
        return stored if stored.is_absolute() else self.root / stored

    def slide_path(self, slide_id: str) -> Path:
        return self.resolve(self.record(slide_id).path)

    def _stored(self, path: Path) -> Path:
        path = path.resolve()
        try:
            return path.relative_to(self.root)
        except ValueError:
            return path

    def slide_mpp(self, slide_id: str) -> float | None:
        """µm/px at level 0 as used for this slide: the override, else what the file said."""
        rec = self.record(slide_id)
        return rec.mpp if rec.mpp is not None else rec.scan_mpp

    def _check_label(self, label: Any) -> str | None:
        if label is None or (isinstance(label, str) and not label.strip()):
            return None
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            if 0 <= int(label) < len(self._slide_classes):
                return self._slide_classes[int(label)]
        elif str(label) in self._slide_classes:
            return str(label)
        valid = ", ".join(f"{i} {n}" for i, n in enumerate(self._slide_classes))
        raise ProjectError(f"slide label {label!r} is not one of the project's slide classes ({valid})")

    def _find_path(self, path: Path, exclude: str | None = None) -> SlideRecord | None:
        for rec in self._records.values():
            if rec.slide_id == exclude:
                continue
            other = self.resolve(rec.path)
            if other == path:
                return rec
            try:
                if other.exists() and path.exists() and os.path.samefile(other, path):
                    return rec
            except OSError:
                continue
        return None

    def _unique_id(self, base: str) -> str:
        if base not in self._records:
            return base
        i = 2
        while f"{base}_{i}" in self._records:
            i += 1
        return f"{base}_{i}"

    def add_slide(self, path: str | os.PathLike[str], slide_id: str | None = None, label: Any = None,
                  split: str | None = None, mpp: float | None = None) -> SlideRecord:
        """Add a slide after opening it (a SlideError says why a file is not a readable slide)."""
        from napari_wsimil.slide import open_slide

        self._check_writable()
        abs_path = Path(path).expanduser().resolve()
        if not abs_path.exists():
            raise ProjectError(f"slide file {abs_path} does not exist")
        dup = self._find_path(abs_path)
        if dup is not None:
            raise ProjectError(f"{abs_path.name} is already in the project as slide '{dup.slide_id}'")
        if slide_id is not None:
            check_slide_id(slide_id)
            if slide_id in self._records:
                raise ProjectError(f"slide id '{slide_id}' is already used (by {self._records[slide_id].path})")
        label = self._check_label(label)
        split = normalize_split(split)
        mpp = check_mpp(mpp)
        with open_slide(abs_path, mpp=mpp) as slide:
            dims = slide.dimensions
            scan_mpp = slide.file_mpp
        rec = SlideRecord(slide_id or "", self._stored(abs_path), label, split, mpp, dims, scan_mpp)
        return self._add_record(rec)

    def _add_record(self, rec: SlideRecord) -> SlideRecord:
        return self._add_records([rec])[0]

    def _add_records(self, records: Sequence[SlideRecord]) -> list[SlideRecord]:
        """Add checked records in one save (a 1,000-slide CSV must not rewrite project.json 1,000 times)."""
        def apply() -> list[SlideRecord]:
            added = []
            for rec in records:
                sid = rec.slide_id or self._unique_id(id_from_path(Path(rec.path)))
                if sid in self._records:
                    raise ProjectError(f"slide id '{sid}' is already used")
                new = replace(rec, slide_id=sid)
                self._set_aside(sid)  # leftovers of a removed slide of the same id must not resurface
                self._records[sid] = new
                added.append(new)
            return added

        return self._commit(apply)

    def _set_aside(self, slide_id: str) -> None:
        """Move a slide's label files into removed/ (kept, never deleted: labels are work)."""
        moved = False
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.root / "removed" / f"{slide_id}-{stamp}"
        for src in (store_path(self.root, slide_id), self._annotation_path(slide_id)):
            if src.exists():
                target.mkdir(parents=True, exist_ok=True)
                shutil.move(str(src), str(target / src.name))
                fsync_dir(src.parent)
                moved = True
        if moved:
            fsync_dir(target)
        self._stores.pop(slide_id, None)

    def remove_slide(self, slide_id: str) -> None:
        """Remove a slide from the cohort; its labels are moved to ``removed/``, not deleted."""
        self.record(slide_id)

        def apply() -> None:
            del self._records[slide_id]

        self._commit(apply)
        with self._mutex:
            self._set_aside(slide_id)

    def _update(self, slide_id: str, **changes: Any) -> SlideRecord:
        self.record(slide_id)

        def apply() -> SlideRecord:
            new = replace(self._records[slide_id], **changes)
            self._records[slide_id] = new
            return new

        return self._commit(apply)

    def set_slide_label(self, slide_id: str, label: Any) -> SlideRecord:
        return self._update(slide_id, label=self._check_label(label))

    def set_split(self, slide_id: str, split: str | None) -> SlideRecord:
        return self._update(slide_id, split=normalize_split(split))

    def set_slide_mpp(self, slide_id: str, mpp: float | None) -> SlideRecord:
        """Override (or, with None, stop overriding) a slide's µm/px. Labels already saved keep their
        downsample, so they stay aligned; only their µm/px changes."""
        return self._update(slide_id, mpp=check_mpp(mpp))

    def set_ground_truth(self, slide_id: str, gt_mask: str | os.PathLike[str] | None,
                         gt_downsample: float | None = None) -> SlideRecord:
        """Record an evaluation-only ground-truth mask (never used as training labels)."""
        if gt_mask is None:
            return self._update(slide_id, gt_mask=None, gt_downsample=None)
        p = Path(gt_mask).expanduser().resolve()
        if not p.is_file():
            raise ProjectError(f"ground-truth mask {p} does not exist")
        ds = check_mpp(gt_downsample, "the ground-truth downsample")
        return self._update(slide_id, gt_mask=self._stored(p), gt_downsample=ds)

    def open_slide(self, slide_id: str) -> Slide:
        from napari_wsimil.slide import open_slide

        rec = self.record(slide_id)
        path = self.resolve(rec.path)
        if not path.exists():
            raise ProjectError(f"slide '{slide_id}': its file {path} is missing (moved, renamed or on a drive "
                               f"that is not mounted); point the project to its new place with project.relink('{slide_id}', "
                               "NEW_PATH) or the Relink button")
        return open_slide(path, mpp=rec.mpp)

    def missing_slides(self) -> list[SlideRecord]:
        return [r for r in self._records.values() if not self.resolve(r.path).exists()]

    def relink(self, slide_id: str, new_path: str | os.PathLike[str]) -> SlideRecord:
        """Point a slide at its file's new location, after checking it is the same slide (same size)."""
        from napari_wsimil.slide import open_slide

        rec = self.record(slide_id)
        self._check_writable()
        p = Path(new_path).expanduser().resolve()
        if not p.exists():
            raise ProjectError(f"{p} does not exist")
        dup = self._find_path(p, exclude=slide_id)
        if dup is not None:
            raise ProjectError(f"{p.name} is already in the project as slide '{dup.slide_id}'")
        with open_slide(p, mpp=rec.mpp) as slide:
            dims, file_mpp = slide.dimensions, slide.file_mpp
        if rec.dimensions is not None and tuple(dims) != tuple(rec.dimensions):
            raise ProjectError(f"{p.name} is {dims[0]} x {dims[1]} px but slide '{slide_id}' was "
                               f"{rec.dimensions[0]} x {rec.dimensions[1]} px: it is not the same slide")
        return self._update(slide_id, path=self._stored(p), dimensions=tuple(dims),
                            scan_mpp=rec.scan_mpp if rec.scan_mpp is not None else file_mpp)

    # ------------------------------------------------------------------------------ pixel labels
    def label_geometry(self, slide_id: str) -> LabelGeometry:
        """Downsample, µm/px and shape of the slide's label array (from the saved labels if any)."""
        rec = self.record(slide_id)
        if rec.dimensions is None:
            raise ProjectError(f"slide '{slide_id}' has no recorded size; relink it to record it")
        mpp = self.slide_mpp(slide_id)
        computed = compute_geometry(rec.dimensions, mpp, self.label_mpp)
        store = self._label_store(slide_id, create=False)
        if store is None:
            return computed
        ds = float(store.attrs.get("downsample", computed.downsample))
        shape = store.shape
        if abs(ds - computed.downsample) <= 1e-9 * ds and shape == computed.shape:
            return computed
        if shape != label_shape(rec.dimensions, ds):
            raise ProjectError(f"the saved labels of '{slide_id}' ({shape[1]} x {shape[0]} at downsample {ds:g}) "
                               f"do not cover the slide ({rec.dimensions[0]} x {rec.dimensions[1]} px)")
        note = (f"labels were saved at downsample {ds:g}; the slide's pixel size has changed since, so they keep "
                "that downsample to stay aligned")
        return LabelGeometry(ds, None if mpp is None else mpp * ds, shape, note)

    def _label_store(self, slide_id: str, create: bool, geometry: LabelGeometry | None = None) -> LabelStore | None:
        with self._mutex:
            store = self._stores.get(slide_id)
            if store is not None:
                return store
            path = store_path(self.root, slide_id)
            if store_exists(path):
                store = LabelStore.open(path, readonly=self.readonly)
            elif create:
                self._check_writable()
                geometry = geometry or self.label_geometry(slide_id)
                store = LabelStore.create(path, geometry, self._label_attrs(slide_id, geometry))
            else:
                return None
            self._stores[slide_id] = store
            return store

    def _label_attrs(self, slide_id: str, geometry: LabelGeometry) -> dict:
        rec = self.record(slide_id)
        return {
            "slide_id": slide_id, "downsample": geometry.downsample, "mpp": geometry.mpp,
            "slide_dimensions": list(rec.dimensions or ()), "classes": [c.to_json() for c in self._classes],
        }

    def has_pixel_labels(self, slide_id: str) -> bool:
        self.record(slide_id)
        return store_exists(store_path(self.root, slide_id))

    def pixel_labels(self, slide_id: str) -> np.ndarray:
        """The slide's labels at label resolution (uint8 class ids; zeros where nothing is labelled)."""
        geometry = self.label_geometry(slide_id)
        store = self._label_store(slide_id, create=False)
        if store is None:
            return np.zeros(geometry.shape, np.uint8)
        return store.read()

    def pixel_label_points(self, slide_id: str) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], float] | None:
        """``(read_points, downsample)`` for the slide's saved labels, None when nothing is painted.

        ``read_points(rows, cols)`` returns ``labels[np.ix_(rows, cols)]`` decoding only the chunks it
        touches, so training code can sample labels under patches without loading the whole array."""
        if not self.has_pixel_labels(slide_id):
            return None
        geometry = self.label_geometry(slide_id)
        store = self._label_store(slide_id, create=False)
        return (store.read_points, geometry.downsample) if store is not None else None

    def _check_class_ids(self, counts: np.ndarray, slide_id: str) -> None:
        known = {c.id for c in self._classes}
        bad = [int(v) for v in np.flatnonzero(counts) if int(v) not in known]
        if bad:
            raise ProjectError(f"labels of '{slide_id}' contain values that are not class ids: "
                               + ", ".join(f"{v} ({counts[v]:,} px)" for v in bad)
                               + f"; classes: {', '.join(f'{c.id} {c.name}' for c in self._classes)}")

    def save_pixel_labels(self, slide_id: str, array: Any, dirty: Iterable[Sequence[int]] | None = None) -> int:
        """Save labels; with ``dirty`` boxes (y0, y1, x0, x1 in label px) only the chunks they touch are
        written. Each chunk file is replaced atomically. Returns the number of chunks written."""
        self._check_writable()
        geometry = self.label_geometry(slide_id)
        arr = as_label_array(array, geometry.shape, slide_id)
        with self._mutex:
            if dirty is None:
                self._check_class_ids(class_counts(arr), slide_id)
                store = self._label_store(slide_id, create=True, geometry=geometry)
                store.update_attrs({"classes": [c.to_json() for c in self._classes]})
                store.write_all(arr)
                h, w = geometry.shape
                return -(-h // store.array.chunks[0]) * -(-w // store.array.chunks[1])
            chunks = dirty_chunks(dirty, geometry.shape)
            if not chunks:
                return 0
            from ..io.raster_store import CHUNK

            boxes = [(cy * CHUNK, (cy + 1) * CHUNK, cx * CHUNK, (cx + 1) * CHUNK) for cy, cx in chunks]
            self._check_class_ids(class_counts(arr, boxes), slide_id)
            store = self._label_store(slide_id, create=True, geometry=geometry)
            store.update_attrs({"classes": [c.to_json() for c in self._classes]})
            return store.write_chunks(arr, chunks)

    def import_mask(self, slide_id: str, mask_path: str | os.PathLike[str], downsample: float | None = None,
                    values: Mapping[int, int] | None = None) -> dict[str, int]:
        """Replace the slide's pixel labels by a mask image (TIFF, OME-TIFF or PNG of class ids).

        The mask is resampled (nearest) from its downsample to label resolution, band by band; see
        mask_io.py for how its downsample is found when not given. ``values`` maps mask values to
        class ids (e.g. ``{255: 1}`` for a 0/255 tumour mask). Everything is checked before anything
        is written. Returns pixels per class name.
        """
        from .mask_io import MaskImage, choose_downsample, resampled_bands
        from ..io.raster_store import CHUNK

        self._check_writable()
        rec = self.record(slide_id)
        geometry = self.label_geometry(slide_id)
        lut = self._value_lut(values)
        path = Path(mask_path)
        with MaskImage(path) as mask:
            ds = choose_downsample(mask, rec.dimensions, self.slide_mpp(slide_id), geometry, downsample)
            counts = np.zeros(256, np.int64)
            for _, band in resampled_bands(mask, ds, geometry, CHUNK):
                count_values(lut[band], counts)
            try:
                self._check_class_ids(counts, slide_id)
            except ProjectError as exc:
                raise ProjectError(f"cannot import {path.name}: {exc}. Map mask values to class ids with "
                                   "values={mask_value: class_id}") from None
            with self._mutex:
                store = self._label_store(slide_id, create=True, geometry=geometry)
                store.update_attrs({"classes": [c.to_json() for c in self._classes]})
                for y0, band in resampled_bands(mask, ds, geometry, CHUNK):
                    store.write_rows(y0, lut[band])
        names = {c.id: c.name for c in self._classes}
        return {names[int(v)]: int(counts[v]) for v in np.flatnonzero(counts)}

    @staticmethod
    def _value_lut(values: Mapping[int, int] | None) -> np.ndarray:
        lut = np.arange(256, dtype=np.uint8)
        for k, v in (values or {}).items():
            if not (0 <= int(k) <= 255 and 0 <= int(v) <= MAX_CLASS_ID):
                raise ProjectError(f"value mapping {k} -> {v}: both must be 0-255")
            lut[int(k)] = int(v)
        return lut

    def export_mask(self, slide_id: str, out_path: str | os.PathLike[str], format: str = "ome-tiff",
                    mpp: float | None = None) -> Path:
        from .export import export_mask

        return export_mask(self, slide_id, out_path, format=format, mpp=mpp)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------- annotations
    def _annotation_path(self, slide_id: str) -> Path:
        return self.root / "annotations" / f"{slide_id}.geojson"

    def annotation_path(self, slide_id: str) -> Path | None:
        """The slide's GeoJSON file if it has saved annotations."""
        p = self._annotation_path(slide_id)
        return p if p.exists() else None

    def annotations(self, slide_id: str) -> list[Annotation]:
        self.record(slide_id)
        path = self._annotation_path(slide_id)
        return read_geojson(path) if path.exists() else []

    def save_annotations(self, slide_id: str, annotations: Sequence[Annotation]) -> Path:
        """Check every annotation (outline, class, inside the slide); save all or, on any problem,
        nothing, with a ProjectError listing every problem."""
        rec = self.record(slide_id)
        self._check_writable()
        annotations = list(annotations)
        validate_annotations(annotations, (c.name for c in self._classes), rec.dimensions,
                             what=f"the annotations of '{slide_id}'")
        with self._mutex:
            return write_geojson(self._annotation_path(slide_id), annotations, self._classes)

    def import_annotations(self, slide_id: str, geojson_path: str | os.PathLike[str],
                           add_missing_classes: bool = False, replace_existing: bool = True) -> list[Annotation]:
        """Import a GeoJSON file (QuPath's export or similar). Class names the project lacks are an
        error listing them, unless ``add_missing_classes`` (then they are added with the file's
        colours). A feature with no classification is class "unclassified"."""
        rec = self.record(slide_id)
        self._check_writable()
        anns = read_geojson(geojson_path)
        known = {c.name for c in self._classes}
        missing: dict[str, str | None] = {}
        for a in anns:
            if a.class_name not in known and a.class_name != UNLABELLED:
                missing.setdefault(a.class_name, a.color)
        if missing and not add_missing_classes:
            raise ProjectError(f"{Path(geojson_path).name} uses classes the project does not have: "
                               f"{', '.join(sorted(missing))} (project classes: "
                               f"{', '.join(c.name for c in self._classes if c.id)}); add them first or import "
                               "with add_missing_classes=True")
        names = known | set(missing)
        existing = [] if replace_existing else self.annotations(slide_id)
        taken = {a.id for a in existing}
        if taken:  # importing the same file twice must not give two annotations one id
            import uuid

            anns = [replace(a, id=str(uuid.uuid4())) if a.id in taken else a for a in anns]
        combined = existing + anns
        validate_annotations(combined, names, rec.dimensions, what=f"annotations from {Path(geojson_path).name}")
        for name, color in missing.items():
            self.add_class(name, color if color and color not in {c.color for c in self._classes} else None)
        self.save_annotations(slide_id, combined)
        return anns

    # ---------------------------------------------------------------------------------- cohort
    def export_csv(self, path: str | os.PathLike[str], masks: bool = False) -> Path:
        """Write the cohort CSV (see cohort_csv.py). With ``masks``, pixel labels are exported as
        OME-TIFFs beside it and listed, so ``create_from_csv`` rebuilds the whole project."""
        from .cohort_csv import export_csv

        return export_csv(self, path, masks=masks)

    def info(self) -> dict[str, Any]:
        """A JSON-able summary (for ``wsimil project info`` and logs)."""
        slides = []
        for rec in self._records.values():
            slides.append({
                "slide_id": rec.slide_id, "path": str(rec.path), "label": rec.label, "split": rec.split,
                "dimensions": list(rec.dimensions) if rec.dimensions else None, "mpp": self.slide_mpp(rec.slide_id),
                "pixel_labels": store_exists(store_path(self.root, rec.slide_id)),
                "annotations": self._annotation_path(rec.slide_id).exists(),
                "missing": not self.resolve(rec.path).exists(),
            })
        return {
            "name": self.name, "root": str(self.root), "schema": self.schema_version, "label_mpp": self.label_mpp,
            "readonly": self.readonly, "lock_owner": str(self._owner) if self._owner else None,
            "classes": [c.to_json() for c in self._classes], "slide_classes": list(self._slide_classes),
            "slides": slides,
        }


def _check_slide_classes(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise ProjectError(f"slide classes must be a list of names, got the single string {names!r}")
    out = [str(n).strip() for n in names]
    if not out or any(not n for n in out):
        raise ProjectError(f"slide classes must be non-empty names, got {list(names)!r}")
    dups = sorted({n for n in out if out.count(n) > 1})
    if dups:
        raise ProjectError(f"slide classes are listed twice: {', '.join(dups)}")
    return out


def _read_project_file(root: Path) -> dict:
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

