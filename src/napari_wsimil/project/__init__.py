"""Project folders: a cohort of slides with slide-level labels, pixel labels and annotations.

Compute only (no Qt, no napari): the dock widgets and the ``wsimil project`` command are thin
layers over :class:`Project`. See ``project.py`` for how the modules are layered, ``folder.py`` for
the folder layout, ``schema.py`` for project.json, ``pixel_labels.py`` and ``label_access.py`` for
how labels are stored and saved stroke by stroke, ``annotations.py`` for the QuPath GeoJSON format
and ``cohort_csv.py`` for the CSV columns.

Names load on first use (numpy and friends stay out of ``wsimil --help``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .annotations import UNCLASSIFIED, Annotation, read_geojson, write_geojson
    from .classes import UNLABELLED, ClassDef
    from .errors import ProjectError
    from .export import export_mask, export_project
    from .lock import LockOwner
    from .pixel_labels import LabelGeometry
    from .project import Project
    from .schema import SCHEMA_VERSION, SPLITS, SlideRecord

_LAZY = {
    "Annotation": "annotations", "UNCLASSIFIED": "annotations", "read_geojson": "annotations",
    "write_geojson": "annotations", "ClassDef": "classes", "UNLABELLED": "classes", "ProjectError": "errors",
    "export_mask": "export", "export_project": "export", "LockOwner": "lock", "LabelGeometry": "pixel_labels",
    "Project": "project", "SlideRecord": "schema", "SCHEMA_VERSION": "schema", "SPLITS": "schema",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
