"""The Federation dock widget: this site joins a federation with its open project.

The site runs as its own process (``wsimil federate site PROJECT``: Flower's SuperNode and the app processes
it starts), so training rounds never block the window and leaving stops them all. The panel only starts and
stops that process and shows the site's own record of its rounds (``PROJECT/federated/rounds.jsonl``: round,
local loss, validation AUC of the global model, privacy spent), read every second.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (QCheckBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QTableWidget,
                            QTableWidgetItem, QVBoxLayout, QWidget)

from ..federated.launch import SITE_HISTORY, start, stop
from ._autosave import notify
from ._common import session_for

COLUMNS = ("round", "kind", "train_loss", "global_val_auc", "dp_epsilon")


class FederationPanel(QWidget):
    """Join / leave a federation with the open project; the site's rounds as they come."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session_for(napari_viewer, self)
        self.proc: Any = None
        self.server = QLineEdit()
        self.server.setPlaceholderText("host:9092")
        self.root_cert = QLineEdit()
        self.root_cert.setPlaceholderText("ca.pem from the federation")
        self.key = QLineEdit()
        self.key.setPlaceholderText("this site's .key")
        self.name = QLineEdit()
        self.name.setPlaceholderText("(the project's name)")
        self.insecure = QCheckBox("no TLS (only for a server on this machine or a test network)")
        form = QFormLayout()
        form.addRow("Server", self.server)
        form.addRow("CA certificate", self.root_cert)
        form.addRow("Site key", self.key)
        form.addRow("Site name", self.name)
        form.addRow(self.insecure)
        self.join_btn = QPushButton("Join")
        self.join_btn.setToolTip("Start this site: it trains on the project's slides when the server asks and sends "
                                 "back only weights and a few numbers.")
        self.join_btn.clicked.connect(self.join)
        self.leave_btn = QPushButton("Leave")
        self.leave_btn.clicked.connect(self.leave)
        buttons = QHBoxLayout()
        buttons.addWidget(self.join_btn)
        buttons.addWidget(self.leave_btn)
        self.status = QLabel("not joined")
        self.status.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(["round", "message", "local loss", "global val AUC", "ε spent"])
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.table)
        self.timer = QTimer(self)
        self.timer.setInterval(1000)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()
        self.session.project_changed.connect(self.refresh)
        self.refresh()

    # ------------------------------------------------------------------------------------------ state
    @property
    def workdir(self) -> Path | None:
        project = self.session.project
        return None if project is None else Path(project.root) / "federated"

    def command(self) -> list[str]:
        """The ``wsimil federate site`` command line for the form's values (a ValueError says what is missing)."""
        project = self.session.project
        if project is None:
            raise ValueError("open a project first: the site trains on the open project's slides")
        server = self.server.text().strip()
        if not server:
            raise ValueError("give the server's address (host:port)")
        cmd = [sys.executable, "-m", "napari_wsimil.cli", "federate", "site", str(project.root), "--server", server,
               "--workdir", str(self.workdir)]
        if self.name.text().strip():
            cmd += ["--name", self.name.text().strip()]
        if self.insecure.isChecked():
            cmd.append("--insecure")
        elif self.root_cert.text().strip() and self.key.text().strip():
            cmd += ["--root-cert", self.root_cert.text().strip(), "--key", self.key.text().strip()]
        else:
            raise ValueError("give the federation's CA certificate and this site's key (or tick 'no TLS' for a "
                             "test server)")
        return cmd

    def join(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        try:
            cmd = self.command()
        except ValueError as exc:
            notify(str(exc), "warning")
            return
        assert self.workdir is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        src = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.proc = start(cmd, env, self.workdir / "panel.log")
        self.refresh()

    def leave(self) -> None:
        if self.proc is not None:
            stop(self.proc, grace=15)
        self.refresh()

    def rounds(self) -> list[dict[str, Any]]:
        path = None if self.workdir is None else self.workdir / SITE_HISTORY
        if path is None or not path.is_file():
            return []
        out = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line being written
                continue
        return out

    def refresh(self) -> None:
        running = self.proc is not None and self.proc.poll() is None
        self.join_btn.setEnabled(self.session.project is not None and not running)
        self.leave_btn.setEnabled(running)
        rows = self.rounds()
        if running:
            self.status.setText(f"joined: {len(rows)} message(s) answered")
        elif self.proc is not None:
            self.status.setText(f"left (exit {self.proc.returncode}); log: {self.workdir / 'panel.log'}")
        else:
            self.status.setText("not joined" if self.session.project is not None else "open a project to join")
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            for j, key in enumerate(COLUMNS):
                v = r.get(key, "")
                self.table.setItem(i, j, QTableWidgetItem(f"{v:.4g}" if isinstance(v, float) else str(v)))

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        self.timer.stop()
        self.leave()
        super().closeEvent(event)


__all__ = ["FederationPanel"]
