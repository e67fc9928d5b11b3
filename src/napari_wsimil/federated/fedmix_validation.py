"""FedMix's checkpoint choice and operating threshold, from numbers the sites measure on their own slides.

The server holds no slide, so it cannot validate a global model itself. Each site that holds validation slides
measures the global nets it is sent, on its own held-out slides, and returns numbers only (:func:`site_numbers`):

- ``val_loss`` (the segmentation family's validation loss) and ``n_val`` (its validation slides);
- ``val_tumour_LNNN`` / ``val_normal_LNNN``: how many known tumour / normal pixels of its painted validation
  patches (plus its benign validation patches' tissue, all normal) the global net A puts at each stored map level
  NNN = round(p · 255); TP, FP and FN at any threshold follow (``p ≥ 0.5`` is exactly level ≥ 128). A site
  without painted validation slides sends its benign validation patches' levels too (tumour all zero): a
  centralised run pools every benign validation slide's tissue as normal, so the summed counts must too, or the
  pooled Dice (and the threshold it chooses) would see only the painted sites' benign tissue;
- on request (the chosen checkpoint, once): ``benign_LNNN``, the map levels of all tissue pixels of its benign
  validation slides (else benign training slides, the centralised rule), and ``benign_slides``.

The server sums them over sites (:func:`summarise`): pooled pixel Dice at 0.5 (as if all sites' painted pixels
were one validation set), the slides-weighted validation loss, and from the summed benign histogram the
operating threshold by the centralised rule and the same code
(:func:`~napari_wsimil.seg.operating_point.choose_threshold`, ``operating_rule``: with 'auto', the threshold
≥ 0.5 of best pooled Dice on the summed painted validation counts when some is tumour, else the lowest threshold,
never below 0.5, that calls at most ``operating_fpr`` of the summed benign tissue tumour).
:class:`BestRound` keeps the round to use (lowest ``select``: 1 − pooled Dice when some site has painted
validation pixels and ``checkpoint_by`` is 'auto', else the validation loss; the centralised engine's rule),
writes it as ``best.safetensors`` and, at the end, ``operating_point.json``, where ``wsimil predict``,
``evaluate`` and mask export read a centralised run's threshold.

Why histograms rather than one Dice per site: Dice does not add up over sites, counts do; and the threshold
needs the pooled distribution of benign tissue, which a per-site threshold cannot give.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LEVELS = 256
KINDS = ("val_tumour", "val_normal", "benign")


def level_key(kind: str, level: int) -> str:
    return f"{kind}_L{level:03d}"


def histogram_numbers(kind: str, counts: np.ndarray) -> dict[str, float]:
    """A 256-level histogram as single numbers (what a Flower MetricRecord carries)."""
    return {level_key(kind, k): float(c) for k, c in enumerate(np.asarray(counts, np.int64))}


def read_histogram(metrics: Mapping[str, float], kind: str, prefix: str = "") -> np.ndarray | None:
    keys = [prefix + level_key(kind, k) for k in range(LEVELS)]
    if keys[0] not in metrics:
        return None
    return np.asarray([metrics.get(k, 0.0) for k in keys], np.float64)


# ------------------------------------------------------------------------------------------------ the site
def site_numbers(seg: Any, net: Any, device: Any, *, benign: bool = False,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """What a site measures of ``net`` (global net A) on its held-out slides; numbers only (module doc).
    Empty without validation slides (and, with ``benign``, without benign tissue)."""
    from ..seg.nets import receptive_margin
    from ..seg.operating_point import benign_histogram, choose_benign_slides

    out: dict[str, float] = {}
    if seg.val_slides:
        res = seg.evaluate(net, device)
        if res is not None:
            losses, metrics = res
            out.update(val_loss=float(losses["total"]), n_val=float(len(seg.val_slides)),
                       **{f"val_{k}" if not k.startswith("val_") else k: float(v) for k, v in metrics.items()})
        levels = seg.painted_val_levels(net, device, benign_alone=True)  # without paint: benign tissue only
        if levels is not None:
            out.update(histogram_numbers("val_tumour", levels[0].counts))
            out.update(histogram_numbers("val_normal", levels[1].counts))
    if benign:
        slides, source = choose_benign_slides(seg.train_slides, seg.val_slides)
        hist = benign_histogram(net, slides, seg.mpp, margin=receptive_margin(net), patch=seg.patch,
                                device=device, should_stop=should_stop) if slides else None
        if hist is not None and hist.total:
            out.update(histogram_numbers("benign", hist.counts))
            out.update(benign_slides=float(len(slides)), benign_from_validation=float(source == "validation"))
    return {k: v for k, v in out.items() if math.isfinite(v)}


# ---------------------------------------------------------------------------------------------- the server
def dice_at(tumour: np.ndarray, normal: np.ndarray, level: int) -> float:
    from ..seg.operating_point import dice_at_level

    return dice_at_level(tumour, normal, level)


def summarise(site_metrics: Sequence[Mapping[str, float]], *, operating_fpr: float, checkpoint_by: str = "auto",
              prefix: str = "", operating_rule: str = "auto") -> dict[str, Any] | None:
    """The sites' numbers (``prefix``-named in their metrics) summed into one validation of a global model, or
    None when no site measured anything. Holds no histogram: it is what run.json records per round. Its
    threshold follows ``operating_rule`` exactly as a centralised run's
    (:func:`~napari_wsimil.seg.operating_point.choose_threshold` on the summed counts: pooled Dice on the sites'
    painted validation pixels when some is tumour and the rule allows it, else the summed benign histogram)."""
    from ..seg.operating_point import FLOOR_LEVEL, LevelHistogram, choose_threshold, threshold_level

    out: dict[str, Any] = {}
    measured = [m for m in site_metrics if prefix + "val_loss" in m]
    t = n_ = None
    if measured:
        n = [max(float(m.get(prefix + "n_val", 1.0)), 0.0) for m in measured]
        losses = [float(m[prefix + "val_loss"]) for m in measured]
        out.update(sites=len(measured), val_slides=int(sum(n)),
                   val_loss=float(np.average(losses, weights=n)) if sum(n) > 0 else float(np.mean(losses)))
        tumour = [h for m in measured if (h := read_histogram(m, "val_tumour", prefix)) is not None]
        normal = [h for m in measured if (h := read_histogram(m, "val_normal", prefix)) is not None]
        if tumour and normal and float(np.sum(tumour)) > 0:  # Dice needs some known tumour pixel somewhere
            t, n_ = np.sum(tumour, 0), np.sum(normal, 0)
            out.update(val_pixel_dice=dice_at(t, n_, FLOOR_LEVEL), painted_sites=int(sum(bool(h.sum() > 0) for h in tumour)),
                       val_tumour_pixels=int(t.sum()), val_normal_pixels=int(n_.sum()))
        by_dice = "val_pixel_dice" in out and checkpoint_by == "auto"
        out["select_by"] = "1 - val_pixel_dice" if by_dice else "val_loss"
        out["select"] = 1.0 - out["val_pixel_dice"] if by_dice else out["val_loss"]
    benign = [(h, m) for m in site_metrics if (h := read_histogram(m, "benign", prefix)) is not None]
    hist = LevelHistogram()
    if benign:
        hist.counts = np.sum([h for h, _ in benign], 0).round().astype(np.int64)
    painted = (t, n_) if t is not None and n_ is not None else None
    if operating_fpr > 0 and (hist.total or (painted is not None and operating_rule != "benign-fpr")):
        try:  # the centralised rule on the summed counts (seg.operating_point.choose_threshold)
            point = choose_threshold(operating_rule, operating_fpr, hist if hist.total else None, painted)
        except ValueError:
            point = None  # e.g. 'val-dice' asked for and no painted tumour pixel at any site
        if point is not None:
            out.update(threshold=point["threshold"], operating_fpr=operating_fpr, rule=point["rule"],
                       operating_rule=operating_rule, why=point["why"])
            if hist.total:
                out.update(benign_fpr=point["benign_fpr"], benign_fpr_at_0_5=point["benign_fpr_at_0.5"],
                           benign_fpr_threshold=point.get("benign_fpr_threshold"), benign_pixels=hist.total,
                           benign_slides=int(sum(m.get(prefix + "benign_slides", 0.0) for _, m in benign)),
                           benign_sites=len(benign),
                           benign_source="validation" if all(m.get(prefix + "benign_from_validation", 0.0) == 1.0
                                                             for _, m in benign) else "validation or training")
            if painted is not None:
                out["val_pixel_dice_at_threshold"] = dice_at(t, n_, threshold_level(point["threshold"]))
    return out or None


def numbers_only(metrics: Mapping[str, float]) -> dict[str, float]:
    """A site's metrics without its histograms (what run.json keeps per site)."""
    return {k: v for k, v in metrics.items() if not any(f"{kind}_L" in k for kind in KINDS)}


