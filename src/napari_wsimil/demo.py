"""The README's main job: the sample slide in napari with the plugin's widgets.

With a display it opens napari, docks the widgets, detects tissue and lays the patch grid so the
user sees the result at once. Without one it runs the same job headless and writes what napari
would have shown (thumbnail, tissue overlay, patch grid, a real viewer screenshot rendered on Xvfb
when Xvfb is installed) and says where the files are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

PATCH_PX, PATCH_MPP = 256, 0.5


def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _overlay(thumb: np.ndarray, mask: np.ndarray, coords: np.ndarray, size0: float, thumb_ds: float) -> np.ndarray:
    """Thumbnail with the tissue outline in green and patch outlines in yellow."""
    from PIL import Image, ImageDraw
    from skimage.segmentation import find_boundaries

    img = Image.fromarray(thumb)
    edge = np.asarray(
        Image.fromarray(find_boundaries(mask).astype(np.uint8) * 255).resize(img.size, Image.Resampling.NEAREST)
    ) > 0
    out = np.asarray(img).copy()
    out[edge] = (0, 200, 0)
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    s = size0 / thumb_ds
    for x, y in coords / thumb_ds:
        draw.rectangle([x, y, x + s, y + s], outline=(255, 200, 0))
    return np.asarray(img)


def run_headless(out: Path, screenshot: bool = True) -> dict:
    from PIL import Image

    from .slide import open_slide
    from .slide.synthetic import sample_slide_path
    from .slide.tiling import patch_grid
    from .slide.tissue import tissue_mask

    out.mkdir(parents=True, exist_ok=True)
    path = sample_slide_path()
    with open_slide(path) as slide:
        tissue = tissue_mask(slide)
        grid = patch_grid(slide, patch_size=PATCH_PX, mpp=PATCH_MPP, min_tissue=0.5, tissue=tissue)
        thumb = slide.thumbnail(1024)
        thumb_ds = slide.dimensions[0] / thumb.shape[1]
        Image.fromarray(thumb).save(out / "thumbnail.png")
        Image.fromarray((tissue.mask * 255).astype(np.uint8)).save(out / "tissue_mask.png")
        Image.fromarray(_overlay(thumb, tissue.mask, grid.coords, grid.size_level0, thumb_ds)).save(out / "overlay.png")
        grid.to_csv(out / "patches.csv")
        summary = {
            "slide": slide.describe(),
            "tissue_fraction": float(tissue.mask.mean()),
            "tissue_mask_mpp": tissue.mpp,
            "patches": len(grid),
            "patch_px": PATCH_PX,
            "patch_mpp": PATCH_MPP,
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if screenshot and shutil.which("Xvfb"):
        summary["screenshot"] = str(_screenshot_on_xvfb(path, out / "napari.png"))
    return summary


def _screenshot_on_xvfb(path: Path, dest: Path) -> Path:
    """Render the real napari window on a virtual screen, as a user would see it."""
    from pyvirtualdisplay import Display

    with Display(visible=False, size=(1400, 900)):
        viewer, widget = build_viewer(path, show=True, project_dir=dest.parent / "project")
        from qtpy.QtWidgets import QApplication

        _wait_for(widget, QApplication.instance())
        viewer.window._qt_window.resize(1400, 900)
        for _ in range(20):
            QApplication.processEvents()
        viewer.screenshot(str(dest), canvas_only=False, flash=False)
        viewer.close()
    return dest


def _wait_for(widget, app, timeout_s: float = 120.0) -> None:
    import time

    t = time.monotonic()
    while widget._workers and time.monotonic() - t < timeout_s:
        app.processEvents()
        time.sleep(0.02)
    for _ in range(10):
        app.processEvents()
        time.sleep(0.05)


def build_viewer(path: Path, show: bool = True, project_dir: Path | None = None):
    """A viewer with every dock widget; with ``project_dir`` the slide is opened through a labelling project."""
    import napari

    from ._qt.labelling_widget import LabellingWidget
    from ._qt.project_widget import ProjectWidget
    from ._qt.slide_widget import SlideWidget

    viewer = napari.Viewer(title="napari-wsimil demo", show=show)
    widget = SlideWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Slide, tissue and patches", area="right")
    if project_dir is None:
        widget.open_path(str(path))
    else:
        project = ProjectWidget(viewer)
        labelling = LabellingWidget(viewer)
        viewer.window.add_dock_widget(project, name="Labelling project", area="right", tabify=True)
        viewer.window.add_dock_widget(labelling, name="Classes and labelling tools", area="right", tabify=True)
        if (project_dir / "project.json").exists():
            project.open_project(str(project_dir))
        else:
            project.create_project(str(project_dir))
            project.add_slides([str(path)])
    widget.detect_tissue()
    widget.make_patch_grid()
    return viewer, widget


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m napari_wsimil.demo", description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("out/demo"), help="where outputs and the demo labelling project go")
    ap.add_argument("--headless", action="store_true", help="do not open a window even if a display exists")
    args = ap.parse_args(argv)
    if has_display() and not args.headless:
        import napari

        from .slide.synthetic import sample_slide_path

        build_viewer(sample_slide_path(), project_dir=args.out / "project")
        napari.run()
        return 0
    print("No display: running the demo headless.")
    summary = run_headless(args.out)
    print(f"Sample slide: {summary['slide']['path']}")
    print(f"Tissue: {100 * summary['tissue_fraction']:.1f} % of the slide; {summary['patches']} patches of "
          f"{PATCH_PX} px at {PATCH_MPP} µm/px.")
    print(f"Outputs are in {args.out.resolve()}:")
    for f in sorted(args.out.iterdir()):
        print(f"  {f.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
