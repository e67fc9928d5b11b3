"""What the Training widget's panels share: the viewer, the project session, the open project's headless
:class:`~napari_wsimil.workflow.session.InteractiveSession`, the one task runner, and the chosen run.

The layers the panels add (``attention <slide>``, ``pseudo-labels <slide>``, ``suggestions <slide>``)
carry ``metadata["wsimil"]["training_widget"]`` and their slide id, so that switching slides hides them
and closing the project removes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ._autosave import notify


class TrainingContext:
    def __init__(self, viewer: Any, session: Any):
        self.viewer = viewer  # the real viewer (not napari's public proxy): layers as the session adds them
        self.session = session  # the ProjectSession shared with the Project and Labelling widgets
        self.api: Any = None  # InteractiveSession of the open project, or None
        self.tasks: Any = None  # the widget's TaskRunner
        self.current_run: Callable[[], str | None] = lambda: None  # the runs list's choice

    def slide_id(self) -> str | None:
        s = self.session
        return s.slide_id if s.slide is not None else None

    def layer(self, kind: str, slide_id: str | None = None) -> Any:
        """The widget's ``<kind> <slide>`` layer of ``slide_id`` (default: the current slide), or None."""
        sid = self.slide_id() if slide_id is None else slide_id
        name = f"{kind} {sid}"
        return self.viewer.layers[name] if sid is not None and name in self.viewer.layers else None

    def layers(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        """(layer, its wsimil metadata) of every layer the Training widget added."""
        for layer in list(self.viewer.layers):
            info = layer.metadata.get("wsimil", {}) if isinstance(layer.metadata, dict) else {}
            if info.get("training_widget"):
                yield layer, info

    def need(self, run: bool = True) -> tuple[str, str] | None:
        """(run, slide) for an action on the current slide, or None after telling the user what is missing."""
        if self.api is None:
            notify("Open a project first.", "info")
            return None
        sid = self.slide_id()
        name = self.current_run()
        if sid is None:
            notify("Choose a slide of the project first.", "info")
            return None
        if run and name is None:
            notify("Choose a run in the runs list first (or train one).", "info")
            return None
        return name or "", sid
