"""Training that shows its work: engine events plus, after each checkpoint, the watched slides' maps.

The training widget runs :func:`train_with_maps` in a child process (:mod:`.subprocess_run`); a napari
worker relays its events and, on the main thread, each :class:`MapEvent`'s array goes into a layer over
the slide. Pause stops that child process with SIGSTOP (Resume continues it with SIGCONT) and Cancel
terminates it, so neither waits for a yield; checkpoints are written atomically, so a cancelled run
resumes from its last complete epoch. A caller iterating in its own process (a notebook,
``InteractiveSession.train``) can stop at the yields, one per optimiser step. The maps come from the
checkpoint just written, loaded like ``wsimil predict`` would, so what the user sees is exactly what a
prediction with that checkpoint gives — and the training loop never shares its model with another thread.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .events import ProgressEvent


@dataclass(frozen=True)
class MapEvent:
    """A map of one slide from the model after ``epoch``: ``heatmap`` float32 in [0, 1] covering the slide
    at ``downsample`` level-0 px per pixel (the slide's µm/px × downsample in napari's world)."""

    slide_id: str
    epoch: int
    heatmap: np.ndarray
    downsample: float
    slide_mpp: float | None
    probs: np.ndarray
    kind: str = "map"


@dataclass
class _Watched:
    slide_id: str
    bag_path: Path
    tissue: Any = None
    shape_hw: tuple[int, int] = (0, 0)
    slide_mpp: float | None = None


def _prepare_watch(prepared: Any, slide_ids: Sequence[str]) -> list[_Watched]:
    """Bags for the watched slides (extracted if the training set did not need them) and their tissue."""
    from .cohort import ensure_features, features_dir_for, load_cohort

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


def watch_bag(slide_id: str, bag_path: Path) -> _Watched:
    """What drawing a slide's map needs once: its bag, tissue mask, size and µm/px."""
    from ..features.bags import read_bag_attrs
    from ..slide import open_slide
    from ..slide.tissue import tissue_mask

    attrs = read_bag_attrs(bag_path)
    with open_slide(attrs["slide_path"], mpp=attrs.get("slide_mpp")) as slide:
        w, h = slide.dimensions
        return _Watched(slide_id, Path(bag_path), tissue_mask(slide), (h, w), slide.mpp)


def slide_map(run_dir: str | Path, watched: _Watched, epoch: int, weights: str = "last",
              device: str = "cpu") -> MapEvent:
    """The attention map of one watched slide from the run's ``weights`` checkpoint."""
    from ..features.bags import patch_size_level0, read_bag_attrs
    from ..infer.heatmap import attention_heatmap, default_downsample
    from ..infer.predict import load_run, predict_bag

    run = load_run(run_dir, device=device, weights=weights)
    pred = predict_bag(run, watched.slide_id, watched.bag_path)
    size = patch_size_level0({**read_bag_attrs(watched.bag_path), "slide_mpp": watched.slide_mpp})
    ds = default_downsample(size, watched.shape_hw)
    heat = attention_heatmap(pred.coords, pred.attention, size, watched.shape_hw, ds, tissue=watched.tissue)
    return MapEvent(watched.slide_id, epoch, heat, ds, watched.slide_mpp, pred.probs)


def train_with_maps(prepared: Any, watch: Sequence[str] = (), *, every: int = 1,
                    step_events: bool = True) -> Generator[ProgressEvent | MapEvent, None, Any]:
    """``engine.train`` of a :class:`~.pipeline.PreparedRun`, with a :class:`MapEvent` per watched slide
    after every ``every``-th checkpoint and after the last one. Returns the trained model."""
    from .engine import train

    if step_events and not prepared.method.config.step_events:
        prepared.method.config.step_events = 1  # a yield per step: progress per step, and in-process callers
        # can stop between steps (the widget's child process is paused by signal, not at a yield)
    if prepared.info.get("kind") == "segmentation":
        from ..seg.live import seg_maps

        maps = seg_maps(prepared, list(watch))
    else:
        watched = _prepare_watch(prepared, list(watch))
        run_dir = prepared.spec.out

        def maps(epoch: int, final: bool) -> list[MapEvent]:
            # at the end: the model 'wsimil predict' will use, best by validation loss
            return [slide_map(run_dir, w, epoch, weights="best" if final else "last") for w in watched]
    gen = train(prepared.method, prepared.spec.out, resume=prepared.spec.resume)
    while True:
        try:
            ev = next(gen)
        except StopIteration as stop:
            return stop.value
        yield ev
        if ev.kind == "checkpoint" and ev.epoch % max(1, every) == 0:
            yield from maps(ev.epoch, False)
        elif ev.kind == "done":
            yield from maps(ev.epoch, True)


__all__ = ["MapEvent", "slide_map", "train_with_maps", "watch_bag"]
