"""Does the attention point at the tumour? Patch-level AUC and CAMELYON16 FROC against ground-truth masks.

``wsimil evaluate`` calls :func:`localisation_metrics` with the slides of the cohort that have a
``gt_mask`` and the per-slide attention files ``wsimil predict`` wrote. Definitions, chosen to be the
usual ones and stated in the output:

* a patch is tumour when at least half of its area is tumour in the ground truth;
* **attention AUC**: per malignant slide (one with both tumour and non-tumour patches), the AUC of the
  raw attention scores at separating tumour from other patches; the mean over those slides. Attention is
  a softmax over one slide's patches, so scores are only compared within a slide. **Pooled**: the same
  AUC over all those slides' patches at once, after CLAM's per-slide percentile normalisation;
* **FROC** (CAMELYON16): detection candidates are the local maxima of a per-patch score (greedy
  non-maximum suppression within two patch sides), scored ``P(tumour slide) × attention / max
  attention`` so that a confident benign call keeps its attention peaks from counting as confident
  false positives; lesions are the ground truth's connected components after a 75 µm dilation, isolated
  tumour cells (< 275 µm) ignored; mean sensitivity at 1/4 … 8 false positives per slide.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError


@dataclass(frozen=True)
class TruthItem:
    """A slide with a ground-truth mask: ``downsample`` None means "from the mask's size"."""

    slide_id: str
    gt_mask: Path
    gt_downsample: float | None


def mask_downsample(mask: Any, item: TruthItem, slide_path: str | None) -> float:
    """Level-0 px per pixel of ``item``'s ground-truth ``mask``: the cohort's ``gt_downsample``, else the
    mask's own, else the slide's width and height over the mask's (needs ``slide_path``).

    Public because both evaluations read ground truth this way: the attention one here and the
    segmentation maps' one (:mod:`napari_wsimil.seg.evaluation`)."""
    if item.gt_downsample:
        return float(item.gt_downsample)
    if getattr(mask, "downsample", None):
        return float(mask.downsample)
    if slide_path:
        from ..slide import open_slide

        with open_slide(slide_path) as slide:
            w, h = slide.dimensions
        mh, mw = mask.shape
        return max(w / mw, h / mh)
    raise WsimilError(f"the ground truth of {item.slide_id} has no downsample: add a gt_downsample column")


def localisation_metrics(items: Iterable[TruthItem], attention_dir: str | os.PathLike[str],
                         nms_patches: float = 2.0) -> dict[str, Any]:
    """The metrics above over ``items``; slides without an attention file are an error naming them.
    Class 0 is "no tumour" (as in MS-CLAM), so P(tumour slide) is 1 − P(class 0)."""
    from ..infer.heatmap import percentile_scores
    from ..infer.metrics import binary_auc
    from .predictions import read_attention
    from ..project.mask_io import MaskImage
    from .localisation import (candidates_from_scores, classify_candidates, froc, lesions_from_mask,
                               patch_auc, patch_tumour_fraction)

    per_slide_auc: dict[str, float] = {}
    pooled_scores, pooled_truth = [], []
    froc_input = []
    n_tumour_patches = 0
    for item in items:
        pred = read_attention(Path(attention_dir) / f"{item.slide_id}.npz")
        if pred.size_level0 is None:
            raise WsimilError(f"{item.slide_id}: the attention file predates patch geometry; run 'wsimil predict' "
                              "again")
        with MaskImage(item.gt_mask) as mask:
            ds = mask_downsample(mask, item, pred.slide_path)
            frac = patch_tumour_fraction(pred.coords, pred.size_level0, mask.points, ds)
            full = mask.points(np.arange(mask.shape[0]), np.arange(mask.shape[1]))
        lesions = lesions_from_mask(full > 0, ds, pred.slide_mpp)
        del full
        tumour = frac >= 0.5
        n_tumour_patches += int(tumour.sum())
        if tumour.any() and not tumour.all():
            per_slide_auc[item.slide_id] = patch_auc(pred.attention, frac)
            pooled_scores.append(percentile_scores(pred.attention))
            pooled_truth.append(tumour)
        p_pos = 1.0 - float(pred.probs[0])
        att = np.asarray(pred.attention, np.float64)
        score = p_pos * att / att.max() if len(att) and att.max() > 0 else np.zeros(len(att))
        cand = candidates_from_scores(pred.coords, pred.size_level0, score, nms_patches * pred.size_level0)
        hits = classify_candidates(cand, lesions)
        froc_input.append((cand[:, 2], hits, lesions.n))
    if not froc_input:
        return {}
    aucs = [v for v in per_slide_auc.values() if not math.isnan(v)]
    pooled = math.nan
    if pooled_scores:
        pooled = binary_auc(np.concatenate(pooled_scores), np.concatenate(pooled_truth))
    fr = froc(froc_input)
    return {
        "attention_auc": float(np.mean(aucs)) if aucs else math.nan,
        "attention_auc_pooled": pooled,
        "attention_auc_per_slide": per_slide_auc,
        "froc": fr["froc"],
        "froc_sensitivity_at": {str(k): v for k, v in fr["sensitivity_at"].items()},
        "n_slides_with_truth": len(froc_input),
        "n_slides_with_tumour_patches": len(per_slide_auc),
        "n_tumour_patches": n_tumour_patches,
        "n_lesions": fr["n_lesions"],
    }


__all__ = ["TruthItem", "localisation_metrics", "mask_downsample"]
