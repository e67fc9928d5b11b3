"""Run control: Start, Pause, Cancel and Resume run, the epoch progress bar, the status line, the loss plot.

Training runs in a child process (:meth:`~napari_wsimil.workflow.session.InteractiveSession.train_process`):
feature extraction and checkpoint maps hold the GIL in C code for 100 ms and more, which would freeze
the window in this process. A worker of the widget's task runner iterates that child's events; on the
main thread each one becomes the progress bar, the status line and the loss plot, and each
:class:`~napari_wsimil.train.events.MapEvent` is handed on (``map_ready``) to the runs panel's layer.

Pause stops the child process itself with SIGSTOP (and Resume continues it with SIGCONT), once the worker
has reached its next yield: the computation stops, not only the delivery of its events. Cancel quits the
worker and terminates the child; checkpoints are written atomically, so 'Resume run' continues from the
last complete epoch.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QFormLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton, QWidget

from ._autosave import notify
from .loss_plot import LossPlot


def _eta(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class RunControl(QWidget):
    """The buttons that start and steer a run, and what shows its progress."""

    map_ready = Signal(object, str)  # a MapEvent of the run being trained, the run's name
    run_finished = Signal(str)  # the run's name (finished, cancelled or failed)

    def __init__(self, ctx: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.ctx = ctx
        self.worker: Any = None  # the training worker while one runs
        self.handle: Any = None  # its child process (SubprocessTraining): pause, resume, close
        self.run_name: str | None = None  # the run being trained
        self._last: dict[str, Any] = {}
        self.start_btn = QPushButton("Start")
        self.pause_btn = QPushButton("Pause")
        self.pause_btn.clicked.connect(self.toggle_pause)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.clicked.connect(self.cancel)
        self.resume_btn = QPushButton("Resume run")
        self.resume_btn.setToolTip("Continue the run chosen below from its last checkpoint.")
        row = QHBoxLayout()
        for b in (self.start_btn, self.pause_btn, self.cancel_btn, self.resume_btn):
            row.addWidget(b)
        self.progress = QProgressBar()
        self.progress.setFormat("epoch %v / %m")
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.loss_plot = LossPlot()
        self.loss_plot.follow(getattr(ctx, "viewer", None))  # napari's light or dark theme, live
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow(row)
        form.addRow(self.progress)
        form.addRow(self.status)
        form.addRow(self.loss_plot)

    @property
    def training(self) -> bool:
        return self.worker is not None

    def update_buttons(self, writable: bool, has_run: bool) -> None:
        self.start_btn.setEnabled(writable and not self.training)
        self.pause_btn.setEnabled(self.training)
        self.cancel_btn.setEnabled(self.training)
        self.resume_btn.setEnabled(writable and has_run and not self.training)

    def show_history(self, name: str | None) -> None:
        """The saved loss per epoch of run ``name`` (nothing while a run trains: the plot is its own)."""
        if self.training:
            return
        api = self.ctx.api
        self.loss_plot.set_values(api.loss_history(name) if api is not None and name else {})

    # --- training --------------------------------------------------------------------------------
    def train(self, spec: Any) -> Any:
        """Train ``spec`` in a child process, watching the current slide; returns the worker."""
        if self.worker is not None:
            notify("A training is already running: pause or cancel it first.", "info")
            return None
        api, sid, tasks = self.ctx.api, self.ctx.slide_id(), self.ctx.tasks
        watch = [sid] if sid is not None else []

        def run() -> Generator[Any, None, Any]:
            handle = None
            try:
                handle = self.handle = api.train_process(spec, watch=watch, report=tasks.report)
                yield from handle
            finally:
                if handle is not None:
                    handle.close()

        self.run_name = name = Path(spec.out).name
        self._last = {"epoch": 0, "total": int(spec.epochs), "aborted": False}
        self.loss_plot.set_values(api.loss_history(name) if spec.resume else {})  # a resumed run goes on
        self.progress.setRange(0, int(spec.epochs))
        self.progress.setValue(0)
        worker = tasks.run_generator(f"Training {name}", run, self._on_event,
                                     failed=lambda _exc: self._last.update(failed=True))
        worker.paused.connect(self._on_paused)
        worker.resumed.connect(lambda: self.status.setText(f"{self.run_name}: resumed."))
        worker.aborted.connect(lambda: self._last.update(aborted=True))
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.status.setText(f"Preparing {name} (features, labels)…")
        self.pause_btn.setText("Pause")
        return worker

    def toggle_pause(self) -> None:
        w = self.worker
        if w is None:
            return
        if w.is_paused or self.pause_btn.text() == "Resume":
            if self.handle is not None:
                self.handle.resume()
            w.resume()
            self.pause_btn.setText("Pause")
        else:
            w.pause()  # the relay pauses at the child's next event; _on_paused then SIGSTOPs the child
            self.pause_btn.setText("Resume")

    def cancel(self) -> None:
        """Stop at the next step; the last checkpoint stays, so 'Resume run' can continue it."""
        if self.worker is not None:
            self._last["aborted"] = True  # the worker may end before it sees the request (the child is gone)
            self.worker.quit()
            if self.handle is not None:
                self.handle.close()  # the child stops now; its last checkpoint is complete (atomic writes)
            self.status.setText(f"Cancelling {self.run_name}…")

    def quit(self) -> None:
        """The project closed: stop training it at the next step."""
        if self.worker is not None:
            self.worker.quit()

    # --- events, on the main thread --------------------------------------------------------------
    def _on_event(self, ev: Any) -> None:
        from ..train.events import MapEvent

        if isinstance(ev, MapEvent):
            self.map_ready.emit(ev, self.run_name)
        else:
            self._on_progress(ev)

    def _on_progress(self, ev: Any) -> None:
        from ..workflow.session import train_loss, val_loss

        last = self._last
        if ev.total_epochs:
            last["total"] = ev.total_epochs
            self.progress.setMaximum(ev.total_epochs)
        if ev.kind == "step":
            last["step_loss"] = train_loss(ev.losses)
        elif ev.kind == "epoch":
            last.update(epoch=ev.epoch, loss=train_loss(ev.losses), val=None)
            if last["loss"] is not None:
                self.loss_plot.add("train", ev.epoch, last["loss"])
            self.progress.setValue(min(ev.epoch, self.progress.maximum()))
        elif ev.kind == "validation":
            last["val"] = val_loss(ev.losses)
            if last["val"] is not None:
                self.loss_plot.add("val", ev.epoch, last["val"])
        self.status.setText(self._status_text(ev))

    def _status_text(self, ev: Any) -> str:
        last = self._last
        if ev.kind == "done":
            return f"{self.run_name}: done after epoch {ev.epoch} ({ev.message})."
        parts = [f"{self.run_name}: epoch {ev.epoch}/{last['total']}"]
        if ev.kind == "step":
            parts[0] += f", step {ev.step}"
            if last.get("step_loss") is not None:
                parts.append(f"loss {last['step_loss']:.4f}")
        elif last.get("loss") is not None:
            parts.append(f"loss {last['loss']:.4f}")
        if ev.kind != "step" and last.get("val") is not None:
            parts.append(f"val {last['val']:.4f}")
        if ev.eta is not None:
            parts.append(f"ETA {_eta(ev.eta)}")
        return " · ".join(parts)

    def _on_paused(self) -> None:
        if self.handle is not None:
            self.handle.pause()  # the computation stops too, not only the delivery of its events
        self.status.setText(f"{self.run_name}: paused after epoch {self._last.get('epoch', 0)}.")

    def _on_finished(self) -> None:
        last, name = self._last, self.run_name
        self.worker = None
        self.handle = None
        self.pause_btn.setText("Pause")
        if last.get("aborted"):
            self.status.setText(f"{name}: cancelled after epoch {last.get('epoch', 0)}; "
                                "'Resume run' continues from its last checkpoint.")
        elif last.get("failed"):
            self.status.setText(f"{name}: failed (see the notification).")
        self.run_finished.emit(name or "")
