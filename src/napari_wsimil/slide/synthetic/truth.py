"""Ground truth of a synthetic slide: where its mask is written, at which downsample, what the slide holds.

Why apart: the model samples its fields on this grid and the cohort writer names and records the masks;
readers elsewhere only need these few names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

GT_MAX_SIDE = 2048  # ground-truth masks are at most this many pixels a side


@dataclass(frozen=True)
class SlideTruth:
    """What a synthetic slide contains, for checking what a model found.

    ``tumour_fraction`` is tumour area over tissue area, both counted on the ground-truth grid;
    ``tissue_fraction`` is tissue area over slide area.
    """

    path: Path
    gt_mask: Path
    gt_downsample: int
    malignant: bool
    tumour_fraction: float
    tissue_fraction: float
    shape: tuple[int, int]
    mpp: float
    seed: int


def gt_path_for(slide_path: str | os.PathLike[str]) -> Path:
    """Where the ground-truth mask of a synthetic slide is written: ``<stem>_gt.tiff`` beside it."""
    p = Path(slide_path)
    return p.with_name(f"{p.stem}_gt.tiff")


def gt_downsample_for(shape: tuple[int, int]) -> int:
    """Power of two >= 8 that keeps the ground-truth mask within GT_MAX_SIDE pixels a side.

    Fine enough to score 256-px patches (8 to 32 mask pixels across one), small enough to hold.
    """
    ds = 8
    while max(shape) / ds > GT_MAX_SIDE:
        ds *= 2
    return ds
