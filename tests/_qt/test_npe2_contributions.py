"""The plugin's npe2 contributions in a real napari 0.9 viewer on Xvfb: the manifest validates, the writers
save through napari's own *Save Layers* path and the files read back, the "Export mask" command is in the
menus napari shows and runs, dropping several slides opens each, the Preferences values reach the library,
and the loss plot takes napari's light and dark themes live."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from conftest import real_slide

pytestmark = pytest.mark.gui
napari = pytest.importorskip("napari")
npe2 = pytest.importorskip("npe2")

CMU = "CMU-1-Small-Region.svs"
TCGA = "tcga-cr-7395-01a-01-ts1.svs"
MANIFEST = Path(str(files("napari_wsimil") / "napari.yaml"))


def _manifest():
    return npe2.PluginManifest.from_file(str(MANIFEST))


def test_npe2_validate_passes_with_imports():
    exe = shutil.which("npe2", path=str(Path(sys.executable).parent))
    assert exe is not None, "npe2's command line is not installed beside this Python"
    done = subprocess.run([exe, "validate", str(MANIFEST), "--imports"], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0 and "valid" in done.stdout, done.stdout + done.stderr


def test_manifest_declares_writers_menus_categories_configurations():
    m = _manifest()
    writers = {w.command: (tuple(w.layer_types), tuple(w.filename_extensions))
               for w in m.contributions.writers}
    assert writers == {"napari-wsimil.write_labels_mask": (("labels",), (".ome.tif", ".ome.tiff")),
                       "napari-wsimil.write_shapes_geojson": (("shapes",), (".geojson",))}
    assert set(m.categories) == {"Annotation", "IO", "Segmentation"}
    [perf] = m.contributions.configurations.values()
    assert set(perf.properties) == {"tile_cache_mb", "default_device"}


def test_menu_ids_are_ones_napari_shows():
    """npe2 validate accepts any menu id; napari 0.9.2 silently drops those plugins may not extend (the layer
    list's context menu and the Plugins menu among them), so every id of ours must be one it keeps."""
    from napari._app_model.constants._menus import is_menu_contributable

    ids = list(_manifest().contributions.menus)
    assert ids and all(is_menu_contributable(i) for i in ids), ids
    assert not is_menu_contributable("napari/layers/context")  # what docs/napari.md says napari rejects
    assert not is_menu_contributable("napari/plugins")


@pytest.fixture
def viewer(make_napari_viewer):
    v = make_napari_viewer(show=True)
    v.window._qt_window.resize(900, 700)
    return v


def _slide_layers(viewer):
    """CMU opened by the reader, with painted labels and drawn outlines as the project widgets make them."""
    from napari_wsimil.project.annotations import Annotation
    from napari_wsimil.project.classes import ClassDef, default_classes
    from napari_wsimil.project_layers import annotations_layer_data, labels_layer_data

    [image] = viewer.open(str(real_slide(CMU)), plugin="napari-wsimil")
    slide = image.metadata["slide"]
    classes = default_classes() + [ClassDef(3, "stroma", "#4363d8")]
    ds = 8.0
    w, h = slide.dimensions
    labels = np.zeros((int(np.ceil(h / ds)), int(np.ceil(w / ds))), np.uint8)
    labels[20:70, 30:120] = 1
    labels[150:180, 10:200] = 3
    data, kw, _ = labels_layer_data(labels, ds, classes, slide, name="CMU labels")
    lab = viewer.add_labels(data, **kw)
    anns = [Annotation.box(100, 200, 900, 700, "tumour"),
            Annotation.polygon([(1000, 100), (1500, 150), (1300, 900)], "stroma")]
    data, kw, _ = annotations_layer_data(anns, classes, slide, name="CMU boxes")
    shp = viewer.add_shapes(data, **kw)
    return slide, labels, lab, anns, shp


def _ome_meta(path):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        text = tif.ome_metadata.split("<Description>")[1].split("</Description>")[0]
        return json.loads(text.replace("&quot;", '"'))["wsimil"], tif.series[0].asarray()


def test_writers_save_through_napari(viewer, tmp_path):
    """File > Save Selected Layers: napari picks our writers by extension; the files read back."""
    from napari_wsimil.project.annotations import read_geojson

    slide, labels, lab, anns, shp = _slide_layers(viewer)
    viewer.layers.selection = {lab}
    [mask_path] = viewer.layers.save(str(tmp_path / "cmu.ome.tif"), selected=True)  # no plugin named
    meta, pixels = _ome_meta(mask_path)
    assert np.array_equal(pixels, labels)
    assert meta["mpp"] == pytest.approx(slide.mpp * 8.0) and meta["downsample"] == 8.0
    assert {c["name"] for c in meta["classes"]} == {"unlabelled", "tumour", "normal", "stroma"}
    viewer.layers.selection = {shp}
    [geo_path] = viewer.layers.save(str(tmp_path / "cmu.geojson"), selected=True)  # no plugin named
    back = read_geojson(geo_path)
    assert [(a.id, a.class_name, a.kind) for a in back] == [(a.id, a.class_name, a.kind) for a in anns]
    assert all(b.geometry.equals_exact(a.geometry, 1e-2) for a, b in zip(anns, back))


def _menu_actions(menu, path=()):
    for action in menu.actions():
        sub = action.menu()
        if sub is not None:
            yield from _menu_actions(sub, (*path, action.text()))
        elif action.text():
            yield (*path, action.text()), action


def test_export_mask_command_is_in_the_menus_and_runs(viewer, tmp_path, monkeypatch, qtbot):
    from qtpy.QtWidgets import QFileDialog

    slide, labels, lab, _, _ = _slide_layers(viewer)
    bar = viewer.window._qt_window.menuBar()
    found = {path: action for top in bar.actions() if top.menu() is not None
             for path, action in _menu_actions(top.menu(), (top.text(),))}
    ours = {path: a for path, a in found.items() if path[-1].startswith("Export mask")}
    menus = {tuple(p.replace("&", "") for p in path[:-1]) for path in ours}
    assert ("Layers", "Data") in menus and ("File", "IO Utilities") in menus, sorted(found)
    asked = []
    target = tmp_path / "exports" / "from menu"

    def save_dialog(parent, caption, directory, filter):
        asked.append((caption, directory, filter))
        return str(target), filter

    monkeypatch.setattr(QFileDialog, "getSaveFileName", save_dialog)
    viewer.layers.selection = {lab}
    next(a for p, a in ours.items() if p[0].replace("&", "") == "Layers").trigger()
    written = target.with_name("from menu.ome.tif")
    qtbot.waitUntil(written.exists, timeout=10_000)
    assert asked and asked[0][1].endswith("CMU_labels.ome.tif")
    meta, pixels = _ome_meta(written)
    assert meta["slide_id"] == "CMU labels"
    painted = labels > 0
    assert np.array_equal(pixels[painted], labels[painted])  # painted pixels win
    # the drawn box (level-0 x 100-900, y 200-700) and triangle are filled where nothing was painted, as
    # QuPath's labelled-image export does; label pixel (r, c) covers level-0 [8c, 8c + 8) x [8r, 8r + 8)
    assert pixels[80, 15] == 1 and labels[80, 15] == 0  # inside the tumour box
    assert pixels[40, 160] == 3 and labels[40, 160] == 0  # inside the stroma triangle
    assert pixels[100, 250] == 0 and pixels[5, 5] == 0  # outside everything


def test_every_widget_and_the_sample_run_from_the_manifest(viewer):
    """Each widget contribution docks as napari's Plugins menu docks it, and the sample opens."""
    import importlib

    m = _manifest()
    commands = {c.id: c.python_name for c in m.contributions.commands}
    for contribution in m.contributions.widgets:
        module, attr = commands[contribution.command].split(":")
        _, widget = viewer.window.add_plugin_dock_widget("napari-wsimil", contribution.display_name)
        assert isinstance(widget, getattr(importlib.import_module(module), attr)), contribution.display_name
    [sample] = m.contributions.sample_data
    [layer] = viewer.open_sample("napari-wsimil", sample.key)
    assert layer.multiscale and layer.metadata["wsimil"]["path"]


def test_dropping_several_slides_opens_each(viewer, qtbot):
    from qtpy.QtCore import QMimeData, QPointF, Qt, QUrl
    from qtpy.QtGui import QDropEvent

    from napari_wsimil._reader import napari_get_reader

    from napari.settings import get_settings

    paths = [real_slide(CMU), real_slide(TCGA)]
    assert napari_get_reader([str(paths[0]), "/nonexistent/slide.svs"]) is None  # all or nothing
    # napari's own reader claims *.svs too, so a drop asks which reader unless one was chosen for the type
    # ("remember" in that dialog, or Preferences > Plugins): the choice a user makes once
    get_settings().plugins.extension2reader = {"*.svs": "napari-wsimil"}
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    drop = QDropEvent(QPointF(100, 100), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                      Qt.KeyboardModifier.NoModifier)
    viewer.window._qt_viewer.dropEvent(drop)
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=20_000)
    assert [layer.metadata["wsimil"]["path"] for layer in viewer.layers] == [str(p) for p in paths]
    viewer.layers.clear()
    stacked = viewer.open([str(p) for p in paths], stack=True, plugin="napari-wsimil")  # a list: one each
    assert [layer.metadata["wsimil"]["path"] for layer in stacked] == [str(p) for p in paths]


