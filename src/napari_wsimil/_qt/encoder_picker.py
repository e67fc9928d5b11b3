"""The encoder row of the Training widget: which patch encoder a MIL run uses, and its weights.

Lists :func:`~napari_wsimil.features.encoders.available_encoders`: the built-in encoders, the
``timm:ARCH`` ones and those other packages register through the ``napari_wsimil.encoders``
entry-point group (shown with the package they come from), and the open project's imported feature
sets (``imported:NAME``, from :func:`~napari_wsimil.features.interop.imported_sets`: bags computed
elsewhere, e.g. by CLAM, which take no weights). The weights field and its buttons are
enabled only for an encoder that takes weights; a folder is offered for the timm encoders (a Hugging
Face hub folder holding ``config.json``) and for plugins (which decide what they read). The weights
chosen for each encoder are remembered while the widget lives, so switching encoders back and forth
keeps them. Checking the choice before a run starts is the library's
(:func:`~napari_wsimil.workflow.session.encoder_problem`); this is only the view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QWidget,
)

DEFAULT_ENCODER = "handcrafted"
WEIGHTS_FILTER = "Weights (*.safetensors *.pth *.pt *.bin *.ckpt *.tar);;All files (*)"


def _timm_family(name: str) -> bool:
    from ..features.encoders import TIMM_PREFIX

    return name == TIMM_PREFIX or name.startswith(TIMM_PREFIX + ":")


def _requires_weights(name: str) -> bool:
    from ..workflow.session import encoder_requires_weights

    return encoder_requires_weights(name)


def _tooltip(spec: Any) -> str:
    lines = [f"{spec.name}: {spec.description}" if spec.description else spec.name]
    if not spec.takes_weights:
        lines.append("Takes no weights file.")
    elif _requires_weights(spec.name):
        lines.append("Needs a weights folder (Hugging Face hub folder with config.json).")
    elif spec.source == "builtin":
        lines.append("Weights file optional: without one, a fixed random network (a baseline).")
    else:
        lines.append("Takes a weights file or folder (as the plugin documents).")
    if spec.source != "builtin":
        lines.append(f"From the package {spec.source} (napari_wsimil.encoders entry point).")
    return "\n".join(lines)


class EncoderPicker(QWidget):
    """An "Encoder" combo box and a "Weights" path with file and folder choosers."""

    changed = Signal(str)  # the chosen encoder's name

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.specs: dict[str, Any] = {}
        self._weights: dict[str, str] = {}  # encoder -> weights path, remembered for the session
        self.imported: dict[str, Any] = {}  # imported:NAME -> ImportedSet of the open project
        self.combo = QComboBox()
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(14)
        self.weights_edit = QLineEdit()
        self.weights_edit.setToolTip("The encoder's weights: a local file (.safetensors or a torch state "
                                     "dict), or for timm encoders a hub folder holding config.json. Nothing "
                                     "is downloaded.")
        self.weights_btn = QPushButton("Weights…")
        self.weights_btn.setToolTip("Choose a weights file.")
        self.weights_btn.clicked.connect(self.browse_file)
        self.folder_btn = QPushButton("Folder…")
        self.folder_btn.setToolTip("Choose a weights folder (a Hugging Face hub folder with config.json).")
        self.folder_btn.clicked.connect(self.browse_folder)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("Encoder", self.combo)
        row = QHBoxLayout()
        row.addWidget(self.weights_edit, 1)
        row.addWidget(self.weights_btn)
        row.addWidget(self.folder_btn)
        form.addRow("Weights", row)
        self.combo.currentIndexChanged.connect(self._on_encoder)
        self.weights_edit.textChanged.connect(self._remember)
        self.refresh()

    # --- the list --------------------------------------------------------------------------------
    def refresh(self, rescan: bool = False) -> None:
        """Fill the list from the registry (``rescan``: look for entry-point encoders again, e.g. after
        installing a package); the current choice stays when it is still there."""
        from ..features.encoders import available_encoders, refresh_encoders

        keep = self.encoder() or DEFAULT_ENCODER
        self.specs = refresh_encoders() if rescan else available_encoders()
        self.combo.blockSignals(True)
        self.combo.clear()
        for name, spec in self.specs.items():
            text = name if spec.source == "builtin" else f"{name}  [{spec.source}]"
            self.combo.addItem(text, name)
            self.combo.setItemData(self.combo.count() - 1, _tooltip(spec), Qt.ItemDataRole.ToolTipRole)
        for name, found in self.imported.items():
            self.combo.addItem(name, name)
            self.combo.setItemData(self.combo.count() - 1, found.describe(), Qt.ItemDataRole.ToolTipRole)
        index = self.combo.findData(keep)
        if index < 0:
            index = max(self.combo.findData(DEFAULT_ENCODER), 0)
        self.combo.setCurrentIndex(index)
        self.combo.blockSignals(False)
        self._on_encoder()

    def set_imported(self, sets: Any) -> None:
        """List these imported feature sets (``ImportedSet``s of the open project; none when it closes)
        after the encoders; a chosen set that is gone falls back to the default encoder."""
        self.imported = {s.encoder: s for s in sets}
        self.refresh()

    def imported_set(self) -> Any | None:
        """The chosen ``ImportedSet``, or None when the choice is an encoder."""
        return self.imported.get(self.encoder())

    def names(self) -> list[str]:
        return [self.combo.itemData(i) for i in range(self.combo.count())]

    # --- the choice ------------------------------------------------------------------------------
    def encoder(self) -> str:
        """The chosen encoder's registry name ("" before the list is filled)."""
        return self.combo.currentData() or ""

    def takes_weights(self) -> bool:
        spec = self.specs.get(self.encoder())
        return bool(spec is not None and spec.takes_weights)

    def weights(self) -> str | None:
        """The weights path typed or chosen, or None (none given, or the encoder takes none)."""
        if not self.takes_weights():
            return None
        return self.weights_edit.text().strip() or None

    def set_encoder(self, name: str) -> bool:
        """Choose ``name``; False when it is not listed."""
        index = self.combo.findData(name)
        if index >= 0:
            self.combo.setCurrentIndex(index)
        return index >= 0

    def set_weights(self, path: str | Path | None) -> None:
        self.weights_edit.setText("" if path is None else str(path))

    def _remember(self, text: str) -> None:
        if self.takes_weights():
            self._weights[self.encoder()] = text

    def _on_encoder(self, *_: Any) -> None:
        name = self.encoder()
        spec = self.specs.get(name)
        takes = self.takes_weights()
        found = self.imported.get(name)
        self.combo.setToolTip(_tooltip(spec) if spec is not None else found.describe() if found is not None
                              else "Patch encoder of the feature bags.")
        self.weights_edit.blockSignals(True)
        self.weights_edit.setText(self._weights.get(name, "") if takes else "")
        self.weights_edit.blockSignals(False)
        if found is not None:
            hint = "imported features take no weights"
        elif not takes:
            hint = "this encoder takes no weights"
        elif _requires_weights(name):
            hint = "required: a hub folder with config.json"
        elif spec is not None and spec.source == "builtin":
            hint = "optional (none: a fixed random network)"
        else:
            hint = "as the plugin needs"
        self.weights_edit.setPlaceholderText(hint)
        self.weights_edit.setEnabled(takes)
        self.weights_btn.setEnabled(takes)
        plugin = spec is not None and spec.source != "builtin"
        self.folder_btn.setEnabled(takes and (_timm_family(name) or plugin))
        self.changed.emit(name)

    # --- choosers --------------------------------------------------------------------------------
    def _start_dir(self) -> str:
        text = self.weights_edit.text().strip()
        if text:
            p = Path(text).expanduser()
            return str(p if p.is_dir() else p.parent)
        return str(Path.home())

    def browse_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, f"Weights for {self.encoder()}", self._start_dir(),
                                              WEIGHTS_FILTER)
        if path:
            self.set_weights(path)

    def browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, f"Weights folder for {self.encoder()}",
                                                self._start_dir())
        if path:
            self.set_weights(path)


__all__ = ["DEFAULT_ENCODER", "EncoderPicker"]
