"""The project API: :class:`Project`, a project folder with its cohort CSV import/export and mask export.

The package is layered so that nothing imports upwards (no cycles)::

    schema.py, classes.py, lock.py         project.json and its records; class table; write lock
    pixel_labels.py, annotations.py,       label geometry; GeoJSON format; mask images
      mask_io.py
    label_access.py, annotation_access.py  a project's pixel labels and annotations (mixins)
    folder.py                              ProjectFolder: state, lock, classes, slides
    export.py, cohort_csv.py               masks/GeoJSON out; the cohort CSV in and out
    project.py                             Project = ProjectFolder + the above

:class:`Project` is the class to use (``Project.create``, ``Project.create_from_csv``,
``Project.open``); the names of the lower modules that callers use are importable from here too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import cohort_csv, export
from .folder import ProjectFolder
from .schema import (PROJECT_FILE, SCHEMA_VERSION, SPLITS, SlideRecord, check_mpp, check_slide_id, id_from_path,
                     normalize_split)

__all__ = ["PROJECT_FILE", "SCHEMA_VERSION", "SPLITS", "Project", "SlideRecord", "check_mpp", "check_slide_id",
           "id_from_path", "normalize_split"]


class Project(ProjectFolder):
    """An open project folder (see folder.py for the layout and :class:`ProjectFolder` for slides, classes,
    pixel labels and annotations). Use :meth:`create`, :meth:`create_from_csv` or :meth:`open`; close
    it (or use ``with``) to release the write lock."""

    @classmethod
    def create_from_csv(cls, dir: str | os.PathLike[str], csv_path: str | os.PathLike[str], label_mpp: float = 4.0,
                        **kwargs: Any) -> Project:
        """A new project holding the cohort of a CSV (see cohort_csv.py for the columns). Every row is
        checked first; all problems come in one ProjectError and nothing is written."""
        return cohort_csv.create_from_csv(cls, dir, csv_path, label_mpp=label_mpp, **kwargs)

    def export_csv(self, path: str | os.PathLike[str], masks: bool = False) -> Path:
        """Write the cohort CSV (see cohort_csv.py). With ``masks``, pixel labels are exported as
        OME-TIFFs beside it and listed, so ``create_from_csv`` rebuilds the whole project."""
        return cohort_csv.export_csv(self, path, masks=masks)

    def export_mask(self, slide_id: str, out_path: str | os.PathLike[str], format: str = "ome-tiff",
                    mpp: float | None = None, pixels_only: bool = False) -> Path:
        """Write the slide's labels as a mask image: drawn shapes and painted pixels (see export.py)."""
        return export.export_mask(self, slide_id, out_path, format=format, mpp=mpp,  # type: ignore[arg-type]
                                  pixels_only=pixels_only)
