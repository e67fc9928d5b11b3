"""Every contribution in napari.yaml points at something that exists and works (a common plugin bug)."""

from __future__ import annotations

import importlib

import pytest

npe2 = pytest.importorskip("npe2")


def _manifest():
    from importlib.resources import files

    return npe2.PluginManifest.from_file(str(files("napari_wsimil") / "napari.yaml"))


def test_manifest_validates_and_every_command_imports():
    manifest = _manifest()
    assert manifest.name == "napari-wsimil"
    for command in manifest.contributions.commands:
        module, attr = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), command.id
    ids = {c.id for c in manifest.contributions.commands}
    for group in (manifest.contributions.readers, manifest.contributions.sample_data, manifest.contributions.widgets):
        for item in group:
            assert item.command in ids


def test_reader_patterns_are_the_one_list_of_slide_types():
    """napari.yaml cannot import Python: its reader patterns must be slide/formats.py's, which the dialogs use."""
    from napari_wsimil._qt.project_widget import SLIDE_FILTER
    from napari_wsimil.slide.formats import SLIDE_SUFFIXES, dialog_filter, filename_patterns

    [reader] = _manifest().contributions.readers
    assert list(reader.filename_patterns) == filename_patterns()
    assert SLIDE_FILTER == dialog_filter() and all(f"*{s}" in SLIDE_FILTER for s in SLIDE_SUFFIXES)


def test_plugin_is_discoverable_by_entry_point():
    pm = npe2.PluginManager()
    pm.discover()
    assert "napari-wsimil" in pm._manifests


def test_library_does_not_import_qt():
    """Compute modules must stay importable without Qt or napari (the _qt boundary)."""
    import subprocess
    import sys

    code = (
        "import sys, napari_wsimil, napari_wsimil.slide, napari_wsimil.layers, napari_wsimil.slide.tissue, "
        "napari_wsimil.slide.tiling, napari_wsimil.slide.synthetic, napari_wsimil.cli;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('qtpy','PyQt6','napari','vispy')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
