"""Exports into ``PROJECT/exports``: the slide's masks, the shown map as a heatmap TIFF and GeoJSON outlines.

What an export needs from the viewer (the map's pixels, the threshold, the project's classes, pending
paint) is taken on the main thread when the button is pressed; writing the files runs in a worker of the
widget's task runner, so the window stays responsive while a large mask or heatmap is encoded.
``exported`` holds the paths of the last export once it is written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import QHBoxLayout, QPushButton, QWidget

from ..errors import WsimilError
from ._autosave import notify


def _exports_dir(project: Any) -> Path:
    out = Path(project.root) / "exports"
    out.mkdir(parents=True, exist_ok=True)
    return out


class ExportsPanel(QWidget):
    """Export masks, Export heatmap, Export GeoJSON."""

    def __init__(self, ctx: Any, threshold: Callable[[], float], parent: QWidget | None = None):
        super().__init__(parent)
        self.ctx = ctx
        self._threshold = threshold  # the runs panel's
        self.exported: list[Path] = []
        self.export_masks_btn = QPushButton("Export masks")
        self.export_masks_btn.setToolTip("The slide's mask (drawn shapes filled, painted pixels over them) as "
                                         "OME-TIFF and PNG into PROJECT/exports.")
        self.export_masks_btn.clicked.connect(self.export_masks)
        self.export_heatmap_btn = QPushButton("Export heatmap")
        self.export_heatmap_btn.clicked.connect(self.export_heatmap)
        self.export_geojson_btn = QPushButton("Export GeoJSON")
        self.export_geojson_btn.setToolTip("Outlines of the map above the threshold, as QuPath annotations.")
        self.export_geojson_btn.clicked.connect(self.export_geojson)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        for b in (self.export_masks_btn, self.export_heatmap_btn, self.export_geojson_btn):
            row.addWidget(b)

    def update_buttons(self, has_project: bool, has_slide: bool, has_map: bool) -> None:
        self.export_masks_btn.setEnabled(has_project and has_slide)
        self.export_heatmap_btn.setEnabled(has_map)
        self.export_geojson_btn.setEnabled(has_map)

    def _run(self, what: str, write: Callable[[], list[Any]]) -> Any:
        return self.ctx.tasks.run(what, lambda: [Path(p) for p in write()], self._done)

    def _done(self, paths: list[Path]) -> None:
        self.exported = paths
        notify("Exported " + ", ".join(p.name for p in paths) + f" to {paths[0].parent}.", "info")

    def export_masks(self) -> Any:
        """The current slide's pixel labels (class ids) as OME-TIFF and PNG; returns the worker."""
        need = self.ctx.need(run=False)
        if need is None:
            return None
        sid, p = need[1], self.ctx.session.project
        self.ctx.session.flush()  # pending strokes first (on this thread: they are read from the layer)

        def write() -> list[Any]:
            out = _exports_dir(p)
            return [p.export_mask(sid, out / f"{sid}.ome.tif", format="ome-tiff"),
                    p.export_mask(sid, out / f"{sid}.png", format="png")]

        return self._run(f"Exporting the masks of {sid}", write)

    def _map(self) -> tuple[np.ndarray, dict[str, Any], str] | None:
        """(a copy of the shown map, its metadata, the slide) or None after saying there is none."""
        layer, sid = self.ctx.layer("attention"), self.ctx.slide_id()
        if layer is None:
            notify("No attention map of this slide yet: train, or choose a run.", "info")
            return None
        return np.array(layer.data, copy=True), dict(layer.metadata["wsimil"]), sid

    def export_heatmap(self) -> Any:
        """The shown attention map as a heatmap TIFF that napari (and wsimil) reopen aligned."""
        shown = self._map()
        if shown is None:
            return None
        data, info, sid = shown
        p = self.ctx.session.project

        def write() -> list[Any]:
            from ..infer.heatmap import write_heatmap

            extra = {"slide_id": sid, "run": info.get("run"), "epoch": info.get("epoch")}
            return [write_heatmap(_exports_dir(p) / f"{sid}_attention.tif", data, info.get("slide_mpp"),
                                  info["downsample"], extra=extra)]

        return self._run(f"Exporting the heatmap of {sid}", write)

    def export_geojson(self) -> Any:
        """Outlines of the map above the threshold as QuPath GeoJSON (tumour-class polygons, level-0 px)."""
        shown = self._map()
        if shown is None:
            return None
        data, info, sid = shown
        p, threshold, bounds = self.ctx.session.project, self._threshold(), self.ctx.session.slide.dimensions
        cls = "tumour"
        try:
            cls = p.class_by_id(self.ctx.api.class_ids()[0]).name
        except WsimilError:
            pass
        colors = {c.name: c.color for c in p.classes}
        colors.setdefault(cls, "#e6194b")

        def write() -> list[Any]:
            from ..infer.heatmap import threshold_polygons
            from ..project.annotations import Annotation, write_geojson

            polys = threshold_polygons(data, info["downsample"], threshold, bounds=bounds)
            label = f"attention > {threshold:g}"
            anns = [Annotation(g, cls, "polygon", name=label) for g in polys]
            return [write_geojson(_exports_dir(p) / f"{sid}_attention.geojson", anns, colors)]

        return self._run(f"Exporting the outlines of {sid}", write)
