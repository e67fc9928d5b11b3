"""Dock widget: the project's classes, painting pixel labels, drawing boxes, the slide's label.

Painting uses napari's own Labels tools on the current slide's labels layer; this widget only sets
the class (``selected_label``), the brush size (given in µm, converted to label pixels), the eraser
and undo. Boxes are drawn on the Shapes layer in rectangle mode and carry their class in
``features['class']``. Everything saves itself (see _common).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QColorDialog,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..errors import WsimilError
from ..layers import world_mpp
from ._common import notify, session_for

if TYPE_CHECKING:  # pragma: no cover
    import napari

NO_LABEL = "(none)"


def _swatch(color: str) -> QIcon:
    pix = QPixmap(14, 14)
    pix.fill(QColor(color))
    return QIcon(pix)


class LabellingWidget(QWidget):
    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer, self)

        self.class_list = QListWidget()
        self.class_list.currentItemChanged.connect(self._on_class_row)
        self.add_btn, self.rename_btn = QPushButton("Add…"), QPushButton("Rename…")
        self.color_btn = QPushButton("Colour…")
        self.add_btn.clicked.connect(self._ask_add)
        self.rename_btn.clicked.connect(self._ask_rename)
        self.color_btn.clicked.connect(self._ask_color)
        class_box = QGroupBox("Classes")
        cl = QVBoxLayout(class_box)
        cl.addWidget(self.class_list)
        row = QHBoxLayout()
        for b in (self.add_btn, self.rename_btn, self.color_btn):
            row.addWidget(b)
        cl.addLayout(row)

        self.paint_btn = QPushButton("Paint")
        self.paint_btn.clicked.connect(self.paint_mode)
        self.eraser = QPushButton("Eraser")
        self.eraser.setCheckable(True)
        self.eraser.toggled.connect(self.set_eraser)
        self.undo_btn = QPushButton("Undo")
        self.undo_btn.clicked.connect(self.session.undo)
        self.box_btn = QPushButton("Draw boxes")
        self.box_btn.clicked.connect(self.draw_boxes)
        self.brush = QDoubleSpinBox()
        self.brush.setRange(0.5, 5000.0)
        self.brush.setDecimals(1)
        self.brush.setValue(50.0)
        self.brush.setSuffix(" µm")
        self.brush.setToolTip("Brush diameter on the slide.")
        self.brush.valueChanged.connect(self._apply_brush)
        tools = QGroupBox("Tools")
        tl = QFormLayout(tools)
        r1 = QHBoxLayout()
        for b in (self.paint_btn, self.eraser, self.undo_btn):
            r1.addWidget(b)
        tl.addRow(r1)
        tl.addRow("Brush", self.brush)
        tl.addRow(self.box_btn)

        self.slide_label = QComboBox()
        self.slide_label.currentTextChanged.connect(self._on_slide_label)
        slide_box = QFormLayout()
        slide_box.addRow("Slide label", self.slide_label)

        self.status = QLabel()
        layout = QVBoxLayout(self)
        layout.addWidget(class_box)
        layout.addWidget(tools)
        layout.addLayout(slide_box)
        layout.addWidget(self.status)
        layout.addStretch(1)

        s = self.session
        s.project_changed.connect(self._on_project)
        s.classes_changed.connect(self.refresh_classes)
        s.paint_class_changed.connect(self.refresh_classes)
        s.slide_changed.connect(self._on_slide)
        s.slides_changed.connect(self._on_slide)
        s.status.connect(self.status.setText)
        self._on_project()

    def hideEvent(self, event: Any) -> None:  # noqa: N802 - Qt API; closing the dock saves pending edits
        self.session.flush()
        super().hideEvent(event)

    # --- classes ---------------------------------------------------------------------------------
    def add_class(self, name: str, color: str | None = None) -> Any:
        c = self._edit(lambda p: p.add_class(name, color=color))
        if c is not None:
            self.set_paint_class(c.id)
        return c

    def rename_class(self, class_id: int, name: str) -> None:
        old = self.session.class_name(class_id)
        if self._edit(lambda p: p.rename_class(class_id, name)) is not False and old != name:
            layer = self.session.shapes_layer
            if layer is not None and len(layer.data):
                feats = layer.features.copy()
                feats.loc[feats["class"] == old, "class"] = name
                layer.features = feats  # triggers recolouring and an autosave

    def recolor_class(self, class_id: int, color: str) -> None:
        self._edit(lambda p: p.recolor_class(class_id, color))

    def _edit(self, func: Any) -> Any:
        p = self.session.project
        if p is None:
            return False
        try:
            out = func(p)
        except WsimilError as exc:
            notify(str(exc))
            return False
        self.session.refresh_colors()
        self.session.classes_changed.emit()
        return out

    def set_paint_class(self, class_id: int) -> None:
        self.session.set_paint_class(class_id)
        for i in range(self.class_list.count()):
            if self.class_list.item(i).data(Qt.ItemDataRole.UserRole) == class_id:
                self.class_list.blockSignals(True)
                self.class_list.setCurrentRow(i)
                self.class_list.blockSignals(False)
        if self.eraser.isChecked():
            self.eraser.setChecked(False)

    def refresh_classes(self) -> None:
        p = self.session.project
        self.class_list.blockSignals(True)
        self.class_list.clear()
        for c in (p.classes if p else []):
            if c.id == 0:
                continue
            item = QListWidgetItem(_swatch(c.color), f"{c.name}")
            item.setData(Qt.ItemDataRole.UserRole, c.id)
            item.setToolTip(f"id {c.id}, {c.color}")
            self.class_list.addItem(item)
            if c.id == self.session.paint_class:
                self.class_list.setCurrentItem(item)
        self.class_list.blockSignals(False)

    def _on_class_row(self, item: QListWidgetItem | None, _: Any = None) -> None:
        if item is not None:
            self.set_paint_class(item.data(Qt.ItemDataRole.UserRole))

    def _current_class(self) -> int | None:
        item = self.class_list.currentItem()
        return None if item is None else item.data(Qt.ItemDataRole.UserRole)

    def _ask_add(self) -> None:
        name, ok = QInputDialog.getText(self, "New class", "Name:")
        if ok and name.strip():
            color = QColorDialog.getColor(parent=self, title=f"Colour of {name}")
            self.add_class(name.strip(), color.name() if color.isValid() else None)

    def _ask_rename(self) -> None:
        cid = self._current_class()
        if cid is not None:
            name, ok = QInputDialog.getText(self, "Rename class", "Name:", text=self.session.class_name(cid))
            if ok and name.strip():
                self.rename_class(cid, name.strip())

    def _ask_color(self) -> None:
        cid = self._current_class()
        if cid is not None:
            old = next(c.color for c in self.session.project.classes if c.id == cid)
            color = QColorDialog.getColor(QColor(old), self, f"Colour of {self.session.class_name(cid)}")
            if color.isValid():
                self.recolor_class(cid, color.name())

    # --- tools -----------------------------------------------------------------------------------
    def brush_px(self) -> int:
        """Brush diameter in label pixels (napari's brush_size is in the layer's data pixels)."""
        s = self.session
        if s.geometry is None or s.slide is None:
            return 1
        return max(1, round(self.brush.value() / (s.geometry.downsample * world_mpp(s.slide))))

    def _apply_brush(self, *_: Any) -> None:
        if self.session.labels_layer is not None:
            self.session.labels_layer.brush_size = self.brush_px()

    def paint_mode(self) -> None:
        layer = self.session.labels_layer
        if layer is not None and layer.editable:
            self.eraser.setChecked(False)
            self.viewer.layers.selection.active = layer
            layer.mode = "paint"

    def set_eraser(self, on: bool) -> None:
        layer = self.session.labels_layer
        if layer is None or not layer.editable:
            return
        self.viewer.layers.selection.active = layer
        layer.mode = "erase" if on else "paint"

    def draw_boxes(self) -> None:
        layer = self.session.shapes_layer
        if layer is not None and layer.editable:
            self.viewer.layers.selection.active = layer
            layer.mode = "add_rectangle"

    # --- slide label -----------------------------------------------------------------------------
    def _on_slide_label(self, text: str) -> None:
        s = self.session
        if s.project is None or s.slide_id is None or s.readonly:
            return
        label = None if text == NO_LABEL else text
        try:
            s.project.set_slide_label(s.slide_id, label)
        except WsimilError as exc:
            notify(str(exc))
            return
        s.slides_changed.emit()

    def set_slide_label(self, label: str | None) -> None:
        self.slide_label.setCurrentText(label or NO_LABEL)

    # --- state -----------------------------------------------------------------------------------
    def _on_project(self) -> None:
        p = self.session.project
        self.slide_label.blockSignals(True)
        self.slide_label.clear()
        self.slide_label.addItems([NO_LABEL, *(p.slide_classes if p else [])])
        self.slide_label.blockSignals(False)
        self.refresh_classes()
        self.status.setText("")
        self._on_slide()

    def _on_slide(self) -> None:
        s = self.session
        editable = bool(s.project and not s.readonly)
        has_layers = editable and s.labels_layer is not None
        for w in (self.add_btn, self.rename_btn, self.color_btn):
            w.setEnabled(editable)
        for w in (self.paint_btn, self.eraser, self.undo_btn, self.box_btn, self.brush):
            w.setEnabled(has_layers)
        self.slide_label.setEnabled(editable and s.slide_id is not None)  # even a moved slide
        label = s.project.record(s.slide_id).label if (s.project and s.slide_id) else None
        self.slide_label.blockSignals(True)
        self.slide_label.setCurrentText(label or NO_LABEL)
        self.slide_label.blockSignals(False)
        if s.labels_layer is not None:
            self.brush.setSuffix(" µm" if s.slide.mpp else " px (full resolution)")
            self._apply_brush()