def test_preferences_reach_the_library_live(plugin_settings, npe2pm, qtbot):
    """napari builds the plugin's settings from the manifest and shows them in Preferences; the library takes
    them, and later edits."""
    from napari._qt.dialogs.preferences_dialog import PreferencesDialog
    from napari.settings import get_plugin_settings

    from napari_wsimil import settings
    from napari_wsimil._plugin_settings import sync_from_napari
    from napari_wsimil.slide.tile_cache import TILE_CACHE

    npe2pm.register(_manifest())
    section = get_plugin_settings("napari-wsimil").performance
    assert (section.tile_cache_mb, section.default_device) == (256, "auto")
    dialog = PreferencesDialog()
    qtbot.addWidget(dialog)
    pages = [dialog._list.item(i).text() for i in range(dialog._list.count())]
    assert "WSI MIL" in pages, pages
    try:
        section.tile_cache_mb = 64
        assert sync_from_napari().tile_cache_mb == 64 and TILE_CACHE.max_bytes == 64 * 2**20
        section.default_device = "cpu"  # an edit in Preferences applies without another sync
        section.tile_cache_mb = 32
        assert settings.current() == settings.Settings(32, "cpu")
        with pytest.raises(Exception):
            section.default_device = "tpu"  # napari enforces the manifest's enum
        assert settings.current().default_device == "cpu"
    finally:
        settings.reset()


