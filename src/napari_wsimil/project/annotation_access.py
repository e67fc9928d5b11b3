"""Annotation access of a project: each slide's boxes and polygons in ``DIR/annotations/<slide_id>.geojson``.

:class:`AnnotationAccess` is the part of :class:`~.folder.ProjectFolder` that reads, checks and
saves a slide's annotations (the QuPath GeoJSON format itself is in annotations.py). A save is all
or nothing: every annotation is checked (outline, class, inside the slide) before the file is
replaced, atomically. Annotations name their class, so a class rename rewrites these files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .annotations import Annotation, read_geojson, validate_annotations, write_geojson
from .classes import UNLABELLED
from .errors import ProjectError

if TYPE_CHECKING:  # pragma: no cover
    import threading

    from .classes import ClassDef
    from .schema import SlideRecord


class AnnotationAccess:
    """The annotations of a project's slides (a mixin of :class:`~.folder.ProjectFolder`); the host
    gives it the project's folder, class table, lock state and slide records (declared below)."""

    if TYPE_CHECKING:  # what the host class provides
        root: Path
        _classes: list[ClassDef]
        _mutex: threading.RLock
        _records: dict[str, SlideRecord]

        def record(self, slide_id: str) -> SlideRecord: ...
        def add_class(self, name: str, color: str | None = None) -> ClassDef: ...
        def _check_writable(self) -> None: ...

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

    def _rename_in_annotations(self, old: str, new: str) -> None:
        """Rewrite the annotation files that use class ``old`` to name it ``new`` (after a rename)."""
        with self._mutex:
            for rec in self._records.values():
                path = self._annotation_path(rec.slide_id)
                if path.exists():
                    anns = read_geojson(path)
                    if any(a.class_name == old for a in anns):
                        anns = [replace(a, class_name=new) if a.class_name == old else a for a in anns]
                        write_geojson(path, anns, self._classes)
