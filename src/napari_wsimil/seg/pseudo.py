"""Pseudo-labels from probability maps, as a label set of their own in the project.

A segmentation run's map becomes an editable label image at the project's label resolution: tumour where
p ≥ ``high``, normal where tissue has p ≤ ``low``, unlabelled in between. It is written to
``PROJECT/pseudo_labels/<run>/<slide_id>.zarr`` (the same zarr format as painted labels, so napari shows it
as a Labels layer and export works on it), never over the user's paint. What the user changes on it is
saved as paint (:meth:`~napari_wsimil.workflow.session.InteractiveSession.save_corrections`), and paint is a
strong label for every method's next round: Hybrid's fine patches, ConfKD's teacher, Pinchaud's pixel CE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError


def label_set_path(project_root: Path, run_name: str, slide_id: str) -> Path:
    return Path(project_root) / "pseudo_labels" / run_name / f"{slide_id}.zarr"


def map_to_labels(map_store: Any, map_downsample: float, shape: tuple[int, int], downsample: float,
                  tissue: Any, tumour_id: int, normal_id: int, high: float = 0.5, low: float = 0.2) -> np.ndarray:
    """The map (zarr, uint8 p·255 at ``map_downsample``) resampled (pixel centres) onto a label grid."""
    mh, mw = map_store.shape
    rows = np.clip(((np.arange(shape[0]) + 0.5) * downsample / map_downsample).astype(np.int64), 0, mh - 1)
    cols = np.clip(((np.arange(shape[1]) + 0.5) * downsample / map_downsample).astype(np.int64), 0, mw - 1)
    out = np.zeros(shape, np.uint8)
    for y0 in range(0, shape[0], 512):  # band by band: the map is read once, a band of rows at a time
        r = rows[y0:y0 + 512]
        p = map_store.read_points(r, cols).astype(np.float32) / 255.0
        t = tissue.mask[np.ix_(np.clip(((np.arange(y0, y0 + len(r)) + 0.5) * downsample / tissue.downsample)
                                       .astype(np.int64), 0, tissue.mask.shape[0] - 1),
                               np.clip(((np.arange(shape[1]) + 0.5) * downsample / tissue.downsample)
                                       .astype(np.int64), 0, tissue.mask.shape[1] - 1))]
        band = out[y0:y0 + len(r)]
        band[p >= high] = tumour_id
        band[(p <= low) & t] = normal_id
    return out


def write_pseudo_labels(project: Any, run_dir: Path, slide_id: str, tumour_id: int, normal_id: int,
                        high: float = 0.5, low: float = 0.2) -> tuple[Path, np.ndarray]:
    """Pseudo-labels of ``slide_id`` from ``run_dir``'s latest map, saved as the run's label set; the
    user's paint wins where there is some. Returns (path, labels)."""
    from ..io.raster_store import LabelStore, exists
    from ..slide.tissue import tissue_mask

    run_dir = Path(run_dir)
    zpath = run_dir / "maps" / f"{slide_id}.zarr"
    if not exists(zpath):
        raise WsimilError(f"run {run_dir.name} has no map of {slide_id} yet: train it (or map it) first")
    store = LabelStore.open(zpath, readonly=True)
    geometry = project.label_geometry(slide_id)
    with project.open_slide(slide_id) as slide:
        tissue = tissue_mask(slide)
    labels = map_to_labels(store, float(store.attrs["downsample"]), geometry.shape, geometry.downsample, tissue,
                           tumour_id, normal_id, high, low)
    painted = project.pixel_labels(slide_id)
    labels = np.where(painted > 0, painted, labels).astype(np.uint8)
    path = label_set_path(project.root, run_dir.name, slide_id)
    if exists(path):
        out = LabelStore.open(path)
    else:
        out = LabelStore.create(path, geometry, {"slide_id": slide_id, "kind": "wsimil pseudo-labels",
                                                 "run": run_dir.name, "downsample": geometry.downsample,
                                                 "mpp": geometry.mpp, "high": high, "low": low})
    out.write_all(labels)
    return path, labels


def map_patch_scores(zarr_path: Path, patch: int) -> Any:
    """Patch-sized blocks of a map as :class:`~napari_wsimil.infer.pseudo_labels.PatchScores` (block maximum),
    so "where to label next" works the same for segmentation runs as for MIL runs."""
    from ..infer.pseudo_labels import PatchScores
    from ..io.raster_store import LabelStore

    store = LabelStore.open(zarr_path, readonly=True)
    d = float(store.attrs["downsample"])
    h, w = store.shape
    coords, scores = [], []
    for y0 in range(0, h, 512 // patch * patch or patch):
        band = store.read_block(y0, min(h, y0 + (512 // patch * patch or patch)), 0, w).astype(np.float32) / 255
        for by in range(0, band.shape[0], patch):
            row = band[by:by + patch]
            for bx in range(0, w, patch):
                m = float(row[:, bx:bx + patch].max())
                if m > 0:  # tissue (the map is 0 off tissue)
                    coords.append((bx * d, (y0 + by) * d))
                    scores.append(m)
    p = np.asarray(scores, np.float64)
    top = float(p.max()) if len(p) else 0.0
    return PatchScores(np.asarray(coords, np.float64).reshape(-1, 2), patch * d, p, np.array([1 - top, top]),
                       "segmentation map (block maximum)")


__all__ = ["label_set_path", "map_patch_scores", "map_to_labels", "write_pseudo_labels"]