def test_default_device_starts_the_training_widget(plugin_settings, npe2pm, make_napari_viewer):
    from napari.settings import get_plugin_settings

    from napari_wsimil import settings
    from napari_wsimil._qt.training_widget import TrainingWidget

    npe2pm.register(_manifest())
    get_plugin_settings("napari-wsimil").performance.default_device = "cpu"
    try:
        tw = TrainingWidget(make_napari_viewer())
        assert tw.device.currentText() == "cpu"
        assert [tw.device.itemText(i) for i in range(tw.device.count())] == list(settings.DEVICES)
    finally:
        settings.reset()


def _corner_colour(widget, qtbot):
    widget.repaint()
    qtbot.wait(50)
    img = widget.grab().toImage()
    corner = img.pixelColor(2, 2)
    return corner.red(), corner.green(), corner.blue()


def test_loss_plot_follows_light_and_dark_themes_live(viewer, qtbot):
    from napari.utils.theme import get_theme

    from napari_wsimil._qt.loss_plot import LossPlot

    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.resize(260, 130)
    plot.show()
    for e, v in enumerate([0.9, 0.6, 0.5], 1):
        plot.add("train", e, v)
    plot.follow(viewer)
    viewer.theme = "dark"
    dark = _corner_colour(plot, qtbot)
    viewer.theme = "light"  # a live change, as Preferences > Appearance makes it
    assert plot.theme == "light"
    light = _corner_colour(plot, qtbot)
    expect = {name: tuple(int(str(get_theme(name).foreground)[i:i + 2], 16) for i in (1, 3, 5))
              for name in ("dark", "light")}
    # the painted panel is the theme's foreground (to the precision of Xvfb's 16-bit screen: 8 levels)
    assert np.abs(np.subtract(dark, expect["dark"])).max() <= 8
    assert np.abs(np.subtract(light, expect["light"])).max() <= 8
    assert sum(light) > 600 > sum(dark)
    assert plot.colors.series["train"] != plot.colors.background
