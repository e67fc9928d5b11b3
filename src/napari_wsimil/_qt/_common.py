"""The project session shared by the Project and Labelling dock widgets of one viewer.

It holds the open project and the current slide's three layers (image, pixel labels, boxes); edits
save themselves (see _autosave) shortly after each stroke or shape change, and pending edits are
also written on slide switch, when one of the layers is removed, when the window closes and when the
project is closed. Errors reach the user as napari notifications. All computation is in the
library (project, project_layers).
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from qtpy.QtCore import QObject, QTimer, Signal

from ..errors import WsimilError
from ..project_layers import class_colormap, class_table, edge_colors, project_slide_layers
from ._autosave import Autosave, notify

_SESSIONS: dict[int, tuple[Any, ProjectSession]] = {}


def _menu_bar(viewer: Any) -> Any:
    return getattr(getattr(viewer, "window", None), "main_menu", None)


def real_viewer(viewer: Any) -> Any:
    """The napari viewer behind the one napari hands a dock widget (a public-only proxy, new per widget).

    Public API only: ``napari.current_viewer()`` is the viewer whose window is active, which is the one
    adding the widget; it is taken when its window's menu bar (``Window.main_menu``, a Qt object that the
    proxy hands out as is) is the proxy's. Otherwise the viewer given is kept.
    """
    try:
        import napari
    except ImportError:  # pragma: no cover - the widgets need napari
        return viewer
    current = napari.current_viewer()
    if current is None or current is viewer:
        return viewer
    bar = _menu_bar(viewer)
    return current if bar is not None and _menu_bar(current) is bar else viewer


def session_for(viewer: Any, widget: QObject | None = None) -> ProjectSession:
    """One session per viewer, shared by every widget docked in it (``widget`` registers one).

    napari hands plugin widgets a public-only proxy of the viewer, a new one per widget: the session
    works on the viewer behind it (:func:`real_viewer`), so that both widgets share it and the layers
    it adds are plain layers (events name them as their source).
    """
    viewer = real_viewer(viewer)
    for key in [k for k, (ref, _) in _SESSIONS.items() if ref() is None]:
        del _SESSIONS[key]
    entry = _SESSIONS.get(id(viewer))
    if entry is None or entry[0]() is not viewer:
        entry = (weakref.ref(viewer), ProjectSession(viewer))
        _SESSIONS[id(viewer)] = entry
    if widget is not None:
        entry[1].register(widget)
    return entry[1]


def find_session(viewer: Any) -> ProjectSession | None:
    """The session of ``viewer`` if a widget made one (None: no project widget is docked there)."""
    viewer = real_viewer(viewer)
    entry = _SESSIONS.get(id(viewer))
    return entry[1] if entry is not None and entry[0]() is viewer else None


class ProjectSession(QObject):
    project_changed = Signal()
    slide_changed = Signal()
    slides_changed = Signal()
    classes_changed = Signal()
    paint_class_changed = Signal()

    def __init__(self, viewer: Any):
        super().__init__()
        self._viewer = weakref.ref(viewer)  # the viewer owns the widgets; nothing here keeps it alive
        self.project: Any = None
        self.slide_id: str | None = None
        self.slide: Any = None
        self.geometry: Any = None
        self.error: str | None = None  # why the chosen slide could not be opened
        self.image_layer: Any = None
        self.labels_layer: Any = None
        self.shapes_layer: Any = None
        self.paint_class = 1
        self._loading = False
        self.autosave = Autosave(self)
        self.status = self.autosave.status
        viewer.layers.events.inserted.connect(self._on_inserted)
        viewer.layers.events.removing.connect(self._on_removing)
        self._widgets = 0

    @property
    def viewer(self) -> Any:
        return self._viewer()

    @property
    def readonly(self) -> bool:
        return bool(self.project is not None and self.project.readonly)

    @property
    def pending(self) -> bool:
        return self.autosave.pending

    def flush(self) -> bool:
        return self.autosave.flush()

    def undo(self) -> None:
        self.autosave.undo()

    # --- project ---------------------------------------------------------------------------------
    def create_project(self, path: str, **kwargs: Any) -> Any:
        from ..project import Project

        self.close_project()
        self.project = Project.create(path, **kwargs)
        self._default_paint_class()
        self.project_changed.emit()
        return self.project

    def open_project(self, path: str) -> Any:
        from ..project import Project

        self.close_project()
        self.project = Project.open(path)
        if getattr(self.project, "damage", None):
            notify(f"Project {self.project.name} is damaged ({'; '.join(d.kind for d in self.project.damage)})"
                   + (": it is shown read-only" if self.project.readonly else "")
                   + ". Use Check in the project widget to repair it.", "warning")
        elif self.project.readonly:
            notify(f"Project {self.project.name} is open elsewhere: it is shown read-only.", "warning")
        self._default_paint_class()
        self.project_changed.emit()
        return self.project

    def _default_paint_class(self) -> None:
        ids = [c.id for c in self.project.classes if c.id != 0]
        if self.paint_class not in ids:
            self.paint_class = ids[0] if ids else 0

    def close_project(self) -> None:
        if self.project is None:
            return
        self.flush()
        self._drop_layers()
        self.slide_id = self.slide = self.geometry = self.error = None
        project, self.project = self.project, None
        project.close()
        self.project_changed.emit()
        self.slide_changed.emit()

    def add_slides(self, paths: list[str]) -> list[Any]:
        added = []
        for path in paths:
            try:
                added.append(self.project.add_slide(str(path)))
            except WsimilError as exc:
                notify(str(exc))
        if added:
            self.slides_changed.emit()
        return added

    def missing(self) -> set[str]:
        return {getattr(s, "slide_id", s) for s in self.project.missing_slides()} if self.project else set()

    def relink(self, slide_id: str, path: str) -> bool:
        try:
            self.project.relink(slide_id, str(path))
        except WsimilError as exc:
            notify(str(exc))
            return False
        self.slides_changed.emit()
        if slide_id == self.slide_id:
            self.slide_id = None
        return self.select_slide(slide_id)

    # --- current slide ---------------------------------------------------------------------------
    def select_slide(self, slide_id: str) -> bool:
        """Swap the slide's layers in (saving and removing the previous ones). False if it cannot open."""
        if slide_id == self.slide_id and self.labels_layer is not None:
            return True
        self.flush()
        self._drop_layers()
        self.slide_id, self.slide, self.geometry, self.error = slide_id, None, None, None
        try:
            slide = self.project.open_slide(slide_id)
            try:
                self.geometry = self.project.label_geometry(slide_id)
                annotations = self.project.annotations(slide_id)
                layer_data = project_slide_layers(self.project, slide_id, slide, annotations)
            except BaseException:
                slide.close()
                raise
        except WsimilError as exc:
            self.geometry, self.error = None, str(exc)
            self.slide_changed.emit()
            notify(str(exc))
            return False
        self.slide = slide
        self._loading = True
        try:
            added = [getattr(self.viewer, f"add_{kind}")(data, **kw) for data, kw, kind in layer_data]
        finally:
            self._loading = False
        self.image_layer, self.labels_layer, self.shapes_layer = added
        self._wire_layers(annotations)
        self.viewer.reset_view()
        self.viewer.layers.selection.active = self.labels_layer
        self.slide_changed.emit()
        return True

    def _wire_layers(self, annotations: list[Any]) -> None:
        labels, shapes, editable = self.labels_layer, self.shapes_layer, not self.readonly
        labels.editable = editable
        shapes.editable = editable
        if len(shapes.edge_width):
            shapes.current_edge_width = shapes.edge_width[0]
        self.autosave.attach(self.project, self.slide_id, self.slide, labels, shapes, annotations)
        self.set_paint_class(self.paint_class)
        labels.events.selected_label.connect(self._on_selected_label)

    def _on_selected_label(self, event: Any) -> None:
        """A class picked in napari's own layer controls becomes the class of new boxes too."""
        value = int(event.source.selected_label)
        if event.source is not self.labels_layer or value in (0, self.paint_class):
            return
        if self.class_name(value):
            self.set_paint_class(value)
            self.paint_class_changed.emit()

    def _drop_layers(self) -> None:
        self.autosave.detach()
        layers = [self.image_layer, self.labels_layer, self.shapes_layer]
        self.image_layer = self.labels_layer = self.shapes_layer = None
        viewer = self.viewer
        self._loading = True
        try:
            for layer in layers:
                if viewer is not None and layer is not None and layer in viewer.layers:
                    viewer.layers.remove(layer)
        finally:
            self._loading = False
        if self.slide is not None:
            self.slide.close()  # its layer is gone; the file handle goes with it

    def class_name(self, class_id: int) -> str | None:
        classes = self.project.classes if self.project else []
        return next((c.name for c in classes if c.id == class_id), None)

    def set_paint_class(self, class_id: int) -> None:
        self.paint_class = int(class_id)
        if self.labels_layer is not None:
            self.labels_layer.selected_label = self.paint_class
        name = self.class_name(self.paint_class)
        if self.shapes_layer is not None and name is not None:
            self.shapes_layer.feature_defaults = {"class": name, "id": None}
            self.shapes_layer.current_edge_color = edge_colors([name], self.project.classes)[0]

    def refresh_colors(self) -> None:
        for layer in (self.labels_layer, self.shapes_layer):  # what the writers save as the class table
            if layer is not None and isinstance(layer.metadata.get("wsimil"), dict):
                layer.metadata["wsimil"]["classes"] = class_table(self.project.classes)
        if self.labels_layer is not None:
            self.labels_layer.colormap = class_colormap(self.project.classes)
        self.autosave.recolor()
        self.set_paint_class(self.paint_class)

    # --- viewer events ---------------------------------------------------------------------------
    def _on_removing(self, event: Any) -> None:
        layer = self.viewer.layers[event.index]
        if layer is self.labels_layer:
            self.autosave.save_labels()
            self.labels_layer = self.autosave.labels = None
        elif layer is self.shapes_layer:
            self.autosave.save_shapes()
            self.shapes_layer = self.autosave.shapes = None
        elif layer is self.image_layer:
            self.image_layer = None

    def _on_inserted(self, event: Any) -> None:
        """A slide opened through the reader (File > Open, drag and drop) while a project is open."""
        layer = event.value
        meta = getattr(layer, "metadata", None) or {}
        info = meta.get("wsimil", {})
        if self._loading or self.project is None or self.readonly or info.get("kind") != "slide":
            return
        if info.get("project_slide"):
            return
        QTimer.singleShot(0, lambda: self._adopt(layer, info["path"]))

    def _adopt(self, layer: Any, path: str) -> None:
        known = {str(self.project.slide_path(r.slide_id).resolve()): r.slide_id for r in self.project.slides}
        slide_id = known.get(str(Path(path).resolve()))
        if slide_id is None:
            added = self.add_slides([path])
            if not added:
                return
            slide_id = added[0].slide_id
            notify(f"Added {Path(path).name} to project {self.project.name}.", "info")
        if layer in self.viewer.layers:
            self._loading = True
            try:
                self.viewer.layers.remove(layer)
            finally:
                self._loading = False
            dropped = layer.metadata.get("slide")
            if dropped is not None:
                dropped.close()
        self.select_slide(slide_id)

    # --- lifetime: the project stays open while one of its widgets lives ------------------------
    def register(self, widget: QObject) -> None:
        self._widgets += 1
        widget.destroyed.connect(self._widget_destroyed)

    def _widget_destroyed(self, *_: Any) -> None:
        """The viewer window closed (or every project widget was closed): save, release the project."""
        self._widgets -= 1
        if self._widgets > 0:
            return
        self.close_project()
        for key in [k for k, (_, session) in _SESSIONS.items() if session is self]:
            del _SESSIONS[key]
