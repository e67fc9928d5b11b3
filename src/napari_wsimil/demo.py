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
OVERLAY_THRESHOLD = 0.9  # attention percentile shown in attention_overlay.png
#: the quick MIL model of the demo: a small synthetic cohort, handcrafted features, CLAM-SB
MIL_SLIDES, MIL_SIZE, MIL_PATCH, MIL_MPP, MIL_EPOCHS = 16, 3072, 256, 0.5, 30


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


def mil_project(out: Path) -> Path:
    """A small synthetic cohort as a labelling project (made once; reused by later demo runs)."""
    from .project import Project
    from .slide.synthetic import synthesize_cohort

    proj = out / "mil_project"
    if not (proj / "project.json").exists():
        csv_path = synthesize_cohort(out / "mil_cohort", MIL_SLIDES, seed=7, size=MIL_SIZE)
        Project.create_from_csv(proj, csv_path).close()
    return proj


def run_mil_headless(out: Path) -> dict:
    """Train a quick CLAM-SB on the demo project, watching one malignant slide's attention map; write the
    map as a heatmap TIFF (napari opens it aligned with the slide) and as a PNG over the thumbnail."""
    from PIL import Image

    from .infer.heatmap import write_heatmap
    from .project import Project
    from .slide import open_slide
    from .train.events import MapEvent
    from .workflow.session import InteractiveSession

    proj_dir = mil_project(out)
    with Project.open(proj_dir) as project:
        session = InteractiveSession(project)
        watch = next(r.slide_id for r in project.slides if r.label == project.slide_classes[-1])
        name = "demo-clam-sb"
        done = (session.run_dir(name) / "last.json").exists()
        spec = (session.resume_spec(name) if done else
                session.spec("clam-sb", name, epochs=MIL_EPOCHS, device="cpu", mpp=MIL_MPP, patch=MIL_PATCH))
        last_map, epochs = None, []
        for ev in session.train(spec, watch=[watch]):
            if isinstance(ev, MapEvent):
                last_map = ev
            elif ev.kind == "epoch":
                epochs.append({"epoch": ev.epoch, **{f"loss_{k}": v for k, v in ev.losses.items()}})
        if last_map is None:
            last_map = session.slide_map(name, watch)
        heat_path = write_heatmap(out / f"{watch}_attention.tif", last_map.heatmap, last_map.slide_mpp,
                                  last_map.downsample, extra={"slide_id": watch})
        with open_slide(project.slide_path(watch)) as slide:
            thumb = slide.thumbnail(1024)
        from napari.utils.colormaps import ensure_colormap  # the colormap napari shows; no Qt needed

        heat = np.asarray(Image.fromarray((last_map.heatmap * 255).astype(np.uint8)).resize(
            (thumb.shape[1], thumb.shape[0]), Image.Resampling.BILINEAR)) / 255.0
        rgb = (ensure_colormap("inferno").map(heat.ravel())[:, :3].reshape(*heat.shape, 3) * 255).astype(np.uint8)
        alpha = (heat >= OVERLAY_THRESHOLD)[..., None] * 0.6  # the top tenth of the patches, as the widget's threshold
        Image.fromarray((thumb * (1 - alpha) + rgb * alpha).astype(np.uint8)).save(out / "attention_overlay.png")
        return {"project": str(proj_dir), "run": str(session.run_dir(name)), "watched_slide": watch,
                "heatmap": str(heat_path), "epochs": epochs,
                "slide_probabilities": [float(v) for v in last_map.probs]}


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

    with Display(visible=False, size=(1500, 950)):
        return _screenshot_sample(path, dest)


def _screenshot_sample(path: Path, dest: Path) -> Path:
    """The sample slide with tissue and patches (needs a display)."""
    from qtpy.QtWidgets import QApplication

    viewer, widget = build_viewer(path, show=True, project_dir=dest.parent / "project")
    _wait_for(widget, QApplication.instance())
    viewer.window.resize(1400, 900)
    for _ in range(20):
        QApplication.processEvents()
    viewer.screenshot(str(dest), canvas_only=False, flash=False)
    viewer.close()
    return dest


def _wait_for(widget, app, timeout_s: float = 120.0) -> None:
    import time

    t = time.monotonic()
    while widget.busy and time.monotonic() - t < timeout_s:
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


