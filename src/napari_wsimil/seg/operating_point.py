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

Why a second rule, from painted validation pixels (``operating_rule``): a map trained with a Dice loss (FedMix)
or from much paint is saturated: its benign false positives sit at p ≈ 0.99-1.00 together with its tumour, so
the benign-FPR rule puts the threshold at 0.99-1.00, or above 1 (nothing called tumour), and throws away a map
that segments well at 0.5 (issue 18: FedMix's Dice 0.00-0.30 at that threshold against 0.60-0.79 at 0.5).
Where the validation slides carry painted pixels, the threshold can instead be the one that segments those
pixels best: the stored level, never below 0.5, that maximises their pooled pixel Dice
(:func:`threshold_for_val_dice`), from the same counts that choose the checkpoint. It stays at 0.5 or above
because the painted validation patches over-sample tumour (half of them are centred on it), which pulls a
Dice-optimal threshold down. ``auto`` (the default) uses it whenever those pixels include some known tumour,
and the benign-FPR rule otherwise (slide labels only, e.g. weak-only Pinchaud), for centralised and federated
runs alike (:func:`choose_threshold`).

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
RULES = ("auto", "benign-fpr", "val-dice")
WHY = {"benign-fpr": "the lowest threshold (never below 0.5) at which at most operating_fpr of the benign slides' "
                     "tissue is called tumour",
       "val-dice": "the threshold (never below 0.5) that maximises pooled pixel Dice on the painted validation "
                   "pixels (benign validation tissue counting as normal): a saturated map's benign false positives "
                   "sit with its tumour near p = 1, where the benign-FPR rule would throw the map away"}


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


def dice_at_level(tumour: np.ndarray, normal: np.ndarray, level: int) -> float:
    """Pooled pixel Dice of ``p ≥ level_threshold(level)`` from the level histograms of known tumour and known
    normal pixels (1 when there is nothing to find and nothing is found)."""
    tp, fn, fp = float(tumour[level:].sum()), float(tumour[:level].sum()), float(normal[level:].sum())
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def threshold_for_val_dice(tumour: np.ndarray, normal: np.ndarray) -> tuple[float, float]:
    """(threshold, pooled pixel Dice there): the stored level at or above 0.5 whose Dice on the painted
    validation pixels is highest (the lowest such level on a tie), from their level histograms."""
    t, n = np.asarray(tumour, np.float64), np.asarray(normal, np.float64)
    if t.shape != (256,) or n.shape != (256,):
        raise ValueError("the painted validation counts are 256-level histograms")
    if not t.sum() > 0:
        raise ValueError("no known tumour pixel among the painted validation pixels: Dice cannot choose a threshold")
    tp = np.cumsum(t[::-1])[::-1]  # tp[k]: tumour pixels at level >= k
    fp = np.cumsum(n[::-1])[::-1]
    levels = np.arange(FLOOR_LEVEL, 256)
    dice = 2 * tp[levels] / (t.sum() + tp[levels] + fp[levels])
    best = int(levels[int(np.argmax(dice))])
    return level_threshold(best), float(dice.max())


def choose_threshold(rule: str, fpr: float, benign: LevelHistogram | None = None,
                     painted: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """The operating threshold by ``rule`` (module doc) and what to record of it: the rule used and why, the
    benign share called tumour there and at 0.5, the pooled validation Dice there and at 0.5, and the
    threshold the other rule would have given. ``benign``: benign tissue's level histogram; ``painted``: the
    (tumour, normal) level histograms of the painted validation pixels. Raises ValueError when ``rule`` cannot
    be applied (nothing to set it on)."""
    if rule not in RULES:
        raise ValueError(f"operating_rule is one of {', '.join(RULES)}, not {rule!r}")
    has_benign = benign is not None and benign.total > 0
    has_tumour = painted is not None and float(np.sum(painted[0])) > 0
    used = rule if rule != "auto" else "val-dice" if has_tumour else "benign-fpr"
    out: dict[str, Any] = {"rule": used, "operating_rule": rule}
    fpr_threshold = None
    if has_benign and 0.0 < fpr < 1.0:
        fpr_threshold, achieved = threshold_for_fpr(benign, fpr)  # type: ignore[arg-type]
    if used == "benign-fpr":
        if fpr_threshold is None:
            raise ValueError("no benign tissue pixel to set a threshold on" if not has_benign
                             else f"operating_fpr is a share of benign tissue in (0, 1), got {fpr}")
        out.update(threshold=fpr_threshold,
                   why=WHY["benign-fpr"] + ("" if rule == "benign-fpr" else
                                            "; chosen because no painted validation pixel is tumour"))
    else:
        if not has_tumour:
            raise ValueError("operating_rule 'val-dice' needs painted validation pixels with some tumour; there "
                             "are none")
        threshold, _ = threshold_for_val_dice(*painted)  # type: ignore[misc]
        out.update(threshold=threshold, why=WHY["val-dice"])
    out["operating_fpr"] = fpr
    if has_benign:
        assert benign is not None
        level = threshold_level(out["threshold"])
        out.update(benign_fpr=benign.share_at_or_above(level) if level < 256 else 0.0,
                   **{"benign_fpr_at_0.5": benign.share_at_or_above(FLOOR_LEVEL)}, benign_pixels=benign.total)
        if fpr_threshold is not None:
            out["benign_fpr_threshold"] = fpr_threshold
    if painted is not None:
        t, n = (np.asarray(h, np.float64) for h in painted)
        out.update(val_pixel_dice_at_threshold=dice_at_level(t, n, threshold_level(out["threshold"])),
                   **{"val_pixel_dice_at_0.5": dice_at_level(t, n, FLOOR_LEVEL)},
                   val_tumour_pixels=int(t.sum()), val_normal_pixels=int(n.sum()))
    return out


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
                  device: str = "auto", weights: str = "best", rule: str = "benign-fpr",
                  painted: Callable[[Any, Any], tuple[Any, Any] | None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
    """Set the run's operating threshold with its ``weights`` by ``rule`` (:func:`choose_threshold`) and write
    ``RUN/operating_point.json``; returns what it wrote (None when stopped, or with nothing to set it on).
    ``slides``: the benign slides of the benign-FPR rule; ``painted(net, device)``: the (tumour, normal)
    :class:`LevelHistogram` of the painted validation pixels under ``net``, or None (the family's
    ``painted_val_levels``)."""
    from ..io.atomic import write_text
    from .nets import receptive_margin
    from .predict import load_seg_run

    run = load_seg_run(run_dir, device=device, weights=weights)
    levels = painted(run.net, run.device) if painted is not None and rule != "benign-fpr" else None
    pair = (levels[0].counts, levels[1].counts) if levels is not None else None
    benign = [s for s in slides if s.label == 0]
    hist = benign_histogram(run.net, benign, run.mpp, margin=receptive_margin(run.net), patch=run.patch,
                            device=run.device, should_stop=should_stop) if benign else None
    if benign and hist is None:
        return None  # stopped
    if (hist is None or not hist.total) and (pair is None or not pair[0].sum() > 0):
        return None  # nothing to set it on
    chosen = choose_threshold(rule, fpr, hist, pair)  # ValueError: the rule asked for cannot be applied here
    point = {"format": 1, **chosen, "slides": [s.slide_id for s in benign], "source": source, "weights": weights,
             "weights_sha256": weights_digest(Path(run_dir))}
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
    n = point.get("n_slides", len(point.get("slides", [])))  # a federated run names no slide: they stay at the sites
    sites = f" at {point['sites']} sites" if point.get("sites") else ""
    if point.get("rule") == "val-dice":
        fpr = (f"; {100 * point['benign_fpr']:.2g} % of {n} benign {point['source']} slides' tissue{sites} called "
               f"tumour" if "benign_fpr" in point else "")
        other = (f"; the benign-FPR rule would give {point['benign_fpr_threshold']:.3f}"
                 if "benign_fpr_threshold" in point else "")
        return (f"operating threshold {point['threshold']:.3f} (best pooled Dice on the painted validation pixels: "
                f"{point['val_pixel_dice_at_threshold']:.3f}, {point['val_pixel_dice_at_0.5']:.3f} at 0.5)"
                + fpr + other)
    return (f"operating threshold {point['threshold']:.3f}: {100 * point['benign_fpr']:.2g} % of "
            f"{n} benign {point['source']} slides' tissue" + sites + " called tumour (target ≤ "
            f"{100 * point['operating_fpr']:.2g} %; {100 * point['benign_fpr_at_0.5']:.2g} % at 0.5)")


__all__ = ["FILENAME", "RULES", "LevelHistogram", "benign_histogram", "calibrate_run", "choose_benign_slides",
           "choose_threshold", "describe", "dice_at_level", "level_threshold", "read_operating_point",
           "threshold_for_fpr", "threshold_for_val_dice", "threshold_level", "weights_digest"]
