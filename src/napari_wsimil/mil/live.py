"""Attention maps of watched slides, from the checkpoint just written: the MIL family's live layer.

The maps come from the checkpoint loaded like ``wsimil predict`` would load it, so what the user sees is
exactly what a prediction with that checkpoint gives — and the training loop never shares its model
with another thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..train.events import MapEvent


@dataclass
class WatchedSlide:
    """What drawing a slide's map needs, read once: its bag, tissue mask, size and µm/px."""

    slide_id: str
    bag_path: Path
    tissue: Any = None
    shape_hw: tuple[int, int] = (0, 0)
    slide_mpp: float | None = None


def watch_bag(slide_id: str, bag_path: Path) -> WatchedSlide:
    """A :class:`WatchedSlide` of a slide's feature bag (opens the slide once for its tissue mask)."""
    from ..features.bags import read_bag_attrs
    from ..slide import open_slide
    from ..slide.tissue import tissue_mask

    attrs = read_bag_attrs(bag_path)
    with open_slide(attrs["slide_path"], mpp=attrs.get("slide_mpp")) as slide:
        w, h = slide.dimensions
        return WatchedSlide(slide_id, Path(bag_path), tissue_mask(slide), (h, w), slide.mpp)


def watch_prepared(prepared: Any, slide_ids: Sequence[str]) -> list[WatchedSlide]:
    """Bags for the watched slides (extracted if the training set did not need them) and their tissue."""
    from ..train.cohort import ensure_features, features_dir_for, load_cohort

    spec = prepared.spec
    missing = [sid for sid in slide_ids if sid not in prepared.bags]
    bags = dict(prepared.bags)
    if missing:
        cohort = load_cohort(spec.source)
        items = [s for s in cohort.slides if s.slide_id in missing]
        bags.update(ensure_features(items, features_dir_for(cohort, spec.out, spec.encoder), spec.encoder,
                                    spec.patch, spec.mpp, device=spec.device, weights=spec.weights,
                                    project=cohort.source if cohort.is_project else None))
    return [watch_bag(sid, bags[sid]) for sid in slide_ids if sid in bags]


def slide_map(run_dir: str | Path, watched: WatchedSlide, epoch: int, weights: str = "last",
              device: str = "cpu") -> MapEvent:
    """The attention map of one watched slide from the run's ``weights`` checkpoint."""
    from ..features.bags import patch_size_level0, read_bag_attrs
    from ..infer.heatmap import attention_heatmap, default_downsample
    from .predict import load_run, predict_bag

    run = load_run(run_dir, device=device, weights=weights)
    pred = predict_bag(run, watched.slide_id, watched.bag_path)
    size = patch_size_level0({**read_bag_attrs(watched.bag_path), "slide_mpp": watched.slide_mpp})
    ds = default_downsample(size, watched.shape_hw)
    heat = attention_heatmap(pred.coords, pred.attention, size, watched.shape_hw, ds, tissue=watched.tissue)
    return MapEvent(watched.slide_id, epoch, heat, ds, watched.slide_mpp, pred.probs)


__all__ = ["WatchedSlide", "slide_map", "watch_bag", "watch_prepared"]
