"""A real napari viewer on Xvfb opens every real slide through the plugin's reader and shows tissue."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REAL_SLIDES, real_slide

pytestmark = pytest.mark.gui
napari = pytest.importorskip("napari")


@pytest.fixture
def viewer(make_napari_viewer):
    v = make_napari_viewer(show=True)
    v.window._qt_window.resize(900, 700)
    return v


def _screenshot(viewer, qtbot) -> np.ndarray:
    viewer.reset_view()
    qtbot.wait(300)  # let async tile loading and vispy draw settle
    return np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3]


def _looks_like_the_slide(shot: np.ndarray, thumb: np.ndarray) -> None:
    """The canvas shows the slide: structured content, and colours like the slide's own thumbnail."""
    background = np.array([0, 0, 0])  # napari's default canvas is black
    covered = np.abs(shot.astype(int) - background).sum(-1) > 30
    assert covered.mean() > 0.2, "the canvas is mostly empty"
    content = shot[covered].astype(float)
    assert content.std(axis=0).max() > 8, "the canvas is a flat colour, not an image"
    thumb = thumb.reshape(-1, 3).astype(int)
    thumb_content = thumb[np.abs(thumb - background).sum(-1) > 30]
    assert np.abs(content.mean(0) - thumb_content.mean(0)).max() < 40, "colours differ from the slide's"


@pytest.mark.parametrize("name", REAL_SLIDES)
def test_reader_opens_real_slide_in_viewer(viewer, qtbot, name):
    path = real_slide(name)
    layers = viewer.open(str(path), plugin="napari-wsimil")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.multiscale and layer.rgb
    slide = layer.metadata["slide"]
    assert layer.metadata["wsimil"]["path"] == str(path)
    if slide.mpp is not None:
        # world coordinates are µm: the layer's extent equals the slide's physical size
        w, h = slide.dimensions
        extent = layer.extent.world[1] - layer.extent.world[0]
        assert extent[0] == pytest.approx(h * slide.mpp, rel=0.01)
        assert extent[1] == pytest.approx(w * slide.mpp, rel=0.01)
    shot = _screenshot(viewer, qtbot)
    _looks_like_the_slide(shot, slide.thumbnail(256))


def test_reader_declines_files_it_cannot_read(tmp_path):
    from napari_wsimil._reader import napari_get_reader

    junk = tmp_path / "photo.tif"
    junk.write_bytes(b"II*\x00" + b"\x00" * 100)
    assert napari_get_reader(str(junk)) is None
    assert napari_get_reader(str(tmp_path / "missing.svs")) is None
    assert napari_get_reader([str(junk), str(junk)]) is None
    assert napari_get_reader(str(real_slide("CMU-1-Small-Region.svs"))) is not None
