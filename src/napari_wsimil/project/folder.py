"""The project folder: a cohort of slides, their slide-level labels, pixel labels and annotations.

Layout (everything a human may want to read is plain text)::

    DIR/project.json              name, label µm/px, class table, slide classes, slides (see schema.py)
    DIR/.lock                     held (flock) by the one process that may write; says who it is
    DIR/labels/<slide_id>.zarr    pixel labels, zarr v3 uint8, 512² chunks (see pixel_labels.py)
    DIR/annotations/<id>.geojson  boxes and polygons, QuPath GeoJSON (see annotations.py)
    DIR/removed/                  labels of removed slides, kept rather than deleted
    DIR/runs, features, predictions   room for training, feature caches and outputs

Why one writer: the napari widgets save after every stroke; two windows on one folder would
silently overwrite each other's labels. The second opener gets the project read-only and is told
which process holds it. Every file is replaced atomically (see napari_wsimil.io.atomic), so a crash
at any moment leaves the previous project.json, GeoJSON or label chunk readable.

Slide paths are stored relative to the project folder when the slide lies inside it (the folder can
then be moved or shared whole), absolute otherwise. Slide dimensions and pixel size are recorded
when a slide is added, so labels can be sized, imported and exported without opening the slide,
and so that a relinked file can be checked to be the same slide.

:class:`ProjectFolder` holds the state, lock, classes and slides; pixel labels and annotations come
from two mixins on that state (label_access.py, annotation_access.py). See project.py for the layers.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..io.atomic import clean_temporaries, fsync_dir, write_text
from ..io.raster_store import exists as store_exists
from .annotation_access import AnnotationAccess
from .classes import ClassDef, build_classes, check_name, new_class, normalize_color
from .errors import ProjectError
from .label_access import PixelLabelAccess
from .lock import LockOwner, ProjectLock
from .pixel_labels import store_path
from .schema import (PROJECT_FILE, ProjectData, SlideRecord, check_mpp, check_slide_classes, check_slide_id,
                     check_slide_label, id_from_path, normalize_split, read_project_file, resolve_stored,
                     stored_path, unique_id)

if TYPE_CHECKING:  # pragma: no cover
    from napari_wsimil.slide import Slide

_F = TypeVar("_F", bound="ProjectFolder")


class ProjectFolder(PixelLabelAccess, AnnotationAccess):
    """An open project folder: its slides, classes, pixel labels and annotations, and the write lock.
    Use :class:`~.project.Project`, which adds cohort CSV import/export and mask export; close it (or
    use ``with``) to release the write lock."""

    # ------------------------------------------------------------------------------ construction
    def __init__(self, root: Path, data: dict, lock: ProjectLock | None, readonly_reason: str | None):
        self.root = root
        self._lock = lock
        self._readonly_reason = readonly_reason
        self._mutex = threading.RLock()
        self._stores = {}  # open label stores, see PixelLabelAccess
        self._closed = False
        self.damage: list = []  # filled by open() from the cheap check (see project/check.py)
        self._load(data)

    @classmethod
    def create(cls: type[_F], dir: str | os.PathLike[str], name: str | None = None,
               classes: Iterable[Any] | None = None, slide_classes: Sequence[str] = ("benign", "malignant"),
               label_mpp: float = 4.0) -> _F:
        """Make a new project in ``dir`` (created if missing; may already hold slides). Refuses a folder
        that already has a project."""
        root = Path(dir).expanduser().resolve()
        if (root / PROJECT_FILE).exists():
            raise ProjectError(f"{root} already holds a project; open it with Project.open (or pick another folder)")
        if root.exists() and not root.is_dir():
            raise ProjectError(f"{root} is a file, not a folder")
        label_mpp_v = check_mpp(label_mpp, "the label resolution")
        table = build_classes(classes)
        sc = check_slide_classes(slide_classes)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProjectError(f"cannot create the project folder {root}: {exc.strerror or exc}") from exc
        lock = ProjectLock(root)
        if not lock.acquire():
            raise ProjectError(f"{root} is being created by another process ({lock.owner()})")
        created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        data = ProjectData(name or root.name, label_mpp_v, table, sc, records={}, created=created)
        p = cls(root, data.to_json(), lock, None)
        try:
            p._save()
        except BaseException:
            lock.release()
            raise
        return p

    @classmethod
    def open(cls: type[_F], dir: str | os.PathLike[str], readonly: bool = False) -> _F:
        """Open a project. Takes the write lock; if another process (or window) holds it, opens read-only
        (``readonly`` True, ``lock_owner`` says who)."""
        from .check import open_damage, project_file_damage

        root = Path(dir).expanduser().resolve()
        data, damaged = project_file_damage(root)
        if data is None:
            raise ProjectError(f"{root}: {damaged.what}")
        lock: ProjectLock | None = None
        reason = "opened read-only on request" if readonly else None
        if damaged is not None:  # writing now would replace the only good copy by the damaged file's successor
            readonly = True
            reason = (f"{damaged.what}; opened read-only from its previous good copy. Repair it with "
                      f"`wsimil project check {root} --repair` or the Check button")
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
        p.damage = ([damaged] if damaged is not None else []) + open_damage(root)
        return p

    def reload(self) -> None:
        """Re-read project.json, e.g. in a read-only window after the writer saved."""
        with self._mutex:
            self._load(read_project_file(self.root))
            self._drop_stores()

    def _load(self, data: dict) -> None:
        d = ProjectData.from_json(data, self.root)
        self.schema_version, self.name, self.label_mpp = d.schema, d.name, d.label_mpp
        self._classes, self._slide_classes, self._records = d.classes, d.slide_classes, d.records
        self._created = d.created

    # ------------------------------------------------------------------------------------ state
    _owner: LockOwner | None = None

    @property
    def readonly(self) -> bool:
        return self._closed or self._lock is None or not self._lock.held

    @property
    def lock_owner(self) -> LockOwner | None:
        """Who holds the write lock when this project was opened read-only because of it."""
        return self._owner

    def writer(self) -> LockOwner | None:
        """Who has the project open for writing, when it is not this object (None if nobody): what a
        read-only opener (the CLI beside a napari window) tells its user."""
        if self._lock is not None and self._lock.held:
            return None
        lock = ProjectLock(self.root)
        return lock.owner() if lock.held_elsewhere() else None

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
            self._drop_stores()
            if self._lock is not None:
                self._lock.release()
            self._closed = True

    def __enter__(self: _F) -> _F:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = " read-only" if self.readonly else ""
        return f"<Project {self.name!r} at {self.root}: {len(self._records)} slides{mode}>"

    # ----------------------------------------------------------------------------------- saving
    def _to_json(self) -> dict:
        return ProjectData(self.name, self.label_mpp, self._classes, self._slide_classes, self._records,
                           self._created).to_json()

    def _save(self) -> None:
        write_text(self.root / PROJECT_FILE, json.dumps(self._to_json(), indent=2, ensure_ascii=False) + "\n",
                   keep_previous=True)

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
        cd = new_class(self._classes, name, color)

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
        self._rename_in_annotations(old.name, name)
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
        sc = check_slide_classes(names)
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
        return resolve_stored(self.root, stored)

    def slide_path(self, slide_id: str) -> Path:
        return self.resolve(self.record(slide_id).path)

    def _stored(self, path: Path) -> Path:
        return stored_path(self.root, path)

    def slide_mpp(self, slide_id: str) -> float | None:
        """µm/px at level 0 as used for this slide: the override, else what the file said."""
        rec = self.record(slide_id)
        return rec.mpp if rec.mpp is not None else rec.scan_mpp

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
        label = check_slide_label(label, self._slide_classes)
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
                sid = rec.slide_id or unique_id(id_from_path(Path(rec.path)), self._records)
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
        self._drop_stores(slide_id)

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
        return self._update(slide_id, label=check_slide_label(label, self._slide_classes))

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
        writer = self.writer()
        return {
            "name": self.name, "root": str(self.root), "schema": self.schema_version, "label_mpp": self.label_mpp,
            "readonly": self.readonly, "lock_owner": str(self._owner) if self._owner else None,
            "writer": str(writer) if writer else None, "damage": [str(d) for d in self.damage],
            "classes": [c.to_json() for c in self._classes], "slide_classes": list(self._slide_classes),
            "slides": slides,
        }

