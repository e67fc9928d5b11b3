"""The Training widget's request: the method, its encoder row, its generated settings form, epochs, device,
resolution, patch size and run name.

The settings form is generated from the method's config dataclass
(:func:`~napari_wsimil.workflow.session.method_options`): one plain Qt editor per field, chosen by its
declared type, with the field's documentation as its tooltip. Choosing another method rebuilds the form
and sets the method's default resolution; segmentation methods train on pixels and hide the encoder row.
Choosing an imported feature set (``imported:NAME``) sets the patch size and resolution its bags were
imported at: those features cannot be remade at others.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QSpinBox,
    QWidget,
)

from .. import settings
from .._plugin_settings import sync_from_napari
from ..errors import WsimilError
from ._autosave import notify
from .encoder_picker import EncoderPicker
from .tasks import report_failure

DEVICES = settings.DEVICES
TRISTATE = {"auto": None, "on": True, "off": False}


def _type_name(typ: Any) -> str:
    """Config field types arrive as strings (postponed annotations) or types; compare by name."""
    return typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))


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


class MethodForm(QWidget):
    """The form a run is made from; ``spec_kwargs`` gives what ``InteractiveSession.spec`` takes."""

    method_changed = Signal(str)

    def __init__(self, ctx: Any, parent: QWidget | None = None):
        super().__init__(parent)
        from ..workflow.session import method_names

        self.ctx = ctx
        self.options: dict[str, QWidget] = {}
        self.uses_encoder = True  # whether the chosen method's family reads features from a patch encoder
        self._auto_name: str | None = None
        self.method = QComboBox()
        self.method.addItems(method_names())
        self.method.setToolTip("Training method (the registry's methods).")
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
        self.device.setCurrentText(sync_from_napari().default_device)  # Preferences > Plugins > WSI MIL
        self.device.setToolTip("Where the run trains: auto is CUDA, then Apple MPS, then CPU. The default "
                               "is set in Preferences > Plugins.")
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
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("Method", self.method)
        form.addRow(self.encoder_picker)
        form.addRow(self.settings)
        form.addRow("Epochs", self.epochs)
        form.addRow("Device", self.device)
        form.addRow("Patches at", self.mpp)
        form.addRow("Patch size", self.patch)
        form.addRow("Run name", self.run_name)
        self.encoder_picker.changed.connect(self._imported_geometry)
        self.method.currentTextChanged.connect(self._on_method)
        if self.method.findText("clam-sb") >= 0:
            self.method.setCurrentText("clam-sb")
        self._on_method(self.method.currentText())

    # --- the settings form -----------------------------------------------------------------------
    def _on_method(self, name: str) -> None:
        """A new method, a new form: its own fields, defaults and help."""
        from ..workflow.session import method_geometry, method_options, method_uses_encoder

        while self.settings_form.rowCount():
            self.settings_form.removeRow(0)
        self.options = {}
        try:
            options = method_options(name) if name else []
        except Exception as exc:  # noqa: BLE001 - a broken method must not break the widget
            report_failure(f"Settings of {name}", exc)
            options = []
        for field, default, typ, doc in options:
            w = _editor(default, typ, doc)
            self.options[field] = w
            label = QLabel(field.replace("_", " "))
            label.setToolTip(doc)
            self.settings_form.addRow(label, w)
        if name:
            mpp, patch = method_geometry(name)  # the family's: segmentation 1 µm/px, 128 px; MIL 0.5, 256
            self.mpp.setValue(mpp)
            self.patch.setValue(patch)
        try:
            self.uses_encoder = method_uses_encoder(name) if name else True
        except Exception:  # noqa: BLE001 - reported above with its settings
            self.uses_encoder = True
        self.encoder_picker.setVisible(self.uses_encoder)  # the choice is kept while hidden
        self._imported_geometry()
        self.default_name()
        self.method_changed.emit(name)

    def _imported_geometry(self, *_: Any) -> None:
        """An imported feature set was chosen: show the patch size and µm/px its bags were imported at."""
        found = self.encoder_picker.imported_set() if self.uses_encoder else None
        if found is not None and found.geometries:
            self.patch.setValue(found.patch_size)
            self.mpp.setValue(found.mpp)

    def _geometry(self) -> tuple[float, int]:
        """(µm/px, patch) of the form; for an imported set, its recorded µm/px when the field shows it
        rounded (0.499 shows as 0.50), since its bags are used only at exactly their own geometry."""
        mpp, patch = self.mpp.value(), self.patch.value()
        found = self.encoder_picker.imported_set() if self.uses_encoder else None
        for g_patch, g_mpp in found.geometries if found is not None else ():
            if g_patch == patch and abs(g_mpp - mpp) <= 0.5 * 10 ** -self.mpp.decimals():
                return g_mpp, patch
        return mpp, patch

    def set_option(self, name: str, value: Any) -> None:
        """Set a field of the settings form (what a user types; scripts and tests call this)."""
        _set_editor_value(self.options[name], value)

    def config(self) -> dict[str, Any]:
        """The form's values, as ``InteractiveSession.spec(config=...)`` takes them."""
        return {name: _editor_value(name, w) for name, w in self.options.items()}

    def default_name(self, force: bool = False) -> None:
        """``<method>-<n>``, unique among the project's runs; a name the user typed is kept."""
        if not force and self.run_name.text() not in ("", self._auto_name):
            return
        method = self.method.currentText() or "run"
        api = self.ctx.api
        self._auto_name = api.next_run_name(method) if api is not None else f"{method}-1"
        self.run_name.setText(self._auto_name)

    # --- the request -----------------------------------------------------------------------------
    def encoder_choice(self) -> dict[str, Any] | None:
        """``encoder`` and ``weights`` of a run whose family reads features ({} for one that does not, e.g.
        segmentation), or None after telling the user why that choice cannot start (nothing is created then)."""
        if not self.uses_encoder:
            return {}
        from ..workflow.session import encoder_problem

        picker = self.encoder_picker
        encoder, weights = picker.encoder(), picker.weights()
        problem = encoder_problem(encoder, weights, picker.specs)
        if problem:
            self.ctx.tasks.report(problem)
            notify(problem, "warning")
            return None
        return {"encoder": encoder, "weights": weights}

    def spec(self) -> Any:
        """The run the form describes (``InteractiveSession.spec``), or None after saying why it cannot."""
        encoder = self.encoder_choice()
        if encoder is None:
            return None
        mpp, patch = self._geometry()
        return self.ctx.api.spec(self.method.currentText(), self.run_name.text().strip(),
                                 epochs=self.epochs.value(), device=self.device.currentText(),
                                 mpp=mpp, patch=patch, config=self.config(),
                                 **encoder)
