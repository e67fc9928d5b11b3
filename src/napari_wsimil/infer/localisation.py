"""Localisation metrics: how well per-patch scores (attention) find tumour in a ground-truth mask.

Two views, both numpy + scipy only so that ``wsimil evaluate`` runs without torch or a GUI:

* patch level: each patch's tumour fraction (:func:`patch_tumour_fraction`), then the AUC of the scores
  for tumour versus non-tumour patches (:func:`patch_auc`);
* lesion level, the CAMELYON16 FROC: lesions from the mask (:func:`lesions_from_mask`), detection
  candidates from the scores by non-maximum suppression (:func:`candidates_from_scores`), each candidate
  a hit, an ignored ITC hit or a false positive (:func:`classify_candidates`), and the FROC over all slides
  (:func:`froc`).

Masks are uint8 with 1 = tumour (any value > 0 counts) at ``downsample`` level-0 pixels per mask pixel:
mask pixel (i, j) covers level-0 x in [j·d, (j+1)·d) and y in [i·d, (i+1)·d). Patches are level-0 (x, y)
top-left corners with a side of ``size_level0`` level-0 pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from ..slide.mask_sampling import Lookup, patch_samples
from .metrics import binary_auc

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity, as CAMELYON16's measure.label(connectivity=2)


# -- patch level ---------------------------------------------------------------------------------------

def patch_tumour_fraction(coords: np.ndarray, size_level0: float, lookup: Lookup, downsample: float,
                          samples: int = 8, *, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Fraction of each patch's area that is tumour (any mask value > 0), (N,) float64.

    Estimated from ``samples`` × ``samples`` points at the sub-cell centres of the patch
    (:func:`~napari_wsimil.slide.mask_sampling.patch_samples`), so the answer is exact whenever mask pixel
    edges fall on sub-cell edges, and the cost does not grow with the mask.
    """
    vals = patch_samples(coords, size_level0, lookup, downsample, samples, shape=shape)
    return (vals > 0).mean(axis=1).astype(np.float64) if len(vals) else np.zeros(0, np.float64)


def patch_auc(scores: np.ndarray, fractions: np.ndarray, positive_at: float = 0.5) -> float:
    """Mann–Whitney AUC of the scores for tumour patches (fraction >= positive_at) versus the rest.

    NaN when either side is empty (a slide without tumour, or all tumour), so callers can nan-mean.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    f = np.asarray(fractions, dtype=np.float64).reshape(-1)
    if len(s) != len(f):
        raise ValueError(f"{len(s)} scores but {len(f)} fractions")
    return binary_auc(s, f >= positive_at)


# -- lesions -------------------------------------------------------------------------------------------

@dataclass
class Lesions:
    """A slide's lesions for FROC.

    ``labels``: int32 label image at the mask's resolution (0 = no lesion), over the dilated, hole-filled
    tumour, so detections just beside tumour still hit it. ``n``: number of lesions that count (non-ITC),
    the FROC denominator; label ids run 1..n + len(itc). ``itc``: label ids of isolated tumour cells,
    whose hits are ignored.
    """

    labels: np.ndarray
    downsample: float
    n: int
    itc: frozenset[int] = field(default_factory=frozenset)


def _feret_px(rr: np.ndarray, cc: np.ndarray) -> float:
    """Largest Feret diameter, in pixels, of the union of the pixel squares at (rr, cc).

    Uses the squares' corners (a single pixel measures √2 rather than 0): the diameter of a union of
    squares is reached at corners of squares whose centres are convex-hull vertices, so only those are
    compared pairwise.
    """
    centres = np.stack([rr, cc], axis=1).astype(np.float64)
    if len(centres) > 16:
        try:
            centres = centres[ConvexHull(centres).vertices]
        except Exception:  # collinear centres (a thin line): qhull refuses; the line's ends suffice
            centres = centres[np.r_[centres.argmin(0), centres.argmax(0)]]
    corners = (centres[:, None, :] + np.array([[-.5, -.5], [-.5, .5], [.5, -.5], [.5, .5]])).reshape(-1, 2)
    diff = corners[:, None, :] - corners[None, :, :]
    return float(np.sqrt((diff ** 2).sum(-1).max()))


def lesions_from_mask(mask: np.ndarray, downsample: float, slide_mpp: float | None, dilate_um: float = 75.0,
                      itc_um: float = 275.0) -> Lesions:
    """Lesions of a tumour mask by the CAMELYON16 evaluation convention.

    The tumour (mask > 0) is dilated by a disk of radius ``dilate_um`` (pixels at Euclidean distance
    < dilate_um / (slide_mpp·downsample) from tumour), so regions closer than 2·dilate_um edge to edge merge
    into one lesion; holes are filled and the lesions are the 8-connected components. (The official
    Evaluation_FROC.py divides its 75 µm by 2 in pixels; pass dilate_um=37.5 to reproduce that exactly.)

    A lesion is an ITC when its longest diameter, the largest Feret diameter of its *undilated* tumour
    pixels (pixel squares, so exact for the pixelated outline), is below ``itc_um`` µm. The official code
    uses the dilated region's ellipse major axis instead; the Feret diameter follows the challenge's
    written definition (longest diameter of the metastasis) and is not inflated by the dilation.

    With ``slide_mpp`` None, micrometres cannot be converted: no dilation and no ITCs (every component
    counts); holes are still filled. Distances are computed only over the tumour's bounding box plus the
    dilation radius, so a large mask with small tumours stays cheap.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"the mask must be 2-D, got shape {m.shape}")
    d = float(downsample)
    tumour = m > 0
    labels = np.zeros(m.shape, dtype=np.int32)
    if not tumour.any():
        return Lesions(labels=labels, downsample=d, n=0, itc=frozenset())
    px_um = float(slide_mpp) * d if slide_mpp is not None else None
    radius = dilate_um / px_um if px_um else 0.0

    rows_any, cols_any = np.flatnonzero(tumour.any(1)), np.flatnonzero(tumour.any(0))
    pad = int(math.ceil(radius)) + 1 if radius > 0 else 1
    r0, r1 = max(rows_any[0] - pad, 0), min(rows_any[-1] + pad + 1, m.shape[0])
    c0, c1 = max(cols_any[0] - pad, 0), min(cols_any[-1] + pad + 1, m.shape[1])
    crop = tumour[r0:r1, c0:c1]
    region = ndimage.distance_transform_edt(~crop) < radius if radius > 0 else crop.copy()
    region = ndimage.binary_fill_holes(region)
    lab, count = ndimage.label(region, structure=_EIGHT)
    labels[r0:r1, c0:c1] = lab

    itc: set[int] = set()
    if px_um is not None:
        for lid, sl in enumerate(ndimage.find_objects(lab), start=1):
            if sl is None:
                continue
            own = (lab[sl] == lid) & crop[sl]
            rr, cc = np.nonzero(own)
            h, w = rr.max() - rr.min() + 1, cc.max() - cc.min() + 1
            if max(h, w) * px_um >= itc_um:  # the Feret diameter is at least the longer side
                continue
            if math.hypot(h, w) * px_um < itc_um:  # and at most the bounding-box diagonal
                itc.add(lid)
                continue
            edge = own & ~ndimage.binary_erosion(own)
            er, ec = np.nonzero(edge)
            if _feret_px(er, ec) * px_um < itc_um:
                itc.add(lid)
    return Lesions(labels=labels, downsample=d, n=int(count) - len(itc), itc=frozenset(itc))


