"""The runs list and the live layer: the project's runs, the chosen run's facts, and its map over the slide.

Choosing a run computes its map of the current slide in the background (best checkpoint) and, for a
segmentation run, sets the threshold to the run's operating threshold. The map is one image layer per
slide, ``attention <slide>`` (a MIL run's attention, a segmentation run's tumour probability), in the
slide's world units; training replaces its data after every checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QSlider,
)

from ..layers import attention_layer_data, zoom_path_layer_data
from .tasks import report_failure


class RunsPanel(QGroupBox):
    """Runs and attention map."""

    run_chosen = Signal(object)  # the run's name (None when none is chosen), after a choice in the list
    map_shown = Signal()  # the attention layer was added or updated

    def __init__(self, ctx: Any, parent: Any = None):
        super().__init__("Runs and attention map", parent)
        self.ctx = ctx
        self.runs: dict[str, Any] = {}  # name -> RunSummary
        self.runs_list = QListWidget()
        self.runs_list.setMaximumHeight(110)
        self.runs_list.currentItemChanged.connect(self._on_row)
        self.run_info = QLabel()
        self.run_info.setWordWrap(True)
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(50)
        self.opacity.valueChanged.connect(self._apply_look)
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 0.999)
        self.threshold.setDecimals(3)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.5)
        self.threshold.setToolTip("Scores below this look dark; 'Export GeoJSON' outlines the scores "
                                  "above it. Choosing a segmentation run sets it to the run's operating "
                                  "threshold (set on benign slides after training).")
        self.threshold.valueChanged.connect(self._apply_look)
        form = QFormLayout(self)
        form.addRow(self.runs_list)
        form.addRow(self.run_info)
        form.addRow("Opacity", self.opacity)
        form.addRow("Threshold", self.threshold)
        ctx.current_run = self.current_run

    def current_run(self) -> str | None:
        item = self.runs_list.currentItem()
        return None if item is None else item.data(Qt.ItemDataRole.UserRole)

    # --- the list --------------------------------------------------------------------------------
    def refresh(self, select: str | None = None) -> None:
        """The project's runs; ``select`` (or the previous choice) stays chosen, its map not recomputed."""
        keep = select or self.current_run()
        try:
            runs = self.ctx.api.runs() if self.ctx.api is not None else []
        except Exception as exc:  # noqa: BLE001
            report_failure("Listing runs", exc)
            runs = []
        self.runs = {r.name: r for r in runs}
        self.runs_list.blockSignals(True)
        self.runs_list.clear()
        for r in runs:
            val = "" if r.val_loss is None else f", val loss {r.val_loss:.3f}"
            state = "" if r.finished else ", unfinished"
            item = QListWidgetItem(f"{r.name}  ({r.method}, epoch {r.epoch}/{r.total_epochs}{val}{state})")
            item.setData(Qt.ItemDataRole.UserRole, r.name)
            item.setToolTip(str(r.path))
            self.runs_list.addItem(item)
            if r.name == keep:
                self.runs_list.setCurrentItem(item)
        self.runs_list.blockSignals(False)
        self._show_run_info()

    def _show_run_info(self) -> None:
        r = self.runs.get(self.current_run())
        if r is None:
            self.run_info.setText("")
            return
        val = "no validation loss" if r.val_loss is None else f"best validation loss {r.val_loss:.4f}"
        if r.val_metrics:
            val += " (last epoch: " + ", ".join(f"{k} {v:.3f}" for k, v in r.val_metrics.items()) + ")"
        state = "finished" if r.finished else "unfinished: 'Resume run' continues it"
        self.run_info.setText(f"<b>{r.name}</b>: {r.method}, epoch {r.epoch} of {r.total_epochs}, {val}; "
                              f"{state}.")

    def _on_row(self, *_: Any) -> None:
        name, api = self.current_run(), self.ctx.api
        t = api.operating_threshold(name) if api is not None and name else None
        if t is not None:
            self.threshold.setValue(min(t, 0.999))
        self._show_run_info()
        self.run_chosen.emit(name)

    # --- the map ---------------------------------------------------------------------------------
    def load_map(self) -> Any:
        """The chosen run's map of the current slide (best checkpoint), computed in the background."""
        ctx = self.ctx
        need = ctx.need() if self.current_run() and ctx.slide_id() else None
        if need is None:
            return None
        name, sid = need
        api = ctx.api
        return ctx.tasks.run(f"Map of {sid} from {name}", lambda: api.slide_map(name, sid),
                             lambda ev: self.show_map(ev, name) if ev.slide_id == ctx.slide_id() else None)

    def show_map(self, ev: Any, run: str | None = None) -> Any:
        """Put a :class:`~napari_wsimil.train.events.MapEvent` of the current slide into its layer."""
        s, viewer = self.ctx.session, self.ctx.viewer
        slide = s.slide
        if slide is None or ev.slide_id != s.slide_id:
            return None
        name = f"attention {ev.slide_id}"
        look = {"opacity": self.opacity.value() / 100, "threshold": self.threshold.value()}
        data, kw, _ = attention_layer_data(slide, ev.heatmap, ev.downsample, name, **look)
        kw["metadata"]["wsimil"].update(training_widget=True, slide_id=ev.slide_id, run=run, epoch=ev.epoch,
                                        slide_mpp=ev.slide_mpp)
        layer = self.ctx.layer("attention", ev.slide_id)
        if layer is None:
            layer = viewer.add_image(data, **kw)
            colorbar = getattr(layer, "colorbar", None)
            if colorbar is not None and hasattr(colorbar, "visible"):
                colorbar.visible = True
        else:
            layer.metadata = kw["metadata"]
            # a changed scale re-slices every layer (the slide's tiles included): only when it changed
            if not (np.allclose(layer.scale, kw["scale"]) and np.allclose(layer.translate, kw["translate"])):
                layer.scale, layer.translate = kw["scale"], kw["translate"]
            layer.data = data
            layer.contrast_limits = kw["contrast_limits"]
            if not layer.visible:  # setting it rebuilds the layer's overlays (the colour bar): 0.5 s
                layer.visible = True
        self._show_regions(ev)
        self.map_shown.emit()
        return layer

    def _show_regions(self, ev: Any) -> None:
        """The boxes a map comes with (ZoomMIL's zoom path) in a ``zoom path <slide>`` shapes layer; a map
        without them hides a layer left from another run."""
        layer = self.ctx.layer("zoom path", ev.slide_id)
        regions = getattr(ev, "regions", None)
        if regions is None or not len(regions):
            if layer is not None:
                layer.visible = False
            return
        data, kw, _ = zoom_path_layer_data(self.ctx.session.slide, regions, f"zoom path {ev.slide_id}")
        kw["metadata"]["wsimil"].update(training_widget=True, slide_id=ev.slide_id, epoch=ev.epoch)
        if layer is not None:
            self.ctx.viewer.layers.remove(layer)
        self.ctx.viewer.add_shapes(data, **kw)

    def _apply_look(self, *_: Any) -> None:
        layer = self.ctx.layer("attention")
        if layer is not None:
            layer.opacity = self.opacity.value() / 100
            layer.contrast_limits = (min(self.threshold.value(), 0.999), 1.0)
