"""Live probability maps for the training widget: what the mapping worker has drawn so far.

During training a watched slide that is a training slide shows the mapping worker's latest map (free:
it is on disk already, written with weights at most ``map_staleness`` epochs old). Other watched slides,
and every watched slide once training is done, are mapped with the checkpoint itself, like ``wsimil
predict`` would. Maps are read with a stride so the layer stays at most ``max_side`` pixels a side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..train.events import MapEvent


def read_map(zarr_path: Path, slide_id: str, epoch: int, slide_mpp: float | None, max_side: int = 2048
             ) -> MapEvent | None:
    """A strided view of a map zarr as a :class:`MapEvent` (None while the map does not exist yet)."""
    from ..io.raster_store import LabelStore, exists

    if not exists(zarr_path):
        return None
    store = LabelStore.open(zarr_path, readonly=True)
    h, w = store.shape
    stride = max(1, int(np.ceil(max(h, w) / max_side)))
    rows, cols = np.arange(0, h, stride), np.arange(0, w, stride)
    heat = store.read_points(rows, cols).astype(np.float32) / 255.0
    ds = float(store.attrs.get("downsample", 1.0)) * stride
    p = float(heat.max()) if heat.size else 0.0
    return MapEvent(slide_id, epoch, heat, ds, slide_mpp, np.array([1.0 - p, p]), kind="probability")


def checkpoint_map(run_dir: Path, slide_id: str, epoch: int, weights: str = "best",
                   source: str | Path | None = None) -> MapEvent | None:
    """Map ``slide_id`` with the run's checkpoint into ``RUN/maps`` and return it. The slide is looked up in the
    run's cohort, else in ``source`` (a federated run has no cohort: its slides stay at the sites)."""
    from ..train.cohort import load_cohort
    from .data import open_seg_slides
    from .predict import load_seg_run, map_slide

    run = load_seg_run(run_dir, device="cpu", weights=weights)
    where = run.info.get("cohort") or source
    if where is None:
        return None
    cohort = load_cohort(where)
    items = [s for s in cohort.slides if s.slide_id == slide_id]
    if not items:
        return None
    slide, = open_seg_slides(cohort, items, run.info.get("classes") or ["0", "1"], with_labels=False)
    try:
        m = map_slide(run, slide, Path(run_dir), tiff=False)
        return read_map(m.zarr_path, slide_id, epoch, slide.slide_mpp)
    finally:
        slide.close()


def seg_maps(prepared: Any, watch: Sequence[str]) -> Callable[[int, bool], list[MapEvent]]:
    """The maps of ``watch`` after a checkpoint (``final``: after training, from the best checkpoint)."""
    run = Path(prepared.spec.out)
    mapped = {s.slide_id: s.slide_mpp for s in prepared.method.train_slides}

    def maps(epoch: int, final: bool) -> list[MapEvent]:
        out = []
        for sid in watch:
            if final:
                m = checkpoint_map(run, sid, epoch)
            elif sid in mapped:  # the mapping worker's latest map: free
                m = read_map(run / "maps" / f"{sid}.zarr", sid, epoch, mapped[sid])
            else:
                m = checkpoint_map(run, sid, epoch, weights="last")
            if m is not None:
                out.append(m)
        return out

    return maps


__all__ = ["checkpoint_map", "read_map", "seg_maps"]
