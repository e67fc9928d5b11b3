"""Dock widget: train a MIL or segmentation model on the project, watch its map, correct, retrain, export.

A thin view over :class:`~napari_wsimil.workflow.session.InteractiveSession`, composed of one-file panels that
share a :class:`~.training_context.TrainingContext` and one :class:`~.tasks.TaskRunner`:

- :class:`~.method_form.MethodForm`: the method, its encoder row and generated settings, the run's name;
- :class:`~.run_control.RunControl`: Start, Pause, Cancel, Resume run, progress, status and the loss plot
  (training runs in a child process, paused with SIGSTOP);
- :class:`~.runs_panel.RunsPanel`: the project's runs and the ``attention <slide>`` layer;
- :class:`~.corrections_panel.CorrectionsPanel`: pseudo-labels, "Retrain with corrections", suggestions;
- :class:`~.exports_panel.ExportsPanel`: masks, heatmap and GeoJSON into ``PROJECT/exports``.

This class only connects the project session's and the panels' events to the controls. Every slow step
runs in a worker, so the window never freezes; every failure becomes a notification with a readable
message, its traceback goes to the log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import QGroupBox, QVBoxLayout, QWidget

from ._autosave import notify
from ._common import real_viewer, session_for
from .corrections_panel import CorrectionsPanel
from .exports_panel import ExportsPanel
from .method_form import MethodForm
from .run_control import RunControl
from .runs_panel import RunsPanel
from .tasks import TaskRunner, report_failure
from .training_context import TrainingContext

if TYPE_CHECKING:  # pragma: no cover
    import napari


class TrainingWidget(QWidget):
    """Train, watch the map as it learns, correct pseudo-labels and retrain, export."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = real_viewer(napari_viewer)  # real layers, as the session adds
        self.session = session_for(napari_viewer, self)
        ctx = self.ctx = TrainingContext(self.viewer, self.session)
        self.form = MethodForm(ctx)
        self.run_control = RunControl(ctx)
        ctx.tasks = self.tasks = TaskRunner(self, status=self.run_control.status)
        self.runs_panel = RunsPanel(ctx)
        self.corrections = CorrectionsPanel(ctx, self.train, lambda: (self.form.epochs.value(),
                                                                        self.form.device.currentText()))
        self.exports = ExportsPanel(ctx, self.runs_panel.threshold.value)
        request = QGroupBox("Training")
        box = QVBoxLayout(request)
        box.addWidget(self.form)
        box.addWidget(self.run_control)
        layout = QVBoxLayout(self)
        for panel in (request, self.runs_panel, self.corrections, self.exports):
            layout.addWidget(panel)
        layout.addStretch(1)

        # the controls and actions scripts and tests use, under the names they had before the split
        for panel, names in ((self.form, "method encoder_picker settings epochs device mpp patch run_name "
                                         "set_option config"),
                             (self.run_control, "start_btn pause_btn cancel_btn resume_btn progress status "
                                                "loss_plot cancel toggle_pause"),
                             (self.runs_panel, "runs_list run_info opacity threshold current_run load_map "
                                               "show_map"),
                             (self.corrections, "pseudo_btn retrain_btn suggest_btn n_suggest "
                                                "suggestion_list show_pseudo_labels retrain suggest"),
                             (self.exports, "export_masks_btn export_heatmap_btn export_geojson_btn "
                                            "export_masks export_heatmap export_geojson")):
            for name in names.split():
                setattr(self, name, getattr(panel, name))

        rc, rp = self.run_control, self.runs_panel
        rc.start_btn.clicked.connect(self.start)
        rc.resume_btn.clicked.connect(self.resume_run)
        rc.map_ready.connect(self.show_map)
        rc.run_finished.connect(self._on_run_finished)
        rp.run_chosen.connect(self._on_run_chosen)
        rp.map_shown.connect(self._update_buttons)
        self.tasks.changed.connect(self._update_buttons)
        self.session.project_changed.connect(self._on_project)
        self.session.slide_changed.connect(self._on_slide)
        self._on_project()

    # --- state -----------------------------------------------------------------------------------
    @property
    def api(self) -> Any:
        """The headless session of the open project (None when no project is open)."""
        return self.ctx.api

    @property
    def options(self) -> dict[str, QWidget]:
        return self.form.options

    @property
    def worker(self) -> Any:
        """The training worker while a run trains."""
        return self.run_control.worker

    @property
    def training(self) -> bool:
        return self.run_control.training

    @property
    def busy(self) -> bool:
        """Training or computing something in the background (tests wait for this to clear)."""
        return self.tasks.busy

    @property
    def exported(self) -> list[Any]:
        return self.exports.exported

    @property
    def last_corrections(self) -> int | None:
        return self.corrections.last_corrections

    @property
    def suggested(self) -> Any:
        return self.corrections.suggested

    def refresh_runs(self, select: str | None = None) -> None:
        self.runs_panel.refresh(select)
        self._update_buttons()

    # --- the project session's events ------------------------------------------------------------
    def _on_project(self) -> None:
        self.run_control.quit()  # it trains the project that was just closed
        if self.ctx.api is not None:
            for layer, _ in self.ctx.layers():
                self.viewer.layers.remove(layer)
        self.corrections.forget()
        self.ctx.api = None
        p = self.session.project
        imported: list[Any] = []
        if p is not None:
            from ..features.interop import imported_sets
            from ..workflow.session import InteractiveSession

            self.ctx.api = InteractiveSession(p)
            try:
                imported = imported_sets(p.root)  # the project's imported:NAME feature sets
            except OSError as exc:  # an unreadable features folder must not stop the project from opening
                report_failure("Imported feature sets", exc)
        # encoders registered since, and this project's imported sets (the choice itself is kept)
        self.encoder_picker.set_imported(imported)
        self.refresh_runs()
        self.form.default_name(force=True)
        self._on_slide()

    def _on_slide(self) -> None:
        """Overlays of another slide are hidden (not deleted: pseudo-label edits may be pending)."""
        sid = self.ctx.slide_id()
        for layer, info in self.ctx.layers():
            layer.visible = info.get("slide_id") == sid
        self.corrections.show_rows(self.ctx.layer("suggestions", sid))
        self._update_buttons()

    def _update_buttons(self) -> None:
        has_p = self.ctx.api is not None
        writable = has_p and not self.session.readonly
        has_run, has_slide = self.current_run() is not None, self.ctx.slide_id() is not None
        self.run_control.update_buttons(writable, has_run)
        self.corrections.update_buttons(writable, has_run, has_slide, self.training)
        self.exports.update_buttons(has_p, has_slide, self.ctx.layer("attention") is not None)

    # --- the panels' events ----------------------------------------------------------------------
    def _on_run_chosen(self, name: str | None) -> None:
        self._update_buttons()
        self.run_control.show_history(name)  # its saved losses per epoch (unless a run trains)
        self.load_map()

    def _on_run_finished(self, name: str) -> None:
        self.refresh_runs(select=name)
        self.form.default_name()
        self._update_buttons()

    # --- training --------------------------------------------------------------------------------
    def start(self) -> Any:
        """Start a new run from the form; returns the worker (None when nothing started)."""
        if self.ctx.api is None:
            notify("Open a project first.", "info")
            return None
        try:
            spec = self.form.spec()
        except Exception as exc:  # noqa: BLE001
            report_failure("Training", exc)
            return None
        return None if spec is None else self.train(spec)

    def resume_run(self) -> Any:
        """Continue the chosen run from its last checkpoint (a finished one for ``epochs`` more)."""
        name, api = self.current_run(), self.ctx.api
        if api is None or name is None:
            notify("Choose a run in the runs list first.", "info")
            return None
        summary = next((r for r in api.runs() if r.name == name), None)
        extra = self.epochs.value() if summary is not None and summary.finished else 0
        try:
            spec = api.resume_spec(name, extra, self.device.currentText())
        except Exception as exc:  # noqa: BLE001
            report_failure(f"Resuming {name}", exc)
            return None
        return self.train(spec)

    def train(self, spec: Any) -> Any:
        """Train ``spec`` (an ``InteractiveSession`` spec) watching the current slide; returns the worker."""
        worker = self.run_control.train(spec)
        self._update_buttons()
        return worker
