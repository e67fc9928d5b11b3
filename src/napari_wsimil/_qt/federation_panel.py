"""The Federation dock widget: this site joins a federation with its open project.

The site runs as its own process (``wsimil federate site PROJECT``: Flower's SuperNode and the app processes
it starts), so training rounds never block the window and leaving stops them all. The panel only starts and
stops that process and shows the site's own record of its rounds (``PROJECT/federated/rounds.jsonl``: round,
local loss, validation AUC of the global model, privacy spent), read every second.

It also shows the global model's map of the slide open in the viewer (HistoFL: attention; FedMix: tumour
probability), computed here in a worker thread from the global model the site last received
(``PROJECT/federated/global``, :mod:`napari_wsimil.federated.site_model`) or from any federated run folder
named in the form: on the button, or after each new round when "after each round" is ticked.
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
from ..federated.site_model import GLOBAL_DIR, global_map, global_round
from ..layers import attention_layer_data
from ._autosave import notify
from ._common import session_for
from .tasks import TaskRunner

COLUMNS = ("round", "kind", "train_loss", "global_val_auc", "dp_epsilon")
#: the same columns under FedMix's names (its local loss; the global model's validation: slide AUC, or the
#: AUC an evaluate message reports); HistoFL's name wins when both are there
ALIASES = {"train_loss": ("loss",), "global_val_auc": ("global_val_slide_auc", "val_slide_auc", "val_auc")}


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
        self.global_path = QLineEdit()
        self.global_path.setPlaceholderText("(the global model this site last received)")
        self.global_path.setToolTip("A run folder with a federated model; empty: PROJECT/federated/global, the "
                                    "global model as this site last received it.")
        self.map_btn = QPushButton("Show the global model's map")
        self.map_btn.setToolTip("Map the slide open in the viewer with the global model, on this computer: the "
                                "map never leaves the site.")
        self.map_btn.clicked.connect(self.show_global_map)
        self.auto_map = QCheckBox("after each round")
        self.map_status = QLabel("")
        self.map_status.setWordWrap(True)
        self.tasks = TaskRunner(self, self.map_status)
        self._mapped: tuple[str, int] | None = None  # (slide, round) of the map last asked for automatically
        maps = QHBoxLayout()
        maps.addWidget(self.map_btn)
        maps.addWidget(self.auto_map)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(["round", "message", "local loss", "global val AUC", "ε spent"])
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.table)
        form2 = QFormLayout()
        form2.addRow("Global model", self.global_path)
        layout.addLayout(form2)
        layout.addLayout(maps)
        layout.addWidget(self.map_status)
        self.timer = QTimer(self)
        self.timer.setInterval(1000)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()
        self.session.project_changed.connect(self.refresh)
        self.session.slide_changed.connect(self.refresh)
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
                v = next((r[k] for k in (key, *ALIASES.get(key, ())) if k in r), "")
                self.table.setItem(i, j, QTableWidgetItem(f"{v:.4g}" if isinstance(v, float) else str(v)))
        self.map_btn.setEnabled(self.session.slide is not None)
        self._auto_map()

    # ------------------------------------------------------------------------------ the global model's map
    def model_dir(self) -> Path | None:
        """Where the global model is: the form's run folder, else the site's last received one."""
        text = self.global_path.text().strip()
        if text:
            return Path(text).expanduser()
        return None if self.workdir is None else self.workdir / GLOBAL_DIR

    def show_global_map(self) -> Any:
        """Compute the global model's map of the open slide in a worker; the layer appears when it is done."""
        s = self.session
        run = self.model_dir()
        if s.project is None or s.slide_id is None or run is None:
            notify("open a project and a slide first: the map is of the slide open in the viewer", "warning")
            return None
        sid, root, rnd = s.slide_id, Path(s.project.root), global_round(run)
        self._mapped = (sid, rnd) if rnd is not None else self._mapped
        return self.tasks.run(f"Global model's map of {sid}", lambda: global_map(run, sid, root),
                              lambda ev: self.show_map(ev, run, rnd))

    def show_map(self, ev: Any, run: Path | None = None, server_round: int | None = None) -> Any:
        """Put a map (:class:`~napari_wsimil.train.events.MapEvent`) of the open slide into its layer, aligned
        with the slide (the layer helpers' µm scale)."""
        s, viewer = self.session, self.session.viewer
        if s.slide is None or ev.slide_id != s.slide_id:
            return None  # the user moved on to another slide meanwhile
        name = f"global model {ev.slide_id}"
        data, kw, _ = attention_layer_data(s.slide, ev.heatmap, ev.downsample, name)
        kw["metadata"]["wsimil"].update(federated=True, slide_id=ev.slide_id, run=str(run), round=server_round,
                                        map_kind=ev.kind)
        if name in viewer.layers:
            layer = viewer.layers[name]
            layer.metadata = kw["metadata"]
            layer.scale, layer.translate = kw["scale"], kw["translate"]
            layer.data = data
        else:
            layer = viewer.add_image(data, **kw)
        self.map_status.setText(f"{name}: round {server_round if server_round is not None else '?'} "
                                f"({'tumour probability' if ev.kind == 'probability' else 'attention'})")
        return layer

    def _auto_map(self) -> None:
        """After a new round, the new global model's map of the open slide (when asked for)."""
        if not self.auto_map.isChecked() or self.tasks.busy or self.session.slide_id is None:
            return
        run = self.model_dir()
        rnd = None if run is None else global_round(run)
        if rnd is not None and self._mapped != (self.session.slide_id, rnd):
            self.show_global_map()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        self.timer.stop()
        self.leave()
        super().closeEvent(event)


__all__ = ["FederationPanel"]
