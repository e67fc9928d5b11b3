"""The Batch dock widget: feature extraction or prediction over many slides, in this process or on a dask cluster.

It only wires :func:`napari_wsimil.cluster.batch.run_batch` (plain Python, the same tasks as ``wsimil features`` /
``wsimil predict [--cluster]``) to the window: the generator runs in a napari worker thread, each finished slide
advances a determinate ``napari.utils.progress`` bar (slides done / total) in napari's activity dock, the dashboard
address of a cluster is shown, and Cancel stops the batch after the slides running now (finished slides stay
written; starting again skips them).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._common import session_for
from .tasks import TaskRunner

MODES = {"Extract features": "features", "Predict": "predict"}


class BatchPanel(QWidget):
    """Slides (a folder, a cohort CSV or the open project), what to do with them, where, and Start/Cancel."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer, self)
        self.mode = QComboBox()
        self.mode.addItems(list(MODES))
        self.mode.currentIndexChanged.connect(self._refresh)
        self.slides = self._path_edit("a folder of slides, a cohort CSV or a project folder")
        self.run = self._path_edit("a run folder written by training")
        self.out = self._path_edit("bags: default the project's features folder; predictions: a folder")
        self.encoder = QLineEdit("handcrafted")
        self.patch = QSpinBox()
        self.patch.setRange(16, 4096)
        self.patch.setValue(256)
        self.mpp = QDoubleSpinBox()
        self.mpp.setRange(0.05, 64.0)
        self.mpp.setDecimals(3)
        self.mpp.setValue(0.5)
        self.cluster = QLineEdit()
        self.cluster.setPlaceholderText("empty: this process; local:2, tcp://host:8786 or a dask-jobqueue .yaml")
        self.start_btn = QPushButton("Start")
        self.cancel_btn = QPushButton("Cancel")
        self.start_btn.clicked.connect(self.start)
        self.cancel_btn.clicked.connect(self.cancel)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.dashboard = QLabel()
        self.dashboard.setWordWrap(True)
        self.dashboard.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form = QFormLayout()
        form.addRow("Do", self.mode)
        form.addRow("Slides", self._with_browse(self.slides, "dir"))
        form.addRow("Run", self._with_browse(self.run, "dir"))
        form.addRow("Output", self._with_browse(self.out, "dir"))
        form.addRow("Encoder", self.encoder)
        form.addRow("Patch (px)", self.patch)
        form.addRow("µm/px", self.mpp)
        form.addRow("Cluster", self.cluster)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_btn)
        buttons.addWidget(self.cancel_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.dashboard)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.tasks = TaskRunner(self, status=self.status)
        self.tasks.changed.connect(self._refresh)
        self.pbar: Any = None  # the napari progress of the running batch
        self.bar_history: list[tuple[int, int]] = []  # (slides done, total) after each advance of the bar
        self.results: list[dict[str, Any]] | None = None  # None while a batch runs
        self._what = ""
        self._bar_total = self._bar_n = 0
        self._bar_closed = False
        self._syncing = False
        self._cancel: threading.Event | None = None
        self.session.project_changed.connect(self._project_changed)
        self._project_changed()
        self._refresh()

    # --- form ------------------------------------------------------------------------------------
    def _path_edit(self, hint: str) -> QLineEdit:
        edit = QLineEdit()
        edit.setPlaceholderText(hint)
        return edit

    def _with_browse(self, edit: QLineEdit, kind: str) -> QWidget:
        box = QWidget()
        row = QHBoxLayout(box)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(edit)
        btn = QPushButton("…")
        btn.setMaximumWidth(28)
        btn.clicked.connect(lambda: self._browse(edit))
        row.addWidget(btn)
        return box

    def _browse(self, edit: QLineEdit) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a folder", edit.text() or str(Path.home()))
        if path:
            edit.setText(path)

    def _project_changed(self) -> None:
        project = self.session.project
        if project is not None and not self.slides.text():
            self.slides.setText(str(project.root))

    def _refresh(self, *_: Any) -> None:
        predict = MODES[self.mode.currentText()] == "predict"
        for w in (self.run,):
            w.setEnabled(predict)
        for w in (self.encoder, self.patch, self.mpp):
            w.setEnabled(not predict)
        self.start_btn.setEnabled(not self.tasks.busy)
        self.cancel_btn.setEnabled(self.tasks.busy)

    def request(self) -> Any:
        """The :class:`BatchRequest` the form describes (checked: ``WsimilError`` says what is missing)."""
        from ..cluster.batch import BatchRequest, check

        kind = MODES[self.mode.currentText()]
        req = BatchRequest(kind, self.slides.text().strip(), self.out.text().strip() or None,
                           self.cluster.text().strip() or None, encoder=self.encoder.text().strip() or "handcrafted",
                           patch=self.patch.value(), mpp=self.mpp.value(), run=self.run.text().strip() or None)
        check(req)
        return req

    # --- running ---------------------------------------------------------------------------------
    def start(self) -> None:
        from ..cluster.batch import run_batch
        from ..errors import WsimilError

        if self.tasks.busy:
            return
        try:
            req = self.request()
        except WsimilError as exc:
            self.status.setText(str(exc))
            return
        self.results = None
        self.bar_history = []
        self._bar_total = self._bar_n = 0
        self._bar_closed = False
        self.dashboard.setText("")
        self.status.setText("starting…" if not req.cluster else f"connecting to {req.cluster}…")
        self._cancel = cancel = threading.Event()
        self._what = what = "Batch features" if req.kind == "features" else "Batch prediction"
        self.tasks.run_generator(what, lambda: run_batch(req, cancel), self._on_event, self._on_done,
                                 failed=self._on_failed, progress=False)

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
        self.status.setText("cancelling after the slides running now…")

    def _on_event(self, event: Any) -> None:
        if self.results is not None or self._cancel is None:
            return  # the batch has ended (or none runs): a late event must not open a new bar
        if event.message:
            self.dashboard.setText(event.message)
        if event.result is not None:
            r = event.result
            self.status.setText(f"{event.done}/{event.total} slides; {r.get('slide_id')}: {r.get('status')}"
                                + (f" ({r.get('message')})" if r.get("status") == "failed" else ""))
        self._bar_total = max(self._bar_total, event.total)
        self._bar_n = max(self._bar_n, event.done)
        self._sync_bar()

    def _sync_bar(self) -> None:
        """Bring napari's bar to the wanted state (created, advanced to the slides done, closed at the end).

        napari's progress widgets call ``QApplication.processEvents()`` when a bar is added or its value set, so
        the next slide's event, or the end of the batch, can be handled *inside* one of these calls; they only
        record the wanted state and call this again, which returns at once while the outer call is still at work
        and brings the bar up to date afterwards."""
        if self._syncing:
            return
        self._syncing = True
        try:
            while True:
                if self.pbar is None and self._bar_total and not self._bar_closed:
                    from napari.utils import progress

                    self.pbar = progress(total=self._bar_total, desc=self._what)
                elif self.pbar is not None and self._bar_n > self.pbar.n:
                    self.pbar.update(self._bar_n - self.pbar.n)
                    self.bar_history.append((self.pbar.n, self.pbar.total))
                elif self.pbar is not None and self._bar_closed:
                    pbar, self.pbar = self.pbar, None
                    pbar.close()
                else:
                    break
        finally:
            self._syncing = False

    def _on_done(self, results: list[dict[str, Any]]) -> None:
        self.results = results
        counts = {k: sum(r.get("status") == k for r in results) for k in ("done", "skipped", "failed")}
        text = f"{counts['done']} computed, {counts['skipped']} up to date, {counts['failed']} failed"
        if self._cancel is not None and self._cancel.is_set():
            text = f"cancelled: {text}"
        if counts["failed"]:
            first = next(r for r in results if r.get("status") == "failed")
            text += f" (first: {first.get('slide_id')}: {first.get('message')})"
        self.status.setText(text)
        self._bar_n = max(self._bar_n, len(results))
        self._bar_closed = True
        self._sync_bar()

    def _on_failed(self, exc: BaseException) -> None:
        self.results = []
        self._bar_closed = True
        self._sync_bar()


__all__ = ["BatchPanel"]
