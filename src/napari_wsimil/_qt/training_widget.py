"""Dock widget: train a MIL model on the open project, watch its attention map, correct, retrain, export.

A thin view over :class:`~napari_wsimil.train.session.InteractiveSession`: the widget builds the run
request from its form, iterates ``session.train`` in a napari worker (pause and cancel take effect at
its yields, one per optimiser step) and, on the main thread, turns each event into the progress bar,
the loss plot and the ``attention <slide>`` layer. Slower one-off computations (a run's map,
pseudo-labels, suggestions) run in workers too, so the window never freezes. Every failure becomes a
notification with a readable message; its traceback goes to the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..errors import WsimilError
from ..layers import attention_layer_data, world_mpp
from ._common import notify, session_for
from .encoder_picker import EncoderPicker
from .loss_plot import LossPlot

if TYPE_CHECKING:  # pragma: no cover
    import napari

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
TRISTATE = {"auto": None, "on": True, "off": False}


@dataclass
class _Failure:
    """An exception caught in a worker, handed to the main thread as a value (never re-raised there)."""

    exc: BaseException


def _message(exc: BaseException) -> str:
    """What the user reads: our own errors are written for them; anything else gets its type."""
    return str(exc) if isinstance(exc, WsimilError) else f"{type(exc).__name__}: {exc}"


def _type_name(typ: Any) -> str:
    """Config field types arrive as strings (postponed annotations) or types; compare by name."""
    return typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))


# --- the method's settings form ------------------------------------------------------------------
def _editor(default: Any, typ: Any, doc: str) -> QWidget:
    """A plain Qt editor for one config field, chosen by its declared type."""
    t = _type_name(typ).replace(" ", "")
    if t == "bool":
        w: QWidget = QCheckBox()
        w.setChecked(bool(default))
    elif "bool" in t and "None" in t:
        w = QComboBox()
        w.addItems(list(TRISTATE))
        w.setCurrentText(next(k for k, v in TRISTATE.items() if v is default or v == default))
    elif t == "int":
        w = QSpinBox()
        w.setRange(-1_000_000_000, 1_000_000_000)
        w.setValue(int(default or 0))
    else:  # float (line edit: learning rates need 1e-5), str and anything else
        text = "" if default is None else repr(default) if isinstance(default, float) else str(default)
        w = QLineEdit(text)
    w.setToolTip(doc)
    w.setProperty("wsimil_type", t)
    w.setProperty("wsimil_default_none", default is None)
    return w


def _editor_value(name: str, w: QWidget) -> Any:
    t = w.property("wsimil_type")
    if isinstance(w, QCheckBox):
        return w.isChecked()
    if isinstance(w, QComboBox):
        return TRISTATE[w.currentText()]
    if isinstance(w, QSpinBox):
        return w.value()
    text = w.text().strip()
    if not text and w.property("wsimil_default_none"):
        return None
    if t in ("float", "float|None"):
        try:
            return float(text)
        except ValueError:
            raise WsimilError(f"setting {name}: {text!r} is not a number") from None
    return text


def _set_editor_value(w: QWidget, value: Any) -> None:
    if isinstance(w, QCheckBox):
        w.setChecked(bool(value))
    elif isinstance(w, QComboBox):
        w.setCurrentText(next(k for k, v in TRISTATE.items() if v is value or v == value))
    elif isinstance(w, QSpinBox):
        w.setValue(int(value))
    else:
        w.setText("" if value is None else str(value))


class TrainingWidget(QWidget):
    """Train, watch the attention map as it learns, correct pseudo-labels and retrain, export."""

    message = Signal(str)  # the library's progress lines, emitted from the worker thread

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)  # real layers, as the session adds
        self.session = session_for(napari_viewer, self)
        self._api: Any = None  # InteractiveSession of the open project
        self.worker: Any = None  # the training worker while one runs
        self._handle: Any = None  # its child process (SubprocessTraining): pause, resume, close
        self._tasks: set[Any] = set()  # one-off workers (maps, pseudo-labels, suggestions)
        self._run_name: str | None = None  # the run being trained
        self._auto_name: str | None = None
        self._last: dict[str, Any] = {}
        self._pseudo: dict[str, tuple[str, np.ndarray]] = {}  # slide -> (run, labels as shown, before edits)
        self.options: dict[str, QWidget] = {}
        self._runs: dict[str, Any] = {}
        self._quit_on_close: Callable[..., None] = lambda *_: None
        self.last_corrections: int | None = None
        self.suggested: np.ndarray = np.zeros((0, 3))
        self.exported: list[Path] = []

        # --- the request
        from ..train.session import method_names

        self.method = QComboBox()
        self.method.addItems(method_names())
        self.method.setToolTip("Training method (the registry's methods).")
        self._kind = "mil"  # of the chosen method: "segmentation" methods train on pixels, without an encoder
        self.encoder_picker = EncoderPicker()
        self.encoder_picker.setToolTip("Patch encoder of the feature bags a MIL method trains on (features "
                                       "are cached per encoder in PROJECT/features). Segmentation methods "
                                       "train on pixels and have none.")
        self.settings = QGroupBox("Settings")
        self.settings_form = QFormLayout(self.settings)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 100_000)
        self.epochs.setValue(50)
        self.epochs.setToolTip("Epochs of a new run; the epochs added by 'Resume run' of a finished run "
                               "and by retraining.")
        self.device = QComboBox()
        self.device.addItems(list(DEVICES))
        self.mpp = QDoubleSpinBox()
        self.mpp.setRange(0.05, 64.0)
        self.mpp.setDecimals(2)
        self.mpp.setValue(0.5)
        self.mpp.setSuffix(" µm/px")
        self.mpp.setToolTip("Resolution the patches are read at (features are cached per resolution).")
        self.patch = QSpinBox()
        self.patch.setRange(16, 4096)
        self.patch.setValue(256)
        self.patch.setSuffix(" px")
        self.patch.setToolTip("Patch side, in pixels at that resolution.")
        self.run_name = QLineEdit()
        self.run_name.setToolTip("Folder name under PROJECT/runs.")
        request = QGroupBox("Training")
        form = QFormLayout(request)
        form.addRow("Method", self.method)
        form.addRow(self.encoder_picker)
        form.addRow(self.settings)
        form.addRow("Epochs", self.epochs)
        form.addRow("Device", self.device)
        form.addRow("Patches at", self.mpp)
        form.addRow("Patch size", self.patch)
        form.addRow("Run name", self.run_name)

        self.start_btn = QPushButton("Start")
        self.start_btn.clicked.connect(self.start)
        self.pause_btn = QPushButton("Pause")
        self.pause_btn.clicked.connect(self.toggle_pause)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.cancel)
        self.resume_btn = QPushButton("Resume run")
        self.resume_btn.setToolTip("Continue the run chosen below from its last checkpoint.")
        self.resume_btn.clicked.connect(self.resume_run)
        row = QHBoxLayout()
        for b in (self.start_btn, self.pause_btn, self.cancel_btn, self.resume_btn):
            row.addWidget(b)
        form.addRow(row)
        self.progress = QProgressBar()
        self.progress.setFormat("epoch %v / %m")
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.loss_plot = LossPlot()
        form.addRow(self.progress)
        form.addRow(self.status)
        form.addRow(self.loss_plot)

        # --- runs and the map
        self.runs_list = QListWidget()
        self.runs_list.setMaximumHeight(110)
        self.runs_list.currentItemChanged.connect(self._on_run_row)
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
        runs_box = QGroupBox("Runs and attention map")
        rl = QFormLayout(runs_box)
        rl.addRow(self.runs_list)
        rl.addRow(self.run_info)
        rl.addRow("Opacity", self.opacity)
        rl.addRow("Threshold", self.threshold)

        # --- corrections
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
        fix_box = QGroupBox("Corrections")
        fl = QFormLayout(fix_box)
        fl.addRow(self.pseudo_btn, self.retrain_btn)
        r2 = QHBoxLayout()
        r2.addWidget(self.suggest_btn)
        r2.addWidget(self.n_suggest)
        fl.addRow(r2)
        fl.addRow(self.suggestion_list)

        # --- export
        self.export_masks_btn = QPushButton("Export masks")
        self.export_masks_btn.setToolTip("The slide's pixel labels as OME-TIFF and PNG into PROJECT/exports.")
        self.export_masks_btn.clicked.connect(self.export_masks)
        self.export_heatmap_btn = QPushButton("Export heatmap")
        self.export_heatmap_btn.clicked.connect(self.export_heatmap)
        self.export_geojson_btn = QPushButton("Export GeoJSON")
        self.export_geojson_btn.setToolTip("Outlines of the map above the threshold, as QuPath annotations.")
        self.export_geojson_btn.clicked.connect(self.export_geojson)
        ex = QHBoxLayout()
        for b in (self.export_masks_btn, self.export_heatmap_btn, self.export_geojson_btn):
            ex.addWidget(b)

        layout = QVBoxLayout(self)
        layout.addWidget(request)
        layout.addWidget(runs_box)
        layout.addWidget(fix_box)
        layout.addLayout(ex)
        layout.addStretch(1)

        self.message.connect(self.status.setText)
        self.method.currentTextChanged.connect(self._on_method)
        self.session.project_changed.connect(self._on_project)
        self.session.slide_changed.connect(self._on_slide)
        if self.method.findText("clam-sb") >= 0:
            self.method.setCurrentText("clam-sb")
        self._on_method(self.method.currentText())
        self._on_project()

    # --- state -----------------------------------------------------------------------------------
    @property
    def api(self) -> Any:
        """The headless session of the open project (None when no project is open)."""
        return self._api

    @property
    def training(self) -> bool:
        return self.worker is not None

    @property
    def busy(self) -> bool:
        """Training or computing something in the background (tests wait for this to clear)."""
        return self.training or bool(self._tasks)

    def current_run(self) -> str | None:
        item = self.runs_list.currentItem()
        return None if item is None else item.data(Qt.ItemDataRole.UserRole)

    def _slide_id(self) -> str | None:
        s = self.session
        return s.slide_id if s.slide is not None else None

    def _need(self, run: bool = True) -> tuple[str, str] | None:
        """(run, slide) for an action on the current slide, or None after telling the user what is missing."""
        if self._api is None:
            notify("Open a project first.", "info")
            return None
        sid = self._slide_id()
        name = self.current_run()
        if sid is None:
            notify("Choose a slide of the project first.", "info")
            return None
        if run and name is None:
            notify("Choose a run in the runs list first (or train one).", "info")
            return None
        return name or "", sid

    def _on_project(self) -> None:
        if self.worker is not None:
            self.worker.quit()  # it trains the project that was just closed
        p = self.session.project
        if self._api is not None:
            self._drop_layers()
        self._pseudo.clear()
        self._api = None
        if p is not None:
            from ..train.session import InteractiveSession

            self._api = InteractiveSession(p)
            self.encoder_picker.refresh()  # encoders registered since (the choice itself is kept)
        self.refresh_runs()
        self._default_name(force=True)
        self._on_slide()

    def _on_slide(self) -> None:
        """Overlays of another slide are hidden (not deleted: pseudo-label edits may be pending)."""
        sid = self._slide_id()
        for layer in self.viewer.layers:
            info = layer.metadata.get("wsimil", {}) if isinstance(layer.metadata, dict) else {}
            if info.get("training_widget"):
                layer.visible = info.get("slide_id") == sid
        self._show_suggestion_rows(self._layer("suggestions", sid))
        self._update_buttons()

    def _drop_layers(self) -> None:
        for layer in list(self.viewer.layers):
            info = layer.metadata.get("wsimil", {}) if isinstance(layer.metadata, dict) else {}
            if info.get("training_widget"):
                self.viewer.layers.remove(layer)

    def _update_buttons(self) -> None:
        has_p = self._api is not None
        writable = has_p and not self.session.readonly
        has_run = self.current_run() is not None
        has_slide = self._slide_id() is not None
        self.start_btn.setEnabled(writable and not self.training)
        self.pause_btn.setEnabled(self.training)
        self.cancel_btn.setEnabled(self.training)
        self.resume_btn.setEnabled(writable and has_run and not self.training)
        self.pseudo_btn.setEnabled(has_run and has_slide)
        self.suggest_btn.setEnabled(has_run and has_slide)
        self.retrain_btn.setEnabled(writable and has_run and has_slide and not self.training)
        self.export_masks_btn.setEnabled(has_p and has_slide)
        has_map = self._layer("attention", self._slide_id()) is not None
        self.export_heatmap_btn.setEnabled(has_map)
        self.export_geojson_btn.setEnabled(has_map)

    # --- form ------------------------------------------------------------------------------------
    def _on_method(self, name: str) -> None:
        """A new method, a new form: its own fields, defaults and help."""
        from ..train.session import method_options

        while self.settings_form.rowCount():
            self.settings_form.removeRow(0)
        self.options = {}
        try:
            options = method_options(name) if name else []
        except Exception as exc:  # noqa: BLE001 - a broken method must not break the widget
            self._fail(f"Settings of {name}", exc)
            options = []
        for field, default, typ, doc in options:
            w = _editor(default, typ, doc)
            self.options[field] = w
            label = QLabel(field.replace("_", " "))
            label.setToolTip(doc)
            self.settings_form.addRow(label, w)
        if name:
            from ..train.session import method_geometry

            mpp, patch = method_geometry(name)  # segmentation works at 1 µm/px on 128 px patches, MIL otherwise
            self.mpp.setValue(mpp)
            self.patch.setValue(patch)
        try:
            from ..train.session import method_kind

            self._kind = method_kind(name) if name else "mil"
        except Exception:  # noqa: BLE001 - reported above with its settings
            self._kind = "mil"
        self.encoder_picker.setVisible(self._kind != "segmentation")  # the choice is kept while hidden
        self._default_name()

    def set_option(self, name: str, value: Any) -> None:
        """Set a field of the settings form (what a user types; scripts and tests call this)."""
        _set_editor_value(self.options[name], value)

    def config(self) -> dict[str, Any]:
        """The form's values, as ``InteractiveSession.spec(config=...)`` takes them."""
        return {name: _editor_value(name, w) for name, w in self.options.items()}

    def _default_name(self, force: bool = False) -> None:
        """``<method>-<n>``, unique among the project's runs; a name the user typed is kept."""
        if not force and self.run_name.text() not in ("", self._auto_name):
            return
        method = self.method.currentText() or "run"
        taken = set()
        if self._api is not None and self._api.runs_dir.is_dir():
            taken = {p.name for p in self._api.runs_dir.iterdir()}
        n = 1
        while f"{method}-{n}" in taken:
            n += 1
        self._auto_name = f"{method}-{n}"
        self.run_name.setText(self._auto_name)

    # --- training --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start a new run from the form."""
        if self._api is None:
            notify("Open a project first.", "info")
            return
        try:
            encoder = self._encoder_choice()
            if encoder is None:
                return
            spec = self._api.spec(self.method.currentText(), self.run_name.text().strip(),
                                  epochs=self.epochs.value(), device=self.device.currentText(),
                                  mpp=self.mpp.value(), patch=self.patch.value(), config=self.config(),
                                  **encoder)
        except Exception as exc:  # noqa: BLE001
            self._fail("Training", exc)
            return
        self.train(spec)

    def _encoder_choice(self) -> dict[str, Any] | None:
        """``encoder`` and ``weights`` of a MIL run ({} for a segmentation method), or None after telling the
        user why that choice cannot start (nothing is created then)."""
        if self._kind == "segmentation":
            return {}
        from ..train.session import encoder_problem

        picker = self.encoder_picker
        encoder, weights = picker.encoder(), picker.weights()
        problem = encoder_problem(encoder, weights, picker.specs)
        if problem:
            self.status.setText(problem)
            notify(problem, "warning")
            return None
        return {"encoder": encoder, "weights": weights}

    def resume_run(self) -> None:
        """Continue the chosen run from its last checkpoint (a finished one for ``epochs`` more)."""
        name = self.current_run()
        if self._api is None or name is None:
            notify("Choose a run in the runs list first.", "info")
            return
        summary = next((r for r in self._api.runs() if r.name == name), None)
        extra = self.epochs.value() if summary is not None and summary.finished else 0
        try:
            spec = self._api.resume_spec(name, extra, self.device.currentText())
        except Exception as exc:  # noqa: BLE001
            self._fail(f"Resuming {name}", exc)
            return
        self.train(spec)

    def train(self, spec: Any) -> Any:
        """Train ``spec`` in a worker, watching the current slide; returns the worker."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            notify("A training is already running: pause or cancel it first.", "info")
            return None
        api, sid = self._api, self._slide_id()
        watch = [sid] if sid is not None else []
        report = self._report

        def run() -> Generator[Any, None, Any]:
            handle = None
            try:
                # a child process: feature extraction and checkpoint maps hold the GIL in C code for
                # 100 ms and more, which would freeze the window if they ran in this process
                handle = self._handle = api.train_process(spec, watch=watch, report=report)
                yield from handle
            except Exception as exc:  # noqa: BLE001 - handed to the main thread as a value
                yield _Failure(exc)
            finally:
                if handle is not None:
                    handle.close()

        self._run_name = Path(spec.out).name
        self._last = {"epoch": 0, "total": int(spec.epochs), "aborted": False}
        self.loss_plot.clear()
        self.progress.setRange(0, int(spec.epochs))
        self.progress.setValue(0)
        self.status.setText(f"Preparing {self._run_name} (features, labels)…")
        # napari's own progress bar (activity dock), indeterminate: a determinate one is advanced through
        # QApplication.processEvents(), which would re-enter these handlers mid-event; the dock's bar above
        # counts the epochs.
        worker = create_worker(run, _progress={"desc": f"Training {self._run_name}"})
        worker.yielded.connect(self._on_event)
        worker.paused.connect(self._on_paused)
        worker.resumed.connect(self._on_resumed)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._quit_on_close = lambda *_: worker.quit()
        self.destroyed.connect(self._quit_on_close)  # the window closed: stop at the next step
        self.worker = worker
        self.pause_btn.setText("Pause")
        self._update_buttons()
        worker.start()
        return worker

    def toggle_pause(self) -> None:
        w = self.worker
        if w is None:
            return
        handle = self._handle
        if w.is_paused or self.pause_btn.text() == "Resume":
            if handle is not None:
                handle.resume()
            w.resume()
            self.pause_btn.setText("Pause")
        else:
            w.pause()  # _on_paused then stops the child itself (not before: the worker must reach its yield)
            self.pause_btn.setText("Resume")

    def cancel(self) -> None:
        """Stop at the next step; the last checkpoint stays, so 'Resume run' can continue it."""
        if self.worker is not None:
            self.worker.quit()
            if self._handle is not None:
                self._handle.close()  # the child stops now; its last checkpoint is complete (atomic writes)
            self.status.setText(f"Cancelling {self._run_name}…")

    def _report(self, text: str) -> None:
        """Called from the worker thread: a queued signal carries the line to the status label."""
        try:
            self.message.emit(str(text))
        except RuntimeError:  # the widget was closed while features were extracted
            pass

    def _on_event(self, ev: Any) -> None:
        from ..train.live import MapEvent

        if isinstance(ev, _Failure):
            self._last["failed"] = True
            self._fail(f"Training {self._run_name}", ev.exc)
        elif isinstance(ev, MapEvent):
            if ev.slide_id == self._slide_id():
                self.show_map(ev, self._run_name)
        else:
            self._on_progress(ev)

    def _on_progress(self, ev: Any) -> None:
        last = self._last
        if ev.total_epochs:
            last["total"] = ev.total_epochs
            self.progress.setMaximum(ev.total_epochs)
        if ev.kind == "step":
            last["step_loss"] = ev.losses.get("total")
        elif ev.kind == "epoch":
            last.update(epoch=ev.epoch, loss=ev.losses.get("total"), val=None)
            if last["loss"] is not None:
                self.loss_plot.add("train", ev.epoch, last["loss"])
            self.progress.setValue(min(ev.epoch, self.progress.maximum()))
        elif ev.kind == "validation":
            last["val"] = ev.losses.get("bag", ev.losses.get("total"))
            if last["val"] is not None:
                self.loss_plot.add("val", ev.epoch, last["val"])
        elif ev.kind == "done":
            last["done"] = ev.message
        self.status.setText(self._status_text(ev))

    def _status_text(self, ev: Any) -> str:
        last = self._last
        if ev.kind == "done":
            return f"{self._run_name}: done after epoch {ev.epoch} ({ev.message})."
        parts = [f"{self._run_name}: epoch {ev.epoch}/{last['total']}"]
        if ev.kind == "step":
            parts[0] += f", step {ev.step}"
            if last.get("step_loss") is not None:
                parts.append(f"loss {last['step_loss']:.4f}")
        elif last.get("loss") is not None:
            parts.append(f"loss {last['loss']:.4f}")
        if ev.kind != "step" and last.get("val") is not None:
            parts.append(f"val {last['val']:.4f}")
        if ev.eta is not None:
            parts.append(f"ETA {self._eta(ev.eta)}")
        return " · ".join(parts)

    @staticmethod
    def _eta(seconds: float) -> str:
        s = round(seconds)
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

    def _on_paused(self) -> None:
        if self._handle is not None:
            self._handle.pause()  # the computation stops too, not only the delivery of its events
        self.status.setText(f"{self._run_name}: paused after epoch {self._last.get('epoch', 0)}.")

    def _on_resumed(self) -> None:
        self.status.setText(f"{self._run_name}: resumed.")

    def _on_aborted(self) -> None:
        self._last["aborted"] = True

    def _on_finished(self) -> None:
        last, name = self._last, self._run_name
        self.worker = None
        self._handle = None
        self.destroyed.disconnect(self._quit_on_close)
        self.pause_btn.setText("Pause")
        if last.get("aborted"):
            self.status.setText(f"{name}: cancelled after epoch {last.get('epoch', 0)}; "
                                "'Resume run' continues from its last checkpoint.")
        elif last.get("failed"):
            self.status.setText(f"{name}: failed (see the notification).")
        self.refresh_runs(select=name)
        self._default_name()
        self._update_buttons()

    # --- runs ------------------------------------------------------------------------------------
    def refresh_runs(self, select: str | None = None) -> None:
        """The project's runs; ``select`` (or the previous choice) stays chosen, its map not recomputed."""
        keep = select or self.current_run()
        try:
            runs = self._api.runs() if self._api is not None else []
        except Exception as exc:  # noqa: BLE001
            self._fail("Listing runs", exc)
            runs = []
        self._runs = {r.name: r for r in runs}
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
        self._update_buttons()

    def _show_run_info(self) -> None:
        r = self._runs.get(self.current_run())
        if r is None:
            self.run_info.setText("")
            return
        val = "no validation loss" if r.val_loss is None else f"best validation loss {r.val_loss:.4f}"
        if r.val_metrics:
            val += " (last epoch: " + ", ".join(f"{k} {v:.3f}" for k, v in r.val_metrics.items()) + ")"
        state = "finished" if r.finished else "unfinished: 'Resume run' continues it"
        self.run_info.setText(f"<b>{r.name}</b>: {r.method}, epoch {r.epoch} of {r.total_epochs}, {val}; "
                              f"{state}.")

    def _on_run_row(self, *_: Any) -> None:
        name = self.current_run()
        t = self._api.operating_threshold(name) if self._api is not None and name else None
        if t is not None:
            self.threshold.setValue(min(t, 0.999))
        self._show_run_info()
        self._update_buttons()
        self.load_map()

    def load_map(self) -> None:
        """The chosen run's map of the current slide (best checkpoint), computed in the background."""
        need = self._need() if self.current_run() and self._slide_id() else None
        if need is None:
            return
        name, sid = need
        api = self._api
        self._task(f"Map of {sid} from {name}", lambda: api.slide_map(name, sid),
                   lambda ev: self.show_map(ev, name) if ev.slide_id == self._slide_id() else None)

    # --- the attention layer ---------------------------------------------------------------------
    def _layer(self, kind: str, slide_id: str | None) -> Any:
        name = f"{kind} {slide_id}"
        return self.viewer.layers[name] if slide_id is not None and name in self.viewer.layers else None

    def show_map(self, ev: Any, run: str | None = None) -> Any:
        """Put a :class:`~napari_wsimil.train.live.MapEvent` of the current slide into its layer."""
        slide = self.session.slide
        if slide is None or ev.slide_id != self.session.slide_id:
            return None
        name = f"attention {ev.slide_id}"
        data, kw, _ = attention_layer_data(slide, ev.heatmap, ev.downsample, name,
                                           opacity=self.opacity.value() / 100, threshold=self.threshold.value())
        kw["metadata"]["wsimil"].update(training_widget=True, slide_id=ev.slide_id, run=run, epoch=ev.epoch,
                                        slide_mpp=ev.slide_mpp)
        layer = self._layer("attention", ev.slide_id)
        if layer is None:
            layer = self.viewer.add_image(data, **kw)
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
        self._update_buttons()
        return layer

    def _apply_look(self, *_: Any) -> None:
        layer = self._layer("attention", self._slide_id())
        if layer is not None:
            layer.opacity = self.opacity.value() / 100
            layer.contrast_limits = (min(self.threshold.value(), 0.999), 1.0)

    # --- corrections -----------------------------------------------------------------------------
    def show_pseudo_labels(self) -> None:
        """The chosen run's pseudo-labels of the current slide as an editable Labels layer."""
        need = self._need()
        if need is None:
            return
        name, sid = need
        api = self._api
        self._task(f"Pseudo-labels of {sid}", lambda: api.pseudo_labels(name, sid),
                   lambda pseudo: self._add_pseudo(name, sid, pseudo))

    def _add_pseudo(self, run: str, sid: str, pseudo: np.ndarray) -> None:
        from ..project_layers import labels_layer_data

        s = self.session
        if sid != s.slide_id or s.slide is None:
            return
        data, kw, _ = labels_layer_data(pseudo, s.geometry.downsample, s.project.classes, s.slide,
                                        name=f"pseudo-labels {sid}", opacity=0.6)
        kw["metadata"]["wsimil"].update(kind="pseudo_labels", training_widget=True, slide_id=sid, run=run)
        layer = self._layer("pseudo-labels", sid)
        if layer is None:
            layer = self.viewer.add_labels(data, **kw)
        else:
            layer.data = data
            layer.metadata = kw["metadata"]
            layer.visible = True
        layer.editable = not s.readonly
        self._pseudo[sid] = (run, np.array(data, copy=True))
        self.viewer.layers.selection.active = layer

    def retrain(self) -> Any:
        """Save the edits of the pseudo-label layer as paint, then train MS-CLAM on the corrected labels."""
        need = self._need()
        if need is None:
            return None
        name, sid = need
        api = self._api
        try:
            self.session.flush()  # strokes on the labels layer first: the corrections go on top
            layer = self._layer("pseudo-labels", sid)
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
            spec = api.retrain_spec(name, extra_epochs=self.epochs.value(), device=self.device.currentText())
        except Exception as exc:  # noqa: BLE001
            self._fail(f"Retraining {name}", exc)
            return None
        return self.train(spec)

    def _reload_paint(self, sid: str) -> None:
        """Show the corrections on the project's own labels layer (so a later stroke cannot undo them)."""
        s = self.session
        layer = s.labels_layer
        if layer is None or s.slide_id != sid:
            return
        painted = s.project.pixel_labels(sid)
        if isinstance(layer.data, np.ndarray) and layer.data.shape == painted.shape:
            layer.data[...] = painted  # in place: what is on disk already, so no autosave
            layer.refresh()

    def suggest(self) -> None:
        """The most uncertain places of the current slide, as points and a list."""
        need = self._need()
        if need is None:
            return
        name, sid = need
        api, k = self._api, self.n_suggest.value()
        self._task(f"Suggestions for {sid}", lambda: api.suggestions(name, sid, k),
                   lambda sug: self._add_suggestions(name, sid, sug))

    def _add_suggestions(self, run: str, sid: str, sug: np.ndarray) -> None:
        s = self.session
        if sid != s.slide_id or s.slide is None:
            return
        import json

        m = world_mpp(s.slide)
        sug = np.asarray(sug, dtype=float).reshape(-1, 3)
        self.suggested = sug
        # level-0 (x, y) with (0, 0) the first pixel's corner; napari centres pixel i at i·m
        points = np.stack([(sug[:, 1] - 0.5) * m, (sug[:, 0] - 0.5) * m], 1)
        try:
            info = json.loads((self._api.run_dir(run) / "run.json").read_text())
            size = float(info["patch"]) * (float(info["mpp"]) if s.slide.mpp else 1.0)
        except (OSError, ValueError, KeyError):
            size = 256.0 * m
        kw = {"name": f"suggestions {sid}", "size": size, "symbol": "square", "face_color": "transparent",
              "border_color": "#00e5ff", "border_width": 0.08, "features": {"entropy": sug[:, 2]},
              "metadata": {"wsimil": {"kind": "suggestions", "training_widget": True, "slide_id": sid,
                                      "run": run}}}
        if s.slide.mpp is not None:
            kw["units"] = ("µm", "µm")
        layer = self._layer("suggestions", sid)
        if layer is not None:
            self.viewer.layers.remove(layer)
        layer = self.viewer.add_points(points, **kw)
        self._show_suggestion_rows(layer)

    def _show_suggestion_rows(self, layer: Any) -> None:
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
            self.viewer.camera.center = item.data(Qt.ItemDataRole.UserRole)

    # --- export ----------------------------------------------------------------------------------
    def _exports(self) -> Path:
        out = Path(self.session.project.root) / "exports"
        out.mkdir(parents=True, exist_ok=True)
        return out

    def _done_export(self, paths: list[Path]) -> list[Path]:
        self.exported = paths
        notify("Exported " + ", ".join(p.name for p in paths) + f" to {paths[0].parent}.", "info")
        return paths

    def export_masks(self) -> list[Path]:
        """The current slide's pixel labels (class ids) as OME-TIFF and PNG."""
        need = self._need(run=False)
        if need is None:
            return []
        sid = need[1]
        try:
            self.session.flush()
            p, out = self.session.project, self._exports()
            paths = [p.export_mask(sid, out / f"{sid}.ome.tif", format="ome-tiff"),
                     p.export_mask(sid, out / f"{sid}.png", format="png")]
        except Exception as exc:  # noqa: BLE001
            self._fail(f"Exporting the masks of {sid}", exc)
            return []
        return self._done_export([Path(x) for x in paths])

    def _map_layer(self) -> Any:
        layer = self._layer("attention", self._slide_id())
        if layer is None:
            notify("No attention map of this slide yet: train, or choose a run.", "info")
        return layer

    def export_heatmap(self) -> list[Path]:
        """The shown attention map as a heatmap TIFF that napari (and wsimil) reopen aligned."""
        layer = self._map_layer()
        if layer is None:
            return []
        from ..infer.heatmap import write_heatmap

        info, sid = layer.metadata["wsimil"], self._slide_id()
        try:
            path = write_heatmap(self._exports() / f"{sid}_attention.tif", np.asarray(layer.data),
                                 info.get("slide_mpp"), info["downsample"],
                                 extra={"slide_id": sid, "run": info.get("run"), "epoch": info.get("epoch")})
        except Exception as exc:  # noqa: BLE001
            self._fail(f"Exporting the heatmap of {sid}", exc)
            return []
        return self._done_export([Path(path)])

    def export_geojson(self) -> list[Path]:
        """Outlines of the map above the threshold as QuPath GeoJSON (tumour-class polygons, level-0 px)."""
        layer = self._map_layer()
        if layer is None:
            return []
        from ..infer.heatmap import threshold_polygons
        from ..project.annotations import Annotation, write_geojson

        info, sid, p = layer.metadata["wsimil"], self._slide_id(), self.session.project
        try:
            cls = "tumour"
            try:
                cls = p.class_by_id(self._api.class_ids()[0]).name
            except WsimilError:
                pass
            colors = {c.name: c.color for c in p.classes}
            colors.setdefault(cls, "#e6194b")
            polys = threshold_polygons(np.asarray(layer.data), info["downsample"], self.threshold.value(),
                                        bounds=self.session.slide.dimensions)
            label = f"attention > {self.threshold.value():g}"
            anns = [Annotation(g, cls, "polygon", name=label) for g in polys]
            path = write_geojson(self._exports() / f"{sid}_attention.geojson", anns, colors)
        except Exception as exc:  # noqa: BLE001
            self._fail(f"Exporting the outlines of {sid}", exc)
            return []
        return self._done_export([Path(path)])

    # --- background tasks and errors -------------------------------------------------------------
    def _task(self, what: str, func: Callable[[], Any], done: Callable[[Any], Any]) -> Any:
        """Run ``func`` in a worker; ``done(result)`` on the main thread, or a notification if it failed."""
        from napari.qt.threading import create_worker

        def run() -> Any:
            try:
                return func()
            except Exception as exc:  # noqa: BLE001 - handed to the main thread as a value
                return _Failure(exc)

        def returned(result: Any) -> None:
            if isinstance(result, _Failure):
                self._fail(what, result.exc)
            else:
                try:
                    done(result)
                except Exception as exc:  # noqa: BLE001
                    self._fail(what, exc)

        worker = create_worker(run)
        worker.returned.connect(returned)
        worker.finished.connect(lambda: self._task_finished(worker))
        self._tasks.add(worker)
        self.status.setText(f"{what}…")
        worker.start()
        return worker

    def _task_finished(self, worker: Any) -> None:
        self._tasks.discard(worker)
        if not self.training and self.status.text().endswith("…"):
            self.status.setText("")
        self._update_buttons()

    def _fail(self, what: str, exc: BaseException) -> None:
        """A readable notification for the user, the traceback for the log."""
        log.error("%s failed", what, exc_info=(type(exc), exc, exc.__traceback__))
        notify(f"{what} failed: {_message(exc)}")
