"""Probability maps from a trained segmentation run: zarr while computing, a pyramidal TIFF to keep.

``wsimil predict`` on a segmentation run writes, per slide, ``PRED/maps/<slide_id>.tif`` (grey uint8 =
p · 255 at the run's µm/px, described so that napari-wsimil's reader overlays it on the slide) and a row
of ``predictions.csv``: ``prob_1`` is the slide score (the maximum pixel probability, Pinchaud's choice,
or the mean of the top-K patch probabilities), ``prob_0 = 1 − prob_1``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError
from .data import SegSlide
from .maps import compute_map


@dataclass
class SegRun:
    """A segmentation run ready to map: its net in eval mode, run.json and the engine's config."""

    net: Any
    method: str
    info: dict[str, Any]
    config: dict[str, Any]
    device: Any

    @property
    def mpp(self) -> float:
        return float(self.info["mpp"])

    @property
    def patch(self) -> int:
        return int(self.info["patch"])


def is_segmentation_run(run_dir: str | os.PathLike[str]) -> bool:
    try:
        return json.loads((Path(run_dir) / "run.json").read_text()).get("kind") == "segmentation"
    except (OSError, ValueError):
        return False


def load_seg_run(run_dir: str | os.PathLike[str], device: str = "auto", weights: str = "best") -> SegRun:
    from ..train.checkpoints import load_checkpoint_weights
    from ..train.registry import saved_config
    from .nets import BranchNet, build_net

    run = Path(run_dir)
    try:
        info = json.loads((run / "run.json").read_text())
        state = json.loads((run / "last.json").read_text())
    except (OSError, ValueError) as exc:
        raise WsimilError(f"{run} is not a finished or running segmentation run: {exc}") from exc
    name = info["method"]
    cfg = saved_config(name, state)
    net = build_net(cfg, dual=name == "confkd")
    dev = load_checkpoint_weights(run, net, weights, device)
    if name == "confkd":
        net = BranchNet(net, getattr(cfg, "predict_with", "student")).eval()
    return SegRun(net, name, info, state.get("config", {}), dev)


@dataclass
class SlideMap:
    slide_id: str
    score_max: float
    score_topk: float
    zarr_path: Path
    tiff_path: Path | None


def map_slide(run: SegRun, slide: SegSlide, out_dir: Path, *, tile: int = 512, top_k: int = 8,
              tiff: bool = True, extra: dict[str, Any] | None = None, ome_zarr: bool = False) -> SlideMap:
    """Map one slide; scores from the map (max pixel; top-K mean of per-patch maxima). ``extra`` goes into
    the TIFF's description (e.g. the run's operating threshold); ``ome_zarr`` also writes
    ``maps/<slide>.ome.zarr`` (NGFF 0.4) beside the TIFF."""
    from .nets import receptive_margin

    zpath = out_dir / "maps" / f"{slide.slide_id}.zarr"
    block_max: dict[tuple[int, int], float] = {}
    patch = run.patch

    def on_tile(y0: int, x0: int, p: np.ndarray) -> None:
        h, w = p.shape
        for by in range(0, h, patch):
            for bx in range(0, w, patch):
                block_max[((y0 + by) // patch, (x0 + bx) // patch)] = float(p[by:by + patch, bx:bx + patch].max())

    tile = max(patch, tile // patch * patch)
    compute_map(run.net, slide, run.mpp, tile=tile, margin=receptive_margin(run.net), device=run.device,
                out=zpath, block=patch, alpha=1.0, on_tile=on_tile)
    vals = np.sort(np.asarray(list(block_max.values()) or [0.0]))[::-1]
    tpath = None
    if tiff:
        tpath = write_map_tiff(zpath, out_dir / "maps" / f"{slide.slide_id}.tif", slide, run.mpp,
                               {"method": run.method, "run_mpp": run.mpp, **(extra or {})}, ome_zarr=ome_zarr)
    return SlideMap(slide.slide_id, float(vals[0]), float(vals[:top_k].mean()), zpath, tpath)


def write_map_tiff(zarr_path: Path, path: Path, slide: SegSlide, mpp: float, extra: dict[str, Any] | None = None,
                   ome_zarr: bool = False) -> Path:
    """The zarr map as a pyramidal grey OME-TIFF with its µm/px, tile by tile (never whole in memory)."""
    from ..infer.heatmap import heatmap_meta
    from ..io.atomic import write_text
    from ..io.raster_store import LabelStore
    from ..slide.tiff_writer import TILE, write_pyramid

    store = LabelStore.open(zarr_path, readonly=True)
    h, w = store.shape
    meta = heatmap_meta(slide.slide_mpp, slide.downsample(mpp), {"slide_id": slide.slide_id,
                                                                  "map": "malignant probability", **(extra or {})})

    def tile(ty: int, tx: int) -> np.ndarray:
        return store.read_block(ty * TILE, min(h, (ty + 1) * TILE), tx * TILE, min(w, (tx + 1) * TILE))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    write_pyramid(tmp, (h, w), tile, channels=1, mpp=meta["mpp"], description=json.dumps(meta),
                  compression="zlib", resample="mean", workers=1, ome=True, name=f"{slide.slide_id} probability")
    os.replace(tmp, path)
    write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))
    if ome_zarr:
        from ..infer.heatmap import ngff_path
        from ..io.ngff import write_ngff

        write_ngff(ngff_path(path), (h, w), lambda y0, y1: store.read_block(y0, y1, 0, w), mpp=meta["mpp"],
                   name=f"{slide.slide_id} probability", resample="mean", attrs={"wsimil": meta})
    return path


def remove_zarr(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


__all__ = ["SegRun", "SlideMap", "is_segmentation_run", "load_seg_run", "map_slide", "write_map_tiff"]
