"""The "Export mask" menu command (*Layers > Data* and *File > IO Utilities*): the selected Labels layer
as an OME-TIFF mask with its µm/px and class table, and the boxes and polygons drawn over the same slide
filled in under the painted pixels, as QuPath's labelled-image export draws them.

Thin: it asks where to write and calls the npe2 writer (:func:`napari_wsimil._writer.write_labels_mask`)
with the layers' state as napari hands it to writers (``Layer.as_layer_data_tuple``); *File > Save
Selected Layers* writes the painted pixels alone, since a writer sees one layer. napari 0.9.2 lets plugins
into neither the layer list's context menu nor the Plugins menu (see docs/napari.md), hence these menus.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from napari.layers import Labels, Shapes
from napari.viewer import Viewer
from qtpy.QtWidgets import QFileDialog

from .._writer import write_labels_mask
from ..errors import WsimilError
from ._autosave import notify
from ._common import find_session

SUFFIXES = (".ome.tif", ".ome.tiff")


def labels_to_export(viewer: Any) -> Any | None:
    """The active layer if it is a Labels layer, else the one selected Labels layer, else the only one."""
    active = viewer.layers.selection.active
    if isinstance(active, Labels):
        return active
    for group in (list(viewer.layers.selection), list(viewer.layers)):
        labels = [layer for layer in group if isinstance(layer, Labels)]
        if len(labels) == 1:
            return labels[0]
    return None


def outlines_for(viewer: Any, labels: Any) -> Any | None:
    """The plugin's boxes layer over the same slide as ``labels`` (None: none, or a layer of no slide)."""
    path = (labels.metadata.get("wsimil") or {}).get("path")
    if not path:
        return None
    for layer in viewer.layers:
        meta = layer.metadata.get("wsimil") or {}
        if isinstance(layer, Shapes) and meta.get("kind") == "annotations" and meta.get("path") == path:
            return layer
    return None


def default_path(viewer: Any, layer: Any) -> Path:
    """``PROJECT/exports/<layer>.ome.tif`` when a project is open in this viewer, else in the home folder."""
    session = find_session(viewer)
    project = getattr(session, "project", None)
    folder = Path(project.root) / "exports" if project is not None else Path.home()
    return folder / (re.sub(r"[^\w.-]+", "_", str(layer.name)).strip("_") + ".ome.tif")


def export_mask(viewer: Viewer) -> list[str]:
    """Ask for a file name and write the chosen Labels layer there; the paths written (none if cancelled)."""
    layer = labels_to_export(viewer)
    if layer is None:
        notify("Export mask: select the Labels layer to export (the painted labels of a slide).", "info")
        return []
    target = default_path(viewer, layer)
    path, _ = QFileDialog.getSaveFileName(None, "Export mask", str(target),
                                          "OME-TIFF mask (*.ome.tif *.ome.tiff)")
    if not path:
        return []
    if not path.lower().endswith(SUFFIXES):
        path += SUFFIXES[0]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    data, state, _ = layer.as_layer_data_tuple()
    shapes = outlines_for(viewer, layer)
    outlines = shapes.as_layer_data_tuple()[:2] if shapes is not None else None
    try:
        written = write_labels_mask(path, data, state, outlines=outlines)
    except (WsimilError, OSError) as exc:
        notify(f"Export mask: {exc}")
        return []
    notify(f"Mask of '{layer.name}' written to {written[0]}", "info")
    return written
