"""Dock widget: create/open a labelling project, add slides, pick the slide to label.

Choosing a slide swaps its layers in: the slide image, its pixel labels (editable, at the project's
label resolution, overlaying the slide in µm) and its boxes. Edits save themselves (see _common).
A slide opened through File > Open or drag and drop while a project is open joins the project.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..errors import WsimilError
from ..slide.formats import dialog_filter
from ._common import notify, session_for
from .tasks import TaskRunner

if TYPE_CHECKING:  # pragma: no cover
    import napari

SLIDE_FILTER = dialog_filter()  # the one list of slide types (slide/formats.py, napari.yaml)
READONLY_TEXT = (
    "Read-only: this project is open in another napari window or process. "
    "You can look, but changes are not saved. Close it there and reopen it here to edit."
)
COLUMNS = ("Slide", "Label", "Split", "File")


class ProjectWidget(QWidget):
    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer, self)

        new_btn, open_btn = QPushButton("New project…"), QPushButton("Open project…")
        new_btn.clicked.connect(self._choose_new)
        open_btn.clicked.connect(self._choose_open)
        self.close_btn = QPushButton("Close")
        self.close_btn.clicked.connect(self.close_project)
        self.check_btn = QPushButton("Check")
        self.check_btn.setToolTip("Look for damage (project file, label chunks, annotations, missing slides, "
                                  "half-written files, stale locks) and repair it from the previous good copies.")
        self.check_btn.clicked.connect(self.check)
        self.check_dialog: QMessageBox | None = None
        self.repair_btn: QPushButton | None = None
        self.last_report: Any = None
        top = QHBoxLayout()
        for b in (new_btn, open_btn, self.close_btn, self.check_btn):
            top.addWidget(b)

        self.title = QLabel()
        self.title.setWordWrap(True)
        self.banner = QLabel(READONLY_TEXT)
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet("background:#8a1c1c; color:white; padding:6px; font-weight:bold;")
        self.banner.hide()

        self.add_btn = QPushButton("Add slides…")
        self.add_btn.clicked.connect(self._choose_slides)
        self.relink_btn = QPushButton("Relink…")
        self.relink_btn.setToolTip("Point a moved slide to its new file.")
        self.relink_btn.clicked.connect(self._choose_relink)
        row = QHBoxLayout()
        row.addWidget(self.add_btn)
        row.addWidget(self.relink_btn)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().hide()
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.itemSelectionChanged.connect(self._on_row)

        self.message = QLabel()
        self.message.setWordWrap(True)
        self.message.setStyleSheet("color:#e0a030;")
        self.status = QLabel()
        self.tasks = TaskRunner(self, status=self.status)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.title)
        layout.addWidget(self.banner)
        layout.addLayout(row)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.message)
        layout.addWidget(self.status)

        s = self.session
        s.project_changed.connect(self._on_project)
        s.slides_changed.connect(self.refresh_table)
        s.slide_changed.connect(self._on_slide)
        s.status.connect(self.status.setText)
        self._on_project()

    def hideEvent(self, event: Any) -> None:  # noqa: N802 - Qt API; closing the dock saves pending edits
        self.session.flush()
        super().hideEvent(event)

    # --- actions (callable from tests and scripts) -----------------------------------------------
    def create_project(self, path: str, **kwargs: Any) -> Any:
        return self._guard(lambda: self.session.create_project(str(path), **kwargs))

    def open_project(self, path: str) -> Any:
        project = self._guard(lambda: self.session.open_project(str(path)))
        if project is not None and project.slides:
            missing = self.session.missing()
            first = next((r.slide_id for r in project.slides if r.slide_id not in missing), None)
            if first is not None:
                self.select_slide(first)
        return project

    def close_project(self) -> None:
        self.session.close_project()

    def add_slides(self, paths: list[str]) -> list[Any]:
        if self.session.project is None:
            self._message("Create or open a project first.")
            return []
        added = self.session.add_slides([str(p) for p in paths])
        if added and self.session.slide_id is None:
            self.select_slide(added[0].slide_id)
        return added

    def select_slide(self, slide_id: str) -> bool:
        ok = self.session.select_slide(slide_id)
        self._select_row(slide_id)
        return ok

    def relink(self, slide_id: str, path: str) -> bool:
        return self.session.relink(slide_id, str(path))

    def check(self) -> None:
        """Check the open project in a worker (it decodes every label chunk), then show the report and offer
        to repair what can be repaired."""
        p = self.session.project
        if p is None:
            self._message("Open a project to check it.")
            return
        from ..project.check import check_project

        self.session.flush()
        root = p.root
        self.tasks.run("Checking the project", lambda: check_project(root), self._show_report)

    def repair(self) -> None:
        """Close the project (saving pending edits), repair it in a worker, reopen it, show what was done.
        Repair needs the write lock, so a project shown read-only because another window has it is refused
        there, with that window named."""
        p = self.session.project
        if p is None:
            return
        from ..project.check import repair_project

        root = str(p.root)
        self.session.close_project()

        def done(report: Any) -> None:
            self.open_project(root)
            self._show_report(report)

        def failed(exc: BaseException) -> None:
            self.open_project(root)
            self._message(str(exc))
            notify(str(exc))

        self.tasks.run("Repairing the project", lambda: repair_project(root), done, failed=failed)

    def _show_report(self, report: Any) -> None:
        self.last_report = report
        box = QMessageBox(self)
        box.setWindowTitle("Project check")
        box.setIcon(QMessageBox.Icon.Information if report.ok else QMessageBox.Icon.Warning)
        box.setText(report.text())
        self.repair_btn = None
        if report.repairable:
            self.repair_btn = box.addButton(f"Repair {len(report.repairable)}", QMessageBox.ButtonRole.AcceptRole)
            self.repair_btn.clicked.connect(self.repair)
        box.addButton(QMessageBox.StandardButton.Close)
        box.setModal(False)
        box.show()
        self.check_dialog = box
        self._message("No damage found." if report.ok else
                      f"{len(report.damage)} problem(s) found; see the check report.")

    def _guard(self, func: Any) -> Any:
        try:
            return func()
        except WsimilError as exc:
            self._message(str(exc))
            notify(str(exc))
            return None

    # --- dialogs ---------------------------------------------------------------------------------
    def _choose_new(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "New project: choose an empty folder")
        if path:
            self.create_project(path)

    def _choose_open(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open project folder")
        if path:
            self.open_project(path)

    def _choose_slides(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Add slides to the project", "", SLIDE_FILTER)
        if paths:
            self.add_slides(paths)

    def _choose_relink(self) -> None:
        slide_id = self.session.slide_id
        if slide_id is None:
            return
        old = self.session.project.slide_path(slide_id)
        path, _ = QFileDialog.getOpenFileName(self, f"New location of {slide_id} ({old})", "", SLIDE_FILTER)
        if path:
            self.relink(slide_id, path)

    # --- view ------------------------------------------------------------------------------------
    def _message(self, text: str) -> None:
        self.message.setText(text)

    def _on_project(self) -> None:
        p = self.session.project
        self.title.setText(f"<b>{p.name}</b><br>{p.root}" if p else "No project open.")
        damage = list(getattr(p, "damage", []) or []) if p else []
        self.banner.setVisible(bool(p and (p.readonly or damage)))
        owner = getattr(p, "lock_owner", None) if p else None
        if damage:
            self.banner.setText("Damaged: " + " ".join(str(d) for d in damage)
                                + (" Opened read-only." if p.readonly else "") + " Use Check to repair.")
        else:
            self.banner.setText(READONLY_TEXT + (f" (held by {owner})" if owner else ""))
        self.close_btn.setEnabled(p is not None)
        self.check_btn.setEnabled(p is not None)
        self.add_btn.setEnabled(bool(p and not p.readonly))
        self.status.setText("")
        self._message("")
        self.refresh_table()

    def refresh_table(self) -> None:
        p = self.session.project
        records = list(p.slides) if p else []
        missing = self.session.missing()
        self.table.blockSignals(True)
        self.table.setRowCount(len(records))
        for i, rec in enumerate(records):
            state = "missing" if rec.slide_id in missing else "ok"
            cells = (rec.slide_id, rec.label or "", rec.split or "", state)
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setData(Qt.ItemDataRole.UserRole, rec.slide_id)
                item.setToolTip(str(p.slide_path(rec.slide_id)))
                if rec.slide_id in missing:
                    item.setForeground(QColor("#e05050"))
                self.table.setItem(i, j, item)
        self.table.blockSignals(False)
        self._select_row(self.session.slide_id)
        self._update_relink(missing)

    def _select_row(self, slide_id: str | None) -> None:
        self.table.blockSignals(True)
        self.table.clearSelection()
        for i in range(self.table.rowCount()):
            if self.table.item(i, 0).text() == slide_id:
                self.table.selectRow(i)
        self.table.blockSignals(False)

    def _on_row(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self.select_slide(self.table.item(rows[0].row(), 0).text())

    def _on_slide(self) -> None:
        s = self.session
        missing = s.missing()
        self._update_relink(missing)
        if s.slide_id is not None and s.slide is None and s.slide_id in missing:
            path = s.project.slide_path(s.slide_id)
            self._message(
                f"The file of slide {s.slide_id} was moved or deleted: {path}. "
                "Use Relink… to point to its new location."
            )
        else:
            self._message(s.error or getattr(s.geometry, "note", None) or "")
        self._select_row(s.slide_id)

    def _update_relink(self, missing: set[str]) -> None:
        s = self.session
        self.relink_btn.setEnabled(bool(s.project and not s.readonly and s.slide_id in missing))
