"""A real napari viewer on Xvfb opens a synthetic slide and its attention heatmap through the plugin's
reader: the heatmap is a colour-mapped (not RGB) layer over exactly the slide's extent, and a hot
square of patches shows up yellow on screen where those patches are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.infer.heatmap import attention_heatmap, default_downsample, write_heatmap
from napari_wsimil.slide.synthetic import synthesize_slide

pytestmark = pytest.mark.gui
napari = pytest.importorskip("napari")

SHAPE = (1536, 2048)  # (h, w) level-0 px; not square, so a swapped axis shows
MPP = 0.5
PATCH = 256
HOT = (slice(1, 3), slice(5, 7))  # patch rows, columns scored 1 (upper right); all others 0
COLD = (slice(3, 6), slice(0, 3))  # patch rows, columns sampled as the cold region (lower left)


@pytest.fixture
def viewer(make_napari_viewer):
    v = make_napari_viewer(show=True)
    v.window._qt_window.resize(900, 700)
    return v


@pytest.fixture
def slide_and_heatmap(tmp_path: Path) -> tuple[Path, Path]:
    slide = tmp_path / "case-1.tiff"
    synthesize_slide(slide, SHAPE, seed=7, malignant=True, mpp=MPP)
    rows, cols = SHAPE[0] // PATCH, SHAPE[1] // PATCH
    r, c = np.mgrid[:rows, :cols]
    hot = np.zeros((rows, cols), bool)
    hot[HOT] = True
    coords = np.stack([c.ravel() * PATCH, r.ravel() * PATCH], 1)
    ds = default_downsample(PATCH, SHAPE)
    heat = attention_heatmap(coords, hot.ravel().astype(float), PATCH, SHAPE, ds, percentile=False)
    # a separate folder, as wsimil predict writes them, and the heatmap named like the slide
    heatmap = write_heatmap(tmp_path / "heatmaps" / "case-1.tif", heat, MPP, ds, extra={"slide_id": "case-1"})
    return slide, heatmap


def _settled_screenshot(viewer, qtbot, tries: int = 10) -> np.ndarray:
    """The canvas once two consecutive screenshots agree, so lazily loaded tiles have all arrived."""
    previous = None
    for _ in range(tries):
        qtbot.wait(200)
        shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(np.int16)
        if previous is not None and np.array_equal(shot, previous):
            return shot
        previous = shot
    return previous


def _screen_box(viewer, shot: np.ndarray, patches: tuple[slice, slice],
                margin: float = 0.2) -> tuple[slice, slice]:
    """Screenshot rows/columns over the middle of a block of patches (``margin`` trimmed each side).

    World → canvas through the camera: canvas px = (world − centre)·zoom + size/2, times the ratio of
    screenshot to canvas size (HiDPI). Pixel edges of level-0 px i lie at (i − 0.5)·mpp in the world.
    """
    rows, cols = patches
    y0, y1 = (rows.start * PATCH - 0.5) * MPP, (rows.stop * PATCH - 0.5) * MPP
    x0, x1 = (cols.start * PATCH - 0.5) * MPP, (cols.stop * PATCH - 0.5) * MPP
    cy, cx = viewer.scene.camera.center[-2:]
    zoom = viewer.scene.camera.zoom
    canvas_h, canvas_w = viewer.canvas.size
    ry, rx = shot.shape[0] / canvas_h, shot.shape[1] / canvas_w

    def span(a: float, b: float, centre: float, size: int, ratio: float) -> slice:
        a, b = a + margin * (b - a), b - margin * (b - a)
        lo, hi = ((a - centre) * zoom + size / 2) * ratio, ((b - centre) * zoom + size / 2) * ratio
        return slice(int(np.ceil(lo)), int(np.floor(hi)))

    return span(y0, y1, cy, canvas_h, ry), span(x0, x1, cx, canvas_w, rx)


def test_heatmap_opens_over_its_slide(viewer, qtbot, slide_and_heatmap):
    slide_path, heatmap_path = slide_and_heatmap
    [slide] = viewer.open(str(slide_path), plugin="napari-wsimil")
    [heat] = viewer.open(str(heatmap_path), plugin="napari-wsimil")

    assert slide.rgb and not heat.rgb
    assert heat.multiscale
    assert heat.colormap.name == "inferno"
    assert heat.metadata["wsimil"]["kind"] == "heatmap"
    assert heat.name != slide.name  # both files are called case-1; the layers must not be
    pixel = heat.scale[-1]  # one heatmap pixel in µm
    assert pixel == pytest.approx(MPP * heat.metadata["wsimil"]["downsample"])
    slide_extent, heat_extent = np.asarray(slide.extent.world), np.asarray(heat.extent.world)
    assert np.all(np.abs(heat_extent - slide_extent) < pixel), (heat_extent, slide_extent)
    # world is µm: the slide spans its physical size (napari counts pixel centres or edges: ± 1 px)
    assert slide_extent[1] - slide_extent[0] == pytest.approx(np.array(SHAPE) * MPP, abs=1.01 * MPP)


def test_hot_square_shows_where_its_patches_are(viewer, qtbot, slide_and_heatmap):
    slide_path, heatmap_path = slide_and_heatmap
    viewer.open(str(slide_path), plugin="napari-wsimil")
    [heat] = viewer.open(str(heatmap_path), plugin="napari-wsimil")
    assert heat.blending == "translucent"
    viewer.reset_view()
    shown = _settled_screenshot(viewer, qtbot)
    heat.visible = False
    hidden = _settled_screenshot(viewer, qtbot)
    heat.visible = True

    # translucent blending draws α·colour + (1 − α)·below: what the heatmap itself adds is
    # shown − (1 − α)·hidden ≈ α·inferno(value), whatever the slide looks like underneath
    alpha = heat.opacity
    added = shown - (1 - alpha) * hidden
    hot_box, cold_box = _screen_box(viewer, shown, HOT), _screen_box(viewer, shown, COLD)
    for box in (hot_box, cold_box):
        assert min(box[0].stop - box[0].start, box[1].stop - box[1].start) >= 10, "region too small on screen"
    hot = added[hot_box].reshape(-1, 3).mean(0)
    cold = added[cold_box].reshape(-1, 3).mean(0)
    yellow = alpha * np.array([252, 255, 164])  # inferno(1)
    assert np.all(np.abs(hot - yellow) < 25), f"the hot square is not inferno-yellow: {hot} vs {yellow}"
    assert np.all(np.abs(cold) < 20), f"the cold region is not inferno-black: {cold}"
    # and plainly on screen: the hot square is brighter than the cold region
    assert shown[hot_box].mean() > shown[cold_box].mean() + 30
