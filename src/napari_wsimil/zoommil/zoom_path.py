"""Seeing where ZoomMIL looked: the lowest level's attention map with the zoom path over it (the live layer),
per-level heatmap TIFFs, and patch scores for suggestions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..train.events import MapEvent
from .predict import ZoomPath, load_zoom_run, path_of


def bag_path_of(run_dir: Path, slide_id: str, bag_path: Path, weights: str = "best") -> tuple[ZoomPath, np.ndarray]:
    """(zoom path, slide probabilities) of a slide whose zoom bag holds every level (no slide reading but
    for its size)."""
    import torch

    from ..slide import open_slide
    from .bags import read_zoom_bag
    from .network import full_bag_fetch

    run = load_zoom_run(run_dir, device="cpu", weights=weights)
    bag = read_zoom_bag(bag_path)
    levels = [torch.from_numpy(np.asarray(f, np.float32)) for f in bag.features]
    with torch.no_grad():
        out = run.model(levels[0], full_bag_fetch(levels))
    probs = torch.softmax(out.logits, 0).double().numpy()
    with open_slide(bag.attrs["slide_path"], mpp=bag.attrs.get("slide_mpp")) as slide:
        path = path_of(out, slide_id, slide, bag.mpps, bag.patch, list(bag.coords))
    return path, probs


def regions(path: ZoomPath) -> np.ndarray:
    """(M, 7) boxes for :attr:`MapEvent.regions`: the chosen patches of each zoom step (role 0) and the
    patches read at each higher level with their attention scaled to [0, 1] within the level (role 1)."""
    rows = []
    for step, chosen in enumerate(path.chosen):
        s = path.size_level0(step)
        for x, y in chosen:
            rows.append((x, y, x + s, y + s, step, 1.0, 0))
    for level in range(1, len(path.coords)):
        s = path.size_level0(level)
        a = path.attention[level]
        scaled = a / a.max() if a.size and a.max() > 0 else a
        for (x, y), v in zip(path.coords[level], scaled):
            rows.append((x, y, x + s, y + s, level, float(v), 1))
    return np.asarray(rows, np.float64).reshape(-1, 7)


def zoom_map(run_dir: Path, slide_id: str, bag_path: Path, epoch: int, weights: str = "best") -> MapEvent:
    """The live layer: the lowest level's attention over the slide, the zoom path as :attr:`regions`."""
    from ..infer.heatmap import attention_heatmap, default_downsample
    from ..slide import open_slide
    from ..slide.tissue import tissue_mask

    path, probs = bag_path_of(Path(run_dir), slide_id, bag_path, weights)
    w, h = path.dims
    with open_slide(path.slide_path, mpp=path.slide_mpp) as slide:
        tissue = tissue_mask(slide)
    size = path.size_level0(0)
    ds = default_downsample(size, (h, w))
    heat = attention_heatmap(path.coords[0], path.attention[0], size, (h, w), ds, tissue=tissue)
    return MapEvent(slide_id, epoch, heat, ds, path.slide_mpp, probs, regions=regions(path))


def write_level_heatmaps(out_dir: Path, slide_id: str, run: Any, path: ZoomPath, ome_zarr: bool = False
                         ) -> list[Path]:
    """``<slide>.tif`` (the lowest level's attention, like every attention method's) and
    ``<slide>.level<l>.tif`` (the attention of the patches read at level l, zero elsewhere)."""
    from ..infer.heatmap import write_slide_heatmap

    written = []
    for level, (coords, att) in enumerate(zip(path.coords, path.attention)):
        if not len(coords):
            continue
        attrs = {"slide_path": path.slide_path, "slide_mpp": path.slide_mpp, "mpp": path.mpps[level],
                 "patch_size": path.patch}
        name = slide_id if level == 0 else f"{slide_id}.level{level}"
        written.append(write_slide_heatmap(out_dir, name, coords, att, attrs, clip_to_tissue=level == 0,
                                           ome_zarr=ome_zarr))
    return written


def level0_scores(run_dir: Path, bag_path: Path) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """(coords, patch side in level-0 px, p_tumour, slide probabilities) of the lowest level: attention
    scaled to [0, 1] times the slide's last-class probability (no instance classifier to ask)."""
    path, probs = bag_path_of(run_dir, "", bag_path)
    a = path.attention[0]
    p = (a / a.max() if a.size and a.max() > 0 else a) * float(probs[-1])
    return path.coords[0], path.size_level0(0), p, probs


__all__ = ["bag_path_of", "level0_scores", "regions", "write_level_heatmaps", "zoom_map"]