MIL_RUN = "demo-clam-sb"


def build_mil_viewer(out: Path, show: bool = True, train: bool = True):
    """The interactive loop: the demo MIL project in napari with the Project, Labelling and Training widgets,
    one malignant slide chosen. With ``train`` and no finished demo run, the Training widget starts a quick
    CLAM-SB whose attention map updates after every epoch; otherwise the run's map is shown."""
    import napari

    proj_dir = mil_project(out)
    viewer = napari.Viewer(title="napari-wsimil: weakly supervised training", show=show)
    _, pw = viewer.window.add_plugin_dock_widget("napari-wsimil", "Labelling project")
    viewer.window.add_plugin_dock_widget("napari-wsimil", "Classes and labelling tools", tabify=True)
    _, tw = viewer.window.add_plugin_dock_widget("napari-wsimil", "Training and attention maps", tabify=True)
    pw.open_project(str(proj_dir))
    project = pw.session.project
    watch = next(r.slide_id for r in project.slides if r.label == project.slide_classes[-1])
    pw.select_slide(watch)
    tw.method.setCurrentText("clam-sb")
    tw.epochs.setValue(MIL_EPOCHS)
    tw.mpp.setValue(MIL_MPP)
    tw.patch.setValue(MIL_PATCH)
    tw.device.setCurrentText("auto")
    if any(r.name == MIL_RUN for r in tw.api.runs()) or not train:
        tw.refresh_runs(select=MIL_RUN)
        tw.load_map()
    else:
        tw.run_name.setText(MIL_RUN)
        tw.start_btn.click()
    return viewer, tw


def _screenshot_training(out: Path, dest: Path, timeout_s: float = 180.0) -> Path:
    """The Training widget showing the demo run's attention map over its slide (needs a display: Qt keeps
    its first X connection for the whole process, so both screenshots share one virtual screen)."""
    import time

    from qtpy.QtWidgets import QApplication

    viewer, tw = build_mil_viewer(out, show=True, train=False)
    app = QApplication.instance()
    viewer.window.resize(1500, 950)
    t = time.monotonic()
    while (tw.busy or not any(layer.name.startswith("attention ") for layer in viewer.layers)) \
            and time.monotonic() - t < timeout_s:
        app.processEvents()
        time.sleep(0.02)
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    viewer.screenshot(str(dest), canvas_only=False, flash=False)
    viewer.close()
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m napari_wsimil.demo", description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("out/demo"), help="where outputs and the demo labelling project go")
    ap.add_argument("--headless", action="store_true", help="do not open a window even if a display exists")
    args = ap.parse_args(argv)
    if has_display() and not args.headless:
        import napari

        print("Opening napari: a synthetic labelling project; the Training widget trains a quick CLAM-SB and its "
              "attention map updates over the slide after every epoch.")
        build_mil_viewer(args.out)
        napari.run()
        return 0
    print("No display: running the demo headless.")
    summary = run_headless(args.out, screenshot=False)
    print(f"Training a quick CLAM-SB on {MIL_SLIDES} synthetic slides (handcrafted features, {MIL_EPOCHS} epochs)...")
    mil = run_mil_headless(args.out)
    summary["mil"] = mil
    if shutil.which("Xvfb"):
        from pyvirtualdisplay import Display

        from .slide.synthetic import sample_slide_path

        with Display(visible=False, size=(1500, 950)):
            summary["screenshot"] = str(_screenshot_sample(sample_slide_path(), args.out / "napari.png"))
            mil["screenshot"] = str(_screenshot_training(args.out, args.out / "napari_training.png"))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"Sample slide: {summary['slide']['path']}")
    print(f"Tissue: {100 * summary['tissue_fraction']:.1f} % of the slide; {summary['patches']} patches of "
          f"{PATCH_PX} px at {PATCH_MPP} µm/px.")
    print(f"MIL: slide {mil['watched_slide']} P(malignant) {mil['slide_probabilities'][-1]:.2f}; its attention map "
          f"is {Path(mil['heatmap']).name} (open it in napari over the slide) and attention_overlay.png; the run is "
          f"{mil['run']}.")
    print(f"Outputs are in {args.out.resolve()}:")
    for f in sorted(args.out.iterdir()):
        print(f"  {f.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