# -- detections ----------------------------------------------------------------------------------------

def candidates_from_scores(coords: np.ndarray, size_level0: float, scores: np.ndarray, radius_level0: float,
                           min_score: float = 0.0, max_candidates: int | None = 100) -> np.ndarray:
    """Detection candidates (x, y, score), (M, 3) float64, at patch centres by greedy non-maximum suppression.

    FROC counts every candidate outside a lesion as a false positive, so neighbouring high-attention
    patches on one lesion must collapse to one detection. Highest score first; a patch is dropped when a
    kept candidate's centre is within ``radius_level0`` (distance <= radius) of its centre. Scores below
    ``min_score`` (and NaN) are dropped; at most ``max_candidates`` are kept (None: no limit). Ties keep
    the earlier patch. Output is in descending score order.
    """
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(xy) != len(s):
        raise ValueError(f"{len(xy)} coordinates but {len(s)} scores")
    keep_rows = np.flatnonzero(s >= min_score)  # NaN compares False
    order = keep_rows[np.argsort(-s[keep_rows], kind="stable")]
    centres = xy[order] + float(size_level0) / 2.0
    alive = np.ones(len(order), dtype=bool)
    r2 = float(radius_level0) ** 2
    kept: list[int] = []
    limit = len(order) if max_candidates is None else int(max_candidates)
    i = 0
    while len(kept) < limit:
        nxt = np.flatnonzero(alive[i:])
        if len(nxt) == 0:
            break
        i += int(nxt[0])
        kept.append(i)
        dist2 = ((centres - centres[i]) ** 2).sum(1)
        alive &= dist2 > r2
        i += 1
    out = np.empty((len(kept), 3), dtype=np.float64)
    if kept:
        out[:, :2] = centres[kept]
        out[:, 2] = s[order[kept]]
    return out


