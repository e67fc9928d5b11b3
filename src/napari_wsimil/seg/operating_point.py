"""Where a probability map becomes a tumour mask: the run's operating threshold, set from benign slides.

Why not 0.5: trained from slide labels, the losses act on pooled slide logits, not on pixels, so a map ranks
pixels well without being calibrated. On the 60-slide benchmark (docs/benchmarks.md) weak-only Pinchaud puts
96 % of true tumour at p ≥ 0.99 while its false positives spread over 0.5-0.99; at 0.5 it over-segments.

Slide labels are enough to choose a better threshold, with no painted pixel: every tissue pixel of a benign
slide is normal, so the share of benign tissue at or above a threshold is the model's false-positive rate
there. The operating threshold is the lowest one that keeps that share at or below ``operating_fpr`` and is
never below 0.5 (a calibrated model keeps 0.5). It is the pixel counterpart of the target false-positive
rate θ0 from which Pinchaud's section 3.1.1 sets β1, and it is measured on the validation slides (held out
from training: training slides' false positives are optimistic), or the training slides when there is no
benign validation slide.

Maps are stored as uint8 (p · 255), so thresholds sit half-way between two stored levels: ``p ≥ t`` then
selects the same pixels on the float map and on the stored one, and 0.5 is exactly level 128.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import SegSlide

FILENAME = "operating_point.json"
FLOOR_LEVEL = 128  # (128 - 0.5) / 255 = 0.5


class LevelHistogram:
    """Counts of stored map levels (0-255) over tissue pixels: a threshold search in constant memory."""

    def __init__(self) -> None:
        self.counts = np.zeros(256, np.int64)

    def add(self, p: np.ndarray) -> None:
        levels = np.round(np.clip(np.asarray(p, np.float32), 0.0, 1.0) * 255).astype(np.int64)
        self.counts += np.bincount(levels.ravel(), minlength=256)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def share_at_or_above(self, level: int) -> float:
        return float(self.counts[level:].sum() / self.total) if self.total else math.nan


def level_threshold(level: int) -> float:
    """The probability threshold that selects stored levels ≥ ``level``."""
    return (int(level) - 0.5) / 255.0


def threshold_level(threshold: float) -> int:
    """The lowest stored map level at or above ``threshold`` (the inverse of :func:`level_threshold`)."""
    return math.ceil(float(threshold) * 255 - 1e-9)


def threshold_for_fpr(hist: LevelHistogram, fpr: float) -> tuple[float, float]:
    """(threshold, share of the histogram's pixels at or above it): the lowest level whose share is at most
    ``fpr``, and never below 0.5."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"operating_fpr is a share of benign tissue in (0, 1), got {fpr}")
    if not hist.total:
        raise ValueError("no benign tissue pixel to set a threshold on")
    tail = np.cumsum(hist.counts[::-1])[::-1] / hist.total  # tail[k] = share of pixels at level >= k
    ok = np.flatnonzero(tail[FLOOR_LEVEL:] <= fpr)
    level = FLOOR_LEVEL + int(ok[0]) if len(ok) else 256  # 256: nothing is called tumour
    return level_threshold(level), float(tail[level]) if level < 256 else 0.0


def benign_histogram(net: Any, slides: Sequence[SegSlide], mpp: float, *, margin: int, patch: int,
                     device: Any = "cpu", tile: int = 512,
                     should_stop: Callable[[], bool] | None = None) -> LevelHistogram | None:
    """The map levels of ``slides``' tissue pixels (computed tile by tile, as the maps are; none kept), or
    None when ``should_stop()`` turned true."""
    from .maps import compute_map, tissue_tile

    hist = LevelHistogram()
    tile = max(patch, tile // patch * patch)
    for slide in slides:
        def on_tile(y0: int, x0: int, p: np.ndarray, s: SegSlide = slide) -> None:
            hist.add(p[tissue_tile(s, mpp, y0, x0, *p.shape)])

        done = compute_map(net, slide, mpp, tile=tile, margin=margin, device=device, block=patch, alpha=1.0,
                           on_tile=on_tile, should_stop=should_stop)
        if done is None:
            return None
    return hist


def choose_benign_slides(train_slides: Sequence[SegSlide], val_slides: Sequence[SegSlide]
                         ) -> tuple[list[SegSlide], str]:
    """Benign validation slides, else benign training slides; and which of the two."""
    val = [s for s in val_slides if s.label == 0]
    if val:
        return val, "validation"
    return [s for s in train_slides if s.label == 0], "training"


def calibrate_run(run_dir: str | os.PathLike[str], slides: Sequence[SegSlide], fpr: float, *, source: str,
                  device: str = "auto", weights: str = "best",
                  should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
    """Set the run's operating threshold on ``slides`` (benign) with its ``weights`` and write
    ``RUN/operating_point.json``; returns what it wrote (None when stopped, or without benign tissue)."""
    from ..io.atomic import write_text
    from .nets import receptive_margin
    from .predict import load_seg_run

    run = load_seg_run(run_dir, device=device, weights=weights)
    benign = [s for s in slides if s.label == 0]
    hist = benign_histogram(run.net, benign, run.mpp, margin=receptive_margin(run.net), patch=run.patch,
                            device=run.device, should_stop=should_stop) if benign else None
    if hist is None or not hist.total:
        return None
    threshold, achieved = threshold_for_fpr(hist, fpr)
    point = {"format": 1, "threshold": threshold, "operating_fpr": fpr, "benign_fpr": achieved,
             "benign_fpr_at_0.5": hist.share_at_or_above(FLOOR_LEVEL), "benign_pixels": hist.total,
             "slides": [s.slide_id for s in benign], "source": source, "weights": weights,
             "weights_sha256": weights_digest(Path(run_dir)),
             "why": "the lowest threshold (never below 0.5) at which at most operating_fpr of these benign "
                    "slides' tissue is called tumour"}
    write_text(Path(run_dir) / FILENAME, json.dumps(point, indent=1))
    return point


def weights_digest(run: Path) -> str | None:
    """SHA-256 of the run's best weights: a threshold belongs to the weights it was set with."""
    import hashlib

    path = run / "best.safetensors"
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_operating_point(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run's operating point, or None: none was set (older runs, no benign tissue), or it was set with
    other weights than the run's best ones now (training went on after it, e.g. resumed and stopped)."""
    try:
        point = json.loads((Path(run_dir) / FILENAME).read_text())
        float(point["threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if point.get("weights_sha256") != weights_digest(Path(run_dir)):
        return None
    return point


def describe(point: dict[str, Any]) -> str:
    """One line for logs and the GUI."""
    n = point.get("n_slides", len(point["slides"]))  # a federated run names no slide: they stay at the sites
    return (f"operating threshold {point['threshold']:.3f}: {100 * point['benign_fpr']:.2g} % of "
            f"{n} benign {point['source']} slides' tissue"
            + (f" at {point['sites']} sites" if point.get("sites") else "") + " called tumour (target ≤ "
            f"{100 * point['operating_fpr']:.2g} %; {100 * point['benign_fpr_at_0.5']:.2g} % at 0.5)")


__all__ = ["FILENAME", "LevelHistogram", "benign_histogram", "calibrate_run", "choose_benign_slides", "describe",
           "level_threshold", "read_operating_point", "threshold_for_fpr", "threshold_level", "weights_digest"]
