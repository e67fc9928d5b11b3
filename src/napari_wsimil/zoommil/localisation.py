"""What ``wsimil evaluate`` scores for ZoomMIL: the zoom path, on the finest level's tissue grid.

Why not the lowest level's attention, as for every other attention method: its patches are large (512 µm at
4 µm/px and 128 px) and the localisation metrics count a patch as tumour only when half of it is tumour, which a
small lesion never fills, so no slide had a tumour patch to score. ZoomMIL's finest patches are the size that
single-magnification MIL scores at its finest level, and they are the only patches it reads there.

**The score of every finest-level tissue patch** (the descendants of the lowest level's tissue patches, kept when
at least half of them is tissue, the rule of :func:`napari_wsimil.slide.patch_grid`):

    depth + 0.5 · attention / max attention of that level

where ``depth`` is the deepest level at which the patch or one of its ancestors was *read* (0 = lowest, the
last level = the patch itself), and the attention is that read ancestor's (or the patch's own), scaled by the
largest attention at that level. So:

* every patch read at the finest level ranks above every patch the model did not zoom into, ordered among
  themselves by their own attention;
* the patches below a patch read at a middle level, but not chosen for the last step, come next, ordered by that
  patch's attention; then those only seen at the lowest level, by their lowest-level attention.

Why this rule (and not the parent's attention propagated down on one scale): attention is a softmax over one
level's patches, so its values at different levels, over different numbers of patches, are not comparable; the
zoom decisions are. Choosing to zoom into a patch is the model saying that it matters more than the ones it did
not choose, so a patch the model read more closely is never ranked below one it passed over. Within a depth, the
attention of the deepest patch read is the best evidence the model produced for that area; the children of one
unselected patch share it (ties, which the AUC counts as half).

These are exactly the values the per-level heatmaps (``<slide>.level<l>.tif``) and the zoom-path boxes in napari
show: the finest-level attention inside the chosen boxes, the lower levels' attention elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..infer.predictions import SlidePrediction

if TYPE_CHECKING:  # pragma: no cover
    from ..slide.tissue import TissueMask

#: Folder of a prediction that holds the scored zoom paths (one attention-format file per slide).
LOCALISATION_DIR = "zoom_localisation"
#: The share of a finest-level patch that must be tissue for it to be scored (as patch_grid keeps patches).
MIN_TISSUE = 0.5


def path_scores(n0: int, ratios: Sequence[int], rows: Sequence[np.ndarray], attention: Sequence[np.ndarray]
                ) -> np.ndarray:
    """The score above for every finest-level descendant of ``n0`` lowest-level patches, depth-first
    (the r = ratio² children of row j at rows ``[r·j, r·j + r)``). ``rows[l]`` are the level-l rows read
    and ``attention[l]`` their attention (``rows[0]`` is every lowest-level row)."""
    spans = [1]
    for ratio in reversed(list(ratios)):
        spans.insert(0, spans[0] * int(ratio) ** 2)  # finest descendants of one patch of each level
    scores = np.zeros(int(n0) * spans[0], np.float64)
    for level, (r, a) in enumerate(zip(rows, attention)):
        r = np.asarray(r, np.int64).reshape(-1)
        a = np.asarray(a, np.float64).reshape(-1)
        if not len(r):
            continue
        top = a.max()
        scaled = a / top if top > 0 else np.zeros_like(a)
        span = spans[level]
        idx = (r[:, None] * span + np.arange(span, dtype=np.int64)[None, :]).reshape(-1)
        scores[idx] = level + 0.5 * np.repeat(scaled, span)  # deeper levels are written last: they win
    return scores


def finest_coords(path: Any) -> np.ndarray:
    """Level-0 corners of every finest-level descendant of the lowest level's patches, depth-first.
    (``path`` is a :class:`~napari_wsimil.zoommil.predict.ZoomPath`, typed loosely: that module imports this.)"""
    from .bags import child_coords

    coords = path.coords[0]
    slide_mpp = float(path.slide_mpp or path.mpps[-1])
    for a, b in zip(path.mpps[:-1], path.mpps[1:]):
        coords = child_coords(coords, a, b, path.patch, slide_mpp)
    return coords


def path_localisation(path: Any, probs: np.ndarray, tissue: TissueMask) -> SlidePrediction:
    """The finest-level tissue patches with their scores (module doc), in the attention file's format."""
    coords = finest_coords(path)
    ratios = [round(a / b) for a, b in zip(path.mpps[:-1], path.mpps[1:])]
    scores = path_scores(len(path.coords[0]), ratios, path.rows, path.attention)
    size = path.size_level0(len(path.mpps) - 1)
    frac = tissue.fractions(coords, size)
    keep = (frac >= MIN_TISSUE) & (frac > 0)
    s = scores[keep].astype(np.float32)
    return SlidePrediction(path.slide_id, np.asarray(probs, np.float64), coords[keep], s, s[None], size,
                           path.slide_mpp, path.slide_path)


__all__ = ["LOCALISATION_DIR", "MIN_TISSUE", "finest_coords", "path_localisation", "path_scores"]
