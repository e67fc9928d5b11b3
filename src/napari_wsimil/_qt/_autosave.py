"""Saving the current slide's pixel labels and boxes by themselves, shortly after each edit.

A paint stroke (napari's ``Labels.events.paint``, which carries the changed indices) or a shape
change restarts a single-shot timer; when it fires, only the label chunks under the painted
bounding boxes are written (``Project.save_pixel_labels(..., dirty=boxes)``) and the shapes are
converted to annotations and saved. napari's undo/redo emits no paint event, only a refresh
(``Labels.events.set_data``): a copy of the labels as last saved is kept, and on each refresh
the pixels that differ from it, outside the boxes already pending, are marked dirty (public API
only; napari's history deques are private). A failed save stays pending (retried on the next edit, on slide switch and
on close) and is reported as a napari notification, never dropped silently.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal

from ..errors import WsimilError
from ..project_layers import edge_colors, paint_bbox, shapes_to_annotations

SAVE_DELAY_MS = 500


def notify(message: str, level: str = "error") -> None:
    from napari.utils import notifications

    getattr(notifications, f"show_{level}")(message)


def _covers(outer: tuple[int, int, int, int], inner: tuple[int, int, int, int]) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1] and outer[2] <= inner[2] and inner[3] <= outer[3]


def changed_bbox(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) box of the pixels where two same-shape label arrays differ (None: nowhere)."""
    diff = a != b
    if diff.ndim > 2:
        diff = diff.reshape(-1, *diff.shape[-2:]).any(axis=0)
    rows, cols = np.flatnonzero(diff.any(axis=1)), np.flatnonzero(diff.any(axis=0))
    if rows.size == 0:
        return None
    return (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


class Autosave(QObject):
    status = Signal(str)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.project: Any = None
        self.slide_id: str | None = None
        self.slide: Any = None
        self.labels: Any = None
        self.shapes: Any = None
        self.originals: list[Any] = []
        self._dirty: list[tuple[int, int, int, int]] = []
        self._all_dirty = False
        self._shapes_dirty = False
        self._quiet = False
        self._shadow: np.ndarray | None = None  # the labels as last saved (or loaded)
        self._labels_timer = self._timer(self.save_labels)
        self._shapes_timer = self._timer(self.save_shapes)

    def _timer(self, slot: Any) -> QTimer:
        timer = QTimer(self)
        timer.setSingleShot(True)
        timer.setInterval(SAVE_DELAY_MS)
        timer.timeout.connect(slot)
        return timer

    @property
    def pending(self) -> bool:
        return bool(self._dirty or self._all_dirty or self._shapes_dirty)

    @property
    def writable(self) -> bool:
        return self.project is not None and not self.project.readonly

    def attach(self, project: Any, slide_id: str, slide: Any, labels: Any, shapes: Any,
               originals: list[Any]) -> None:
        self.project, self.slide_id, self.slide = project, slide_id, slide
        self.labels, self.shapes, self.originals = labels, shapes, list(originals)
        self._dirty, self._all_dirty, self._shapes_dirty = [], False, False
        self._shadow = np.array(labels.data, copy=True)
        labels.events.paint.connect(self._on_paint)
        labels.events.data.connect(self._on_labels_data)
        labels.events.set_data.connect(self._check_history)
        shapes.events.data.connect(self._on_shapes_data)
        shapes.events.features.connect(self._on_shapes_features)

    def detach(self) -> None:
        """Forget the layers (after :meth:`flush`); events from them are ignored from now on."""
        self.labels = self.shapes = self.project = self.slide = None
        self._shadow = None
        self._labels_timer.stop()
        self._shapes_timer.stop()

    # --- labels ----------------------------------------------------------------------------------
    def _on_paint(self, event: Any) -> None:
        if event.source is not self.labels:
            return
        box = paint_bbox(event.value)
        if box is not None:
            self._dirty.append(box)
        else:  # an atom this version does not describe: find the change by comparison
            self._check_history()
        self._labels_timer.start()

    def _on_labels_data(self, event: Any = None) -> None:
        if event is not None and event.source is not self.labels:
            return
        self._all_dirty = True
        self._labels_timer.start()

    def _check_history(self, _: Any = None) -> None:
        """After a refresh (napari's undo and redo end with one): mark the pixels that changed unseen."""
        layer = self.labels
        if layer is None or self._shadow is None or self._all_dirty:
            return
        data = np.asarray(layer.data)
        if data.shape != self._shadow.shape:
            self._on_labels_data()
            return
        box = changed_bbox(data, self._shadow)
        if box is not None and not any(_covers(d, box) for d in self._dirty):
            self._dirty.append(box)
            self._labels_timer.start()

    def adopt(self) -> None:
        """The labels layer's pixels are what is on disk (written there by someone else): nothing to save."""
        if self.labels is not None:
            self._shadow = np.array(self.labels.data, copy=True)

    def undo(self) -> None:
        if self.labels is not None and self.writable:
            self.labels.undo()
            self._check_history()

    def save_labels(self) -> bool:
        self._labels_timer.stop()
        if not (self._dirty or self._all_dirty) or self.labels is None or not self.writable:
            return True
        boxes = None if self._all_dirty else list(self._dirty)
        data = np.asarray(self.labels.data)
        try:
            self.project.save_pixel_labels(self.slide_id, data, dirty=boxes)
        except Exception as exc:  # noqa: BLE001 - never lose a save error silently
            self._failed("labels", exc)
            return False
        if boxes is None or self._shadow is None or self._shadow.shape != data.shape:
            self._shadow = np.array(data, copy=True)
        else:
            for y0, y1, x0, x1 in boxes:
                self._shadow[..., y0:y1, x0:x1] = data[..., y0:y1, x0:x1]
        self._dirty, self._all_dirty = [], False
        self._saved()
        return True

    # --- shapes ----------------------------------------------------------------------------------
    def recolor(self) -> None:
        layer = self.shapes
        if layer is not None and len(layer.data) and "class" in layer.features:
            layer.edge_color = edge_colors(list(layer.features["class"]), self.project.classes)

    def _on_shapes_data(self, event: Any) -> None:
        action = getattr(event, "action", None)
        if event.source is not self.shapes or action in ("adding", "removing", "changing"):
            return
        if getattr(event, "action", None) == "added":
            self.recolor()
        self._shapes_dirty = True
        self._shapes_timer.start()

    def _on_shapes_features(self, event: Any = None) -> None:
        if self._quiet or (event is not None and event.source is not self.shapes):
            return
        self.recolor()
        self._shapes_dirty = True
        self._shapes_timer.start()

    def save_shapes(self) -> bool:
        self._shapes_timer.stop()
        layer = self.shapes
        if not self._shapes_dirty or layer is None or not self.writable:
            return True
        try:
            feats = layer.features
            names = list(feats["class"]) if "class" in feats else [None] * len(layer.data)
            ids = list(feats["id"]) if "id" in feats else None
            anns, skipped, shape_ids = shapes_to_annotations(
                layer.data, layer.shape_type, names, self.slide, ids=ids, originals=self.originals)
            self.project.save_annotations(self.slide_id, anns)
        except Exception as exc:  # noqa: BLE001
            self._failed("boxes", exc)
            return False
        self._shapes_dirty = False
        self.originals = anns
        if ids != shape_ids:  # new shapes learn the id they were saved under
            feats = layer.features.copy()
            feats["id"] = np.array(shape_ids, dtype=object)
            self._quiet = True
            try:
                layer.features = feats
            finally:
                self._quiet = False
        for message in skipped:
            notify(message, "warning")
        self._saved()
        return True

    # --- both ------------------------------------------------------------------------------------
    def flush(self) -> bool:
        if self.project is None:
            return True
        return self.save_labels() & self.save_shapes()

    def _saved(self) -> None:
        self.status.emit(f"Saved {time.strftime('%H:%M:%S')}")

    def _failed(self, what: str, exc: Exception) -> None:
        message = str(exc) if isinstance(exc, WsimilError) else f"{type(exc).__name__}: {exc}"
        self.status.emit(f"Saving {what} failed")
        notify(f"Could not save the {what} of {self.slide_id}: {message}")