def classify_candidates(candidates: np.ndarray, lesions: Lesions) -> np.ndarray:
    """Per candidate, the lesion label it hits (> 0), 0 for an ITC (ignored), -1 for a false positive.

    A candidate hits the lesion whose (dilated) label lies under its level-0 (x, y) point, read at mask
    pixel (floor(y/d), floor(x/d)); background or a point outside the mask is a false positive.
    """
    c = np.asarray(candidates, dtype=np.float64)
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    c = c.reshape(len(c), -1)
    d = float(lesions.downsample)
    rows = np.floor(c[:, 1] / d)
    cols = np.floor(c[:, 0] / d)
    h, w = lesions.labels.shape
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    out = np.full(len(c), -1, dtype=np.int64)
    lab = lesions.labels[rows[inside].astype(np.int64), cols[inside].astype(np.int64)].astype(np.int64)
    res = np.where(lab > 0, lab, -1)
    if lesions.itc:
        res[np.isin(lab, np.fromiter(lesions.itc, dtype=np.int64))] = 0
    out[inside] = res
    return out


# -- FROC ----------------------------------------------------------------------------------------------

def _interp_like_official(rate: float, fps: np.ndarray, sens: np.ndarray) -> float:
    """``np.interp(rate, fps, sens)`` on non-decreasing ``fps`` with ties resolved the way numpy does.

    The official computeFROC passes tied FP rates to np.interp, which is only defined for increasing xp;
    in practice numpy takes the last point at or below ``rate`` (at a tie: the lowest threshold, the best
    sensitivity at that FP rate) and interpolates to the first point above it. Done explicitly here so the
    result does not hinge on unspecified behaviour. Beyond the last FP rate: the final sensitivity.
    """
    j = int(np.searchsorted(fps, rate, side="right")) - 1
    if j < 0:
        return float(sens[0])
    if j >= len(fps) - 1:
        return float(sens[j])
    t = (rate - fps[j]) / (fps[j + 1] - fps[j])
    return float(sens[j] + t * (sens[j + 1] - sens[j]))


def froc(per_slide: Sequence[tuple[np.ndarray, np.ndarray, int]],
         fp_rates: Sequence[float] = (0.25, 0.5, 1, 2, 4, 8)) -> dict[str, Any]:
    """CAMELYON16 FROC over slides, each given as (candidate scores (M,), hits from classify_candidates (M,),
    number of non-ITC lesions). Normal slides (no lesions) count in the slide total and add their FPs.

    Thresholds are the distinct candidate scores. At threshold t the average FPs per slide is the number of
    candidates with score >= t and hit -1, summed over slides, over the number of slides; the sensitivity
    is the number of distinct (slide, lesion) hit by a candidate with score >= t over all non-ITC lesions;
    ITC hits (0) count as neither. The curve starts at (0, 0) (threshold above every score), as the
    official code appends. Unlike the official code, the lowest threshold is not skipped (it skips it
    because its threshold list contains the 0 given to missed lesions, which this one does not).

    Returns ``froc`` (mean sensitivity at ``fp_rates``; NaN without lesions), ``sensitivity_at``
    {rate: sensitivity}, ``curve`` [(avg FPs per slide, sensitivity)] in increasing FP order,
    ``n_lesions`` and ``n_slides``.
    """
    n_slides = len(per_slide)
    n_lesions = 0
    all_scores, fp_scores, tp_scores = [], [], []
    for k, (scores, hits, n_les) in enumerate(per_slide):
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        h = np.asarray(hits, dtype=np.int64).reshape(-1)
        if len(s) != len(h):
            raise ValueError(f"slide {k}: {len(s)} scores but {len(h)} hits")
        n_lesions += int(n_les)
        all_scores.append(s)
        fp_scores.append(s[h == -1])
        for lid in np.unique(h[h > 0]):  # a lesion counts from the best-scoring candidate that hits it
            tp_scores.append(s[h == lid].max())
    rates = [float(r) for r in fp_rates]
    if n_lesions == 0 or n_slides == 0:
        return {"froc": math.nan, "sensitivity_at": {r: math.nan for r in rates}, "curve": [],
                "n_lesions": n_lesions, "n_slides": n_slides}
    if len(tp_scores) > n_lesions:
        raise ValueError(f"{len(tp_scores)} distinct lesions hit but only {n_lesions} lesions given")
    thresholds = np.unique(np.concatenate(all_scores))[::-1]  # descending
    fp_sorted = np.sort(np.concatenate(fp_scores))
    tp_sorted = np.sort(np.asarray(tp_scores, dtype=np.float64))
    n_fp = len(fp_sorted) - np.searchsorted(fp_sorted, thresholds, side="left")  # count of scores >= t
    n_tp = len(tp_sorted) - np.searchsorted(tp_sorted, thresholds, side="left")
    fps = np.r_[0.0, n_fp / n_slides]
    sens = np.r_[0.0, n_tp / n_lesions]
    sensitivity_at = {r: _interp_like_official(r, fps, sens) for r in rates}
    return {"froc": float(np.mean(list(sensitivity_at.values()))) if rates else math.nan,
            "sensitivity_at": sensitivity_at,
            "curve": [(float(a), float(b)) for a, b in zip(fps, sens)],
            "n_lesions": n_lesions, "n_slides": n_slides}
