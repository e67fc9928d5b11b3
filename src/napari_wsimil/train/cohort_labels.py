"""Tile labels for a whole cohort: where each slide's drawings live and what their classes mean.

A project keeps painted pixels (zarr, class ids of the project's class table) and annotations (GeoJSON,
class names). A cohort CSV names a ``pixel_labels`` mask (values are the class ids of a new project:
1 tumour, 2 normal) and an ``annotations`` GeoJSON. Both become a :class:`TileLabelSource` per slide,
and :func:`cohort_tile_labels` turns them into one tile label per patch of each feature bag.
``gt_mask`` is never read here: ground truth is for evaluation only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cohort import Cohort, CohortError, SlideItem
from .tile_labels import TileLabelSource, default_class_map, parse_class_map, slide_tile_labels


def _csv_class_table(slides: Sequence[SlideItem]) -> dict[int, str]:
    """The default project classes plus every annotation class name met, with fresh ids."""
    from ..project.annotations import read_geojson
    from ..project.classes import default_classes

    table = {c.id: c.name for c in default_classes()}
    for s in slides:
        if s.annotations is None:
            continue
        for ann in read_geojson(s.annotations):
            if ann.class_name not in table.values():
                table[max(table) + 1] = ann.class_name
    return table


def _csv_source(slide: SlideItem, class_ids: Mapping[str, int], stack: list[Any]) -> TileLabelSource:
    from ..project.annotations import read_geojson
    from ..project.mask_io import MaskImage, choose_downsample
    from ..project.pixel_labels import compute_geometry
    from ..slide import open_slide

    src = TileLabelSource(class_ids=class_ids)
    if slide.pixel_labels is not None:
        mask = MaskImage(slide.pixel_labels)
        stack.append(mask)
        with open_slide(slide.path, mpp=slide.mpp) as sl:
            dims, mpp = sl.dimensions, sl.mpp
        ds = choose_downsample(mask, dims, mpp, compute_geometry(dims, mpp, 4.0), slide.pixel_labels_downsample)
        src.lookup, src.downsample = mask.points, ds
    if slide.annotations is not None:
        src.annotations = read_geojson(slide.annotations)
    return src


class DrawingSources:
    """Where each slide's drawings live (a project's paint and annotations, or a CSV's ``pixel_labels`` and
    ``annotations`` columns) and which drawn class means which slide class (``mapping`` as --tile-classes, or
    by name). Shared by MS-CLAM's tile labels and the segmentation methods' pixel labels."""

    def __init__(self, cohort: Cohort, slides: Sequence[SlideItem], slide_classes: Sequence[str],
                 mapping: str | None = None):
        self.project: Any = None
        self.masks: list[Any] = []  # CSV masks opened for their lookups
        if cohort.is_project:
            from ..project.project import Project

            self.project = Project.open(cohort.source, readonly=True)
            table = {c.id: c.name for c in self.project.classes}
        else:
            table = _csv_class_table(slides)
        self.class_ids = {name: cid for cid, name in table.items()}
        try:
            self.id_to_class = (parse_class_map(mapping, table, slide_classes) if mapping
                                else default_class_map(table, slide_classes))
        except BaseException:
            self.close()
            raise

    def source(self, slide: SlideItem) -> TileLabelSource:
        if self.project is None:
            return _csv_source(slide, self.class_ids, self.masks)
        src = TileLabelSource(class_ids=self.class_ids, annotations=self.project.annotations(slide.slide_id))
        points = self.project.pixel_label_points(slide.slide_id)
        if points is not None:
            src.lookup, src.downsample = points
        return src

    def slide_mpp(self, slide: SlideItem) -> float | None:
        """The slide's µm/px override: its ``mpp`` (a CSV's column, a project's setting), else the project's
        record; None when the file's own pixel size is to be used."""
        if slide.mpp is not None or self.project is None:
            return slide.mpp
        return self.project.slide_mpp(slide.slide_id)

    def close(self, masks: bool = True) -> None:
        """Close the project; ``masks=False`` keeps the CSV masks open for lookups that outlive this object."""
        if self.project is not None:
            self.project.close()
            self.project = None
        if masks:
            for m in self.masks:
                m.close()
            self.masks.clear()


def cohort_tile_labels(cohort: Cohort, slides: Sequence[SlideItem], bags: Mapping[str, Path],
                       slide_classes: Sequence[str], *, mapping: str | None = None, exhaustive: bool = False,
                       min_fraction: float = 0.5,
                       report: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Slide id → (N,) tile labels (-1 unknown) for the slides whose drawings label at least one tile.

    ``mapping`` ("tumour=malignant,normal=0") overrides the name-based default of which drawn class
    means which slide class. Problems with a slide's drawings are errors naming the slide."""
    from ..errors import WsimilError
    from ..features.bags import patch_size_level0, read_bag

    say = report or (lambda _m: None)
    sources = DrawingSources(cohort, slides, slide_classes, mapping)
    id_to_tile = sources.id_to_class
    if not id_to_tile:
        sources.close()
        say("tile labels: no drawn class maps to a slide class (see --tile-classes); none used")
        return {}
    out: dict[str, np.ndarray] = {}
    try:
        for s in slides:
            try:
                src = sources.source(s)
                if src.empty:
                    continue
                bag = read_bag(bags[s.slide_id])
                labels = slide_tile_labels(bag.coords, patch_size_level0(bag.attrs), src, id_to_tile,
                                           min_fraction=min_fraction, exhaustive=exhaustive)
            except WsimilError as exc:
                raise CohortError(f"tile labels of {s.slide_id}: {exc}") from exc
            if labels is None:
                continue
            out[s.slide_id] = labels
            counts = ", ".join(f"{slide_classes[k]} {int((labels == k).sum())}" for k in range(len(slide_classes))
                               if (labels == k).any())
            say(f"tile labels {s.slide_id}: {counts} of {len(labels)} patches")
    finally:
        sources.close()
    return out


__all__ = ["cohort_tile_labels"]
