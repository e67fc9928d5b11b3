"""Corrections and suggestions: the chosen run's pseudo-labels as an editable layer, "Retrain with
corrections", and the most uncertain places of the slide as points and a list.

The pseudo-labels are computed in the background and shown as ``pseudo-labels <slide>`` at the project's
label geometry. Retraining saves what the user changed on that layer as paint (on top of the strokes on
the project's own labels layer), then trains: MS-CLAM on the corrected tile labels, or the segmentation
run again (see :meth:`~napari_wsimil.workflow.session.InteractiveSession.retrain_spec`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
)

from ..errors import WsimilError
from ..layers import world_mpp
from ._autosave import notify
from .tasks import report_failure


class CorrectionsPanel(QGroupBox):
    """Corrections."""

    def __init__(self, ctx: Any, train: Callable[[Any], Any], settings: Callable[[], tuple[int, str]],
                 parent: Any = None):
        super().__init__("Corrections", parent)
        self.ctx = ctx
        self._train = train  # starts a run (the run control's)
        self._settings = settings  # (epochs to add, device) from the method form
        self._pseudo: dict[str, tuple[str, np.ndarray]] = {}  # slide -> (run, labels as shown, before edits)
        self.last_corrections: int | None = None
        self.suggested: np.ndarray = np.zeros((0, 3))
        self.pseudo_btn = QPushButton("Show pseudo-labels")
        self.pseudo_btn.setToolTip("The chosen run's confident tumour/normal regions as editable labels.")
        self.pseudo_btn.clicked.connect(self.show_pseudo_labels)
        self.retrain_btn = QPushButton("Retrain with corrections")
        self.retrain_btn.setToolTip("Save what you changed on the pseudo-labels as paint, then train "
                                    "MS-CLAM on it.")
        self.retrain_btn.clicked.connect(self.retrain)
        self.suggest_btn = QPushButton("Suggest where to label")
        self.suggest_btn.clicked.connect(self.suggest)
        self.n_suggest = QSpinBox()
        self.n_suggest.setRange(1, 100)
        self.n_suggest.setValue(8)
        self.suggestion_list = QListWidget()
        self.suggestion_list.setMaximumHeight(100)
        self.suggestion_list.currentRowChanged.connect(self._go_to_suggestion)
        form = QFormLayout(self)
        form.addRow(self.pseudo_btn, self.retrain_btn)
        row = QHBoxLayout()
        row.addWidget(self.suggest_btn)
        row.addWidget(self.n_suggest)
        form.addRow(row)
        form.addRow(self.suggestion_list)

    def update_buttons(self, writable: bool, has_run: bool, has_slide: bool, training: bool) -> None:
        self.pseudo_btn.setEnabled(has_run and has_slide)
        self.suggest_btn.setEnabled(has_run and has_slide)
        self.retrain_btn.setEnabled(writable and has_run and has_slide and not training)

    def forget(self) -> None:
        """The project closed: pending pseudo-label edits belong to it."""
        self._pseudo.clear()

    # --- pseudo-labels ---------------------------------------------------------------------------
    def show_pseudo_labels(self) -> Any:
        """The chosen run's pseudo-labels of the current slide as an editable Labels layer."""
        need = self.ctx.need()
        if need is None:
            return None
        name, sid = need
        api = self.ctx.api
        return self.ctx.tasks.run(f"Pseudo-labels of {sid}", lambda: api.pseudo_labels(name, sid),
                                  lambda pseudo: self._add_pseudo(name, sid, pseudo))

    def _add_pseudo(self, run: str, sid: str, pseudo: np.ndarray) -> None:
        from ..project_layers import labels_layer_data

        s = self.ctx.session
        if sid != s.slide_id or s.slide is None:
            return
        data, kw, _ = labels_layer_data(pseudo, s.geometry.downsample, s.project.classes, s.slide,
                                        name=f"pseudo-labels {sid}", opacity=0.6)
        kw["metadata"]["wsimil"].update(kind="pseudo_labels", training_widget=True, slide_id=sid, run=run)
        layer = self.ctx.layer("pseudo-labels", sid)
        if layer is None:
            layer = self.ctx.viewer.add_labels(data, **kw)
        else:
            layer.data = data
            layer.metadata = kw["metadata"]
            layer.visible = True
        layer.editable = not s.readonly
        self._pseudo[sid] = (run, np.array(data, copy=True))
        self.ctx.viewer.layers.selection.active = layer

    def retrain(self) -> Any:
        """Save the edits of the pseudo-label layer as paint, then train on the corrected labels."""
        need = self.ctx.need()
        if need is None:
            return None
        name, sid = need
        api = self.ctx.api
        try:
            self.ctx.session.flush()  # strokes on the labels layer first: the corrections go on top
            layer = self.ctx.layer("pseudo-labels", sid)
            if layer is not None and sid in self._pseudo:
                edited = np.asarray(layer.data)
                n = api.save_corrections(sid, self._pseudo[sid][1], edited)
                self._pseudo[sid] = (self._pseudo[sid][0], edited.copy())  # saved: the next diff starts here
                self._reload_paint(sid)
            else:
                n = 0
            self.last_corrections = n
            notify(f"Saved {n} corrected label pixels of {sid}." if n else
                   f"No corrections on {sid}: retraining on the labels saved so far.", "info")
            epochs, device = self._settings()
            spec = api.retrain_spec(name, extra_epochs=epochs, device=device)
        except Exception as exc:  # noqa: BLE001
            report_failure(f"Retraining {name}", exc)
            return None
        return self._train(spec)

    def _reload_paint(self, sid: str) -> None:
        """Show the corrections on the project's own labels layer (so a later stroke cannot undo them)."""
        s = self.ctx.session
        layer = s.labels_layer
        if layer is None or s.slide_id != sid:
            return
        painted = s.project.pixel_labels(sid)
        if isinstance(layer.data, np.ndarray) and layer.data.shape == painted.shape:
            layer.data[...] = painted  # in place: what is on disk already, so no autosave
            s.autosave.adopt()
            layer.refresh()

    # --- suggestions -----------------------------------------------------------------------------
    def suggest(self) -> Any:
        """The most uncertain places of the current slide, as points and a list."""
        need = self.ctx.need()
        if need is None:
            return None
        name, sid = need
        api, k = self.ctx.api, self.n_suggest.value()
        return self.ctx.tasks.run(f"Suggestions for {sid}", lambda: api.suggestions(name, sid, k),
                                  lambda sug: self._add_suggestions(name, sid, sug))

    def _add_suggestions(self, run: str, sid: str, sug: np.ndarray) -> None:
        s = self.ctx.session
        if sid != s.slide_id or s.slide is None:
            return
        m = world_mpp(s.slide)
        sug = np.asarray(sug, dtype=float).reshape(-1, 3)
        self.suggested = sug
        # level-0 (x, y) with (0, 0) the first pixel's corner; napari centres pixel i at i·m
        points = np.stack([(sug[:, 1] - 0.5) * m, (sug[:, 0] - 0.5) * m], 1)
        try:  # a patch wide: run.json's patch at its µm/px (in level-0 px on a slide without µm/px)
            info = self.ctx.api.run_info(run)
            size = float(info["patch"]) * (float(info["mpp"]) if s.slide.mpp else 1.0)
        except (WsimilError, KeyError, TypeError, ValueError):
            size = 256.0 * m
        kw = {"name": f"suggestions {sid}", "size": size, "symbol": "square", "face_color": "transparent",
              "border_color": "#00e5ff", "border_width": 0.08, "features": {"entropy": sug[:, 2]},
              "metadata": {"wsimil": {"kind": "suggestions", "training_widget": True, "slide_id": sid,
                                      "run": run}}}
        if s.slide.mpp is not None:
            kw["units"] = ("µm", "µm")
        layer = self.ctx.layer("suggestions", sid)
        if layer is not None:
            self.ctx.viewer.layers.remove(layer)
        layer = self.ctx.viewer.add_points(points, **kw)
        self.show_rows(layer)

    def show_rows(self, layer: Any) -> None:
        """List the points of a suggestions layer (None: an empty list)."""
        self.suggestion_list.blockSignals(True)
        self.suggestion_list.clear()
        if layer is not None:
            for i, ((y, x), e) in enumerate(zip(layer.data, layer.features["entropy"]), 1):
                item = QListWidgetItem(f"{i}. y {y:.0f}, x {x:.0f}  (uncertainty {e:.2f})")
                item.setData(Qt.ItemDataRole.UserRole, (float(y), float(x)))
                self.suggestion_list.addItem(item)
        self.suggestion_list.blockSignals(False)

    def _go_to_suggestion(self, row: int) -> None:
        item = self.suggestion_list.item(row)
        if item is not None:
            self.ctx.viewer.scene.camera.center = item.data(Qt.ItemDataRole.UserRole)


__all__ = ["CorrectionsPanel"]