class BestRound:
    """The round whose global model is the run's (module doc). ``prior``: run.json's ``best``, on resume.

    Both round loops use it the same way (:func:`~napari_wsimil.federated.fedmix.run_local` in one process,
    :func:`~napari_wsimil.federated.rounds.run_server` over Flower): in round r each site measures the global
    model it receives (round r-1's) before training (``global_*`` metrics) -> :meth:`after_round`; after the last
    round the sites are asked to measure the last model, with their benign tissue -> :meth:`finish`."""

    def __init__(self, out: Path, method: Any, config: Any, prior: Mapping[str, Any] | None = None):
        self.out, self.method, self.config = Path(out), method, config
        self.best: dict[str, Any] | None = dict(prior) if prior else None

    def _summarise(self, metrics: Sequence[Mapping[str, float]], prefix: str = "") -> dict[str, Any] | None:
        return summarise(metrics, operating_fpr=float(self.config.operating_fpr),
                         checkpoint_by=str(self.config.checkpoint_by), prefix=prefix,
                         operating_rule=str(getattr(self.config, "operating_rule", "auto")))

    def offer(self, arrays: Any, server_round: int, summary: Mapping[str, Any] | None) -> bool:
        """Keep round ``server_round`` when its summed validation beats the best so far (same criterion only:
        a loss is not compared with a Dice)."""
        if summary is None or "select" not in summary:
            return False
        b = self.best
        if b is not None and b.get("select_by") == summary["select_by"] and not summary["select"] < b["select"]:
            return False
        if b is not None and b.get("select_by") == "1 - val_pixel_dice" and summary["select_by"] == "val_loss":
            return False  # a Dice-chosen round is not replaced by a loss-chosen one (a painted site dropped out)
        self._write(arrays, server_round, {"select": float(summary["select"]), "select_by": summary["select_by"]})
        return True

    def _write(self, arrays: Any, server_round: int, why: dict[str, Any]) -> None:
        self.method.write_best(self.out, arrays, server_round)
        (self.out / OPERATING_POINT).unlink(missing_ok=True)  # it belonged to the previous best weights
        self.best = {"round": int(server_round), **why}

    def after_round(self, previous: Any, server_round: int, metrics: Sequence[Mapping[str, float]]
                    ) -> dict[str, Any] | None:
        """Round ``server_round``'s replies measured round ``server_round - 1``'s global model (``previous``)."""
        if server_round <= 1:
            return None  # round 1's sites received the initial, untrained nets
        summary = self._summarise(metrics, "global_")
        self.offer(previous, server_round - 1, summary)
        return summary

    def finish(self, last: Any, rounds: int, measure: Callable[[Any], Sequence[Mapping[str, float]]]
               ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """After the last round: the sites measure the last model (``measure(arrays)`` -> their metrics, with the
        benign histograms), it competes, and the best model's operating threshold is written. Returns (the last
        model's summary, the operating point or None)."""
        summary = self._summarise(measure(last))
        self.offer(last, rounds, summary)
        if self.best is None:  # no site validates: the last model is the run's, as in the training engine
            self._write(last, rounds, {"select": None, "select_by": None})
        chosen = summary
        if self.best is not None and self.best["round"] != rounds:
            chosen = self._summarise(measure(self.method.read_best(self.out)))
        return summary, self.set_threshold(chosen)

    def set_threshold(self, summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Write ``operating_point.json`` for the best weights from the sites' summed benign histogram (the
        keys :func:`~napari_wsimil.seg.operating_point.read_operating_point` checks); None when no site had
        benign tissue (masks are then cut at 0.5)."""
        from ..io.atomic import write_text
        from ..seg.operating_point import weights_digest

        path = self.out / OPERATING_POINT
        path.unlink(missing_ok=True)
        if self.best is None or not summary or "threshold" not in summary:
            return None
        point = {"format": 1, "threshold": summary["threshold"], "rule": summary["rule"],
                 "operating_rule": summary["operating_rule"], "operating_fpr": summary["operating_fpr"],
                 "slides": [], "n_slides": summary.get("benign_slides", 0),
                 "source": summary.get("benign_source", "validation"), "sites": summary.get("benign_sites"),
                 "weights": "best", "round": self.best["round"], "federated": True,
                 "weights_sha256": weights_digest(self.out),
                 "why": summary["why"] + "; each site counted its own pixels, the server summed them"}
        for key, name in (("benign_fpr", "benign_fpr"), ("benign_fpr_at_0_5", "benign_fpr_at_0.5"),
                          ("benign_pixels", "benign_pixels"), ("benign_fpr_threshold", "benign_fpr_threshold"),
                          ("val_pixel_dice_at_threshold", "val_pixel_dice_at_threshold"),
                          ("val_pixel_dice", "val_pixel_dice_at_0.5"), ("val_tumour_pixels", "val_tumour_pixels"),
                          ("val_normal_pixels", "val_normal_pixels")):
            if key in summary:
                point[name] = summary[key]
        write_text(path, json.dumps(point, indent=1))
        self.best["threshold"] = summary["threshold"]
        return point


OPERATING_POINT = "operating_point.json"

__all__ = ["BestRound", "KINDS", "LEVELS", "dice_at", "histogram_numbers", "numbers_only", "read_histogram",
           "site_numbers", "summarise"]
