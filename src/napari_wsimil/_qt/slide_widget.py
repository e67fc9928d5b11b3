"""Dock widget: the active slide's facts, its pixel size, tissue detection and the patch grid.

Only wiring: every computation is a library call run by the widget's task runner (:mod:`.tasks`) in a
napari worker thread; layers are added from its ``done`` callback, on the main thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..errors import WsimilError
from ..layers import mask_layer_data, patch_grid_layer_data, slide_layer_data
from .tasks import TaskRunner

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from ..slide import Slide


def _spin(lo: float, hi: float, value: float, step: float, decimals: int = 2, suffix: str = "") -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(lo, hi)
    box.setDecimals(decimals)
    box.setSingleStep(step)
    box.setValue(value)
    if suffix:
        box.setSuffix(suffix)
    return box


def slide_of(layer: Any) -> Slide | None:
    """The Slide behind a layer opened by this plugin, if any."""
    meta = getattr(layer, "metadata", None) or {}
    return meta.get("slide") if meta.get("wsimil", {}).get("kind") == "slide" else None


class SlideWidget(QWidget):
    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer

        self.info = QLabel("Open a slide (File > Open, drag and drop, or the button below).")
        self.info.setWordWrap(True)
        open_btn = QPushButton("Open slide…")
        open_btn.clicked.connect(self._choose_file)

        self.mpp_box = _spin(0.01, 100.0, 0.5, 0.05, decimals=4, suffix=" µm/px")
        self.mpp_box.setToolTip("Pixel size at full resolution. Set it when the file does not record it.")
        set_mpp = QPushButton("Set pixel size")
        set_mpp.clicked.connect(self._set_mpp)
        mpp_row = QHBoxLayout()
        mpp_row.addWidget(self.mpp_box)
        mpp_row.addWidget(set_mpp)

        self.tissue_btn = QPushButton("Detect tissue")
        self.tissue_btn.setToolTip("Low-resolution tissue mask: ignores background, pen marks and scan borders.")
        self.tissue_btn.clicked.connect(self.detect_tissue)

        self.patch_px = QSpinBox()
        self.patch_px.setRange(16, 4096)
        self.patch_px.setValue(256)
        self.patch_px.setSuffix(" px")
        self.patch_mpp = _spin(0.1, 64.0, 0.5, 0.25, suffix=" µm/px")
        self.overlap = _spin(0.0, 0.9, 0.0, 0.25)
        self.min_tissue = _spin(0.0, 1.0, 0.5, 0.1)
        self.grid_btn = QPushButton("Make patch grid")
        self.grid_btn.clicked.connect(self.make_patch_grid)
        grid_box = QGroupBox("Patches")
        form = QFormLayout(grid_box)
        form.addRow("Patch size", self.patch_px)
        form.addRow("Resolution", self.patch_mpp)
        form.addRow("Overlap", self.overlap)
        form.addRow("Min. tissue", self.min_tissue)
        form.addRow(self.grid_btn)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.tasks = TaskRunner(self, status=self.status)

        layout = QVBoxLayout(self)
        layout.addWidget(open_btn)
        layout.addWidget(self.info)
        layout.addLayout(mpp_row)
        layout.addWidget(self.tissue_btn)
        layout.addWidget(grid_box)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.viewer.layers.selection.events.active.connect(self._refresh)
        self.viewer.layers.events.inserted.connect(self._refresh)
        self._refresh()

    # --- state -----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Detecting tissue or making a grid in the background (tests and the demo wait for this)."""
        return self.tasks.busy

    def current(self) -> tuple[Any, Slide] | tuple[None, None]:
        """The active slide layer, or the topmost slide layer when another layer is selected."""
        active = self.viewer.layers.selection.active
        if slide_of(active) is not None:
            return active, slide_of(active)
        for layer in reversed(self.viewer.layers):
            if slide_of(layer) is not None:
                return layer, slide_of(layer)
        return None, None

    def _refresh(self, *_: Any) -> None:
        layer, slide = self.current()
        if slide is None:
            self.info.setText("No slide open. Use File > Open or the button above.")
            return
        w, h = slide.dimensions
        mpp = f"{slide.mpp:.4g} µm/px" if slide.mpp else "unknown: set it below"
        mag = f", {slide.objective_power:g}x" if slide.objective_power else ""
        self.info.setText(
            f"<b>{slide.path.name}</b><br>{w:,} × {h:,} px, {slide.level_count} levels{mag}<br>"
            f"Pixel size: {mpp}<br>Read by: {slide.backend} ({slide.vendor})"
        )
        if slide.mpp:
            self.mpp_box.setValue(slide.mpp)
            if {str(u) for u in layer.units} != {"micrometer"}:  # the scale bar's unit is the layers' units
                layer.units = ("µm", "µm")
        self.viewer.canvas.overlays.scale_bar.visible = True

    def _notify(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(message)
        show_error(message)

    # --- actions -------------------------------------------------------------------------------
    def _choose_file(self) -> None:
        from ..slide.formats import dialog_filter

        path, _ = QFileDialog.getOpenFileName(self, "Open slide", "", dialog_filter())
        if path:
            self.open_path(path)

    def open_path(self, path: str) -> Any:
        from ..slide import open_slide

        try:
            slide = open_slide(path)
        except WsimilError as exc:
            self._notify(str(exc))
            return None
        data, kwargs, _ = slide_layer_data(slide)
        layer = self.viewer.add_image(data, **kwargs)
        self.viewer.reset_view()
        return layer

    def _set_mpp(self) -> None:
        layer, slide = self.current()
        if slide is None:
            self._notify("Open a slide first.")
            return
        slide.mpp = self.mpp_box.value()
        layer.scale = (slide.mpp, slide.mpp)
        layer.units = ("µm", "µm")
        layer.metadata["wsimil"]["mpp"] = slide.mpp
        self.viewer.reset_view()
        self._refresh()

    def detect_tissue(self) -> Any:
        layer, slide = self.current()
        if slide is None:
            self._notify("Open a slide first.")
            return None
        from ..slide.tissue import tissue_mask

        def done(tissue: Any) -> None:
            data, kwargs, _ = mask_layer_data(slide, tissue.mask, tissue.downsample, f"{layer.name} tissue")
            overlay = self.viewer.add_labels(data, **kwargs)
            overlay.contour = 2  # an outline keeps the tissue under it visible
            self.status.setText(f"Tissue: {100 * tissue.mask.mean():.1f} % of the slide.")
            self.viewer.layers.selection.active = layer

        return self.tasks.run("Detecting tissue", lambda: tissue_mask(slide), done)

    def make_patch_grid(self) -> Any:
        layer, slide = self.current()
        if slide is None:
            self._notify("Open a slide first.")
            return None
        if slide.mpp is None:
            self._notify("This slide does not record its pixel size: set it above, then make the grid.")
            return None
        from ..slide.tiling import patch_grid

        size, mpp = self.patch_px.value(), self.patch_mpp.value()
        overlap, min_tissue = self.overlap.value(), self.min_tissue.value()

        def compute() -> Any:
            return patch_grid(slide, patch_size=size, mpp=mpp, overlap=overlap, min_tissue=min_tissue)

        def done(grid: Any) -> None:
            data, kwargs, _ = patch_grid_layer_data(slide, grid.coords, grid.size_level0, f"{layer.name} patches")
            if len(data):
                self.viewer.add_shapes(data, **kwargs)
            self.status.setText(f"{len(grid):,} patches of {size} px at {mpp:g} µm/px.")
            self.viewer.layers.selection.active = layer

        return self.tasks.run("Making patch grid", compute, done)
