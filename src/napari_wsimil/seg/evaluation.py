"""How good are the probability maps? Pixel Dice and IoU against ground truth, and the CAMELYON16 FROC.

Definitions (stated in ``metrics.json`` too):

* maps are compared with the ground truth on the ground truth's own grid: each mask pixel takes the map
  value under its centre; a pixel is predicted tumour when p ≥ ``threshold`` (the run's operating threshold,
  :mod:`.operating_point`, or 0.5); with another threshold than 0.5, ``dice_at_0.5`` is reported too;
* **Dice / IoU**: per malignant slide (ground truth with tumour), averaged; ``*_pooled`` counts the pixels
  of all those slides at once. Benign slides have no tumour to overlap, so they report the share of their
  pixels predicted tumour (``benign_positive_fraction``) instead;
* **FROC** (CAMELYON16): candidates are local maxima of the map (greedy non-maximum suppression within
  ``nms_um`` µm), scored by their probability; lesions and isolated tumour cells as in
  :mod:`napari_wsimil.infer.localisation`; mean sensitivity at 1/4 … 8 false positives per slide.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError
from ..infer.evaluation import TruthItem


def map_on_grid(map_path: Path, shape: tuple[int, int], downsample: float) -> tuple[np.ndarray, float | None]:
    """The map (float in [0, 1]) sampled at the centres of a grid of ``shape`` at ``downsample`` level-0 px
    per pixel, and the slide's µm/px recorded in the map."""
    from ..project.mask_io import MaskImage
    from ..slide.heatmap_file import heatmap_description

    meta = heatmap_description(map_path)
    if meta is None:
        raise WsimilError(f"{map_path} is not a probability map written by 'wsimil predict'")
    d_map = float(meta["downsample"])
    with MaskImage(map_path) as m:
        rows = np.clip(((np.arange(shape[0]) + 0.5) * downsample / d_map).astype(np.int64), 0, m.shape[0] - 1)
        cols = np.clip(((np.arange(shape[1]) + 0.5) * downsample / d_map).astype(np.int64), 0, m.shape[1] - 1)
        vals = m.points(rows, cols)
    return np.asarray(vals, np.float32) / 255.0, meta.get("slide_mpp")


def _dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, int, int, int]:
    inter = int(np.logical_and(pred, truth).sum())
    p, t = int(pred.sum()), int(truth.sum())
    union = p + t - inter
    dice = 2 * inter / (p + t) if p + t else math.nan
    iou = inter / union if union else math.nan
    return dice, iou, inter, p, t


def froc_candidates(prob: np.ndarray, downsample: float, radius_level0: float, min_score: float = 0.05,
                    max_cells: int = 20000) -> np.ndarray:
    """(M, 3) level-0 (x, y, score) local maxima of a probability grid."""
    from ..infer.localisation import candidates_from_scores

    flat = prob.ravel()
    idx = np.flatnonzero(flat >= min_score)
    if len(idx) > max_cells:
        idx = idx[np.argsort(-flat[idx], kind="stable")[:max_cells]]
    r, c = np.divmod(idx, prob.shape[1])
    coords = np.column_stack([c * downsample, r * downsample]).astype(np.float64)
    return candidates_from_scores(coords, downsample, flat[idx], radius_level0, min_score=min_score)


def segmentation_metrics(items: Iterable[TruthItem], maps_dir: str | os.PathLike[str], threshold: float = 0.5,
                         nms_um: float = 100.0) -> dict[str, Any]:
    """The metrics above over ``items`` (slides with a ``gt_mask``) from ``maps_dir/<slide_id>.tif``."""
    from ..infer.evaluation import mask_downsample
    from ..infer.localisation import classify_candidates, froc, lesions_from_mask
    from ..project.mask_io import MaskImage

    per_dice: dict[str, float] = {}
    dice_half: list[float] = []
    per_iou: dict[str, float] = {}
    benign_fp: list[float] = []
    inter = pred_n = truth_n = 0
    froc_input = []
    for item in items:
        path = Path(maps_dir) / f"{item.slide_id}.tif"
        if not path.is_file():
            raise WsimilError(f"no probability map for {item.slide_id} in {maps_dir}: run 'wsimil predict' on it")
        with MaskImage(item.gt_mask) as mask:
            ds = mask_downsample(mask, item, None)
            truth = mask.points(np.arange(mask.shape[0]), np.arange(mask.shape[1])) > 0
        prob, slide_mpp = map_on_grid(path, truth.shape, ds)
        pred = prob >= threshold
        if truth.any():
            d, j, i_, p_, t_ = _dice_iou(pred, truth)
            per_dice[item.slide_id], per_iou[item.slide_id] = d, j
            dice_half.append(_dice_iou(prob >= 0.5, truth)[0])
            inter, pred_n, truth_n = inter + i_, pred_n + p_, truth_n + t_
        else:
            benign_fp.append(float(pred.mean()))
        lesions = lesions_from_mask(truth, ds, slide_mpp)
        radius = nms_um / slide_mpp if slide_mpp else 4 * ds
        cand = froc_candidates(prob, ds, radius)
        froc_input.append((cand[:, 2], classify_candidates(cand, lesions), lesions.n))
    if not froc_input:
        return {}
    fr = froc(froc_input)
    union = pred_n + truth_n - inter
    at_half = {"dice_at_0.5": float(np.nanmean(dice_half))} if dice_half and threshold != 0.5 else {}
    return {
        "threshold": threshold,
        "dice": float(np.nanmean(list(per_dice.values()))) if per_dice else math.nan,
        "iou": float(np.nanmean(list(per_iou.values()))) if per_iou else math.nan,
        "dice_pooled": 2 * inter / (pred_n + truth_n) if pred_n + truth_n else math.nan,
        "iou_pooled": inter / union if union else math.nan,
        # which way Dice is lost: low precision = over-segmentation (e.g. a halo), low recall = missed tumour
        "precision_pooled": inter / pred_n if pred_n else math.nan,
        "recall_pooled": inter / truth_n if truth_n else math.nan,
        "dice_per_slide": per_dice,
        "benign_positive_fraction": float(np.mean(benign_fp)) if benign_fp else math.nan,
        "froc": fr["froc"],
        "froc_sensitivity_at": {str(k): v for k, v in fr["sensitivity_at"].items()},
        "n_slides_with_truth": len(froc_input),
        "n_malignant_with_truth": len(per_dice),
        "n_lesions": fr["n_lesions"],
        **at_half,
    }


__all__ = ["froc_candidates", "map_on_grid", "segmentation_metrics"]
