"""The events training yields: progress of the engine, and maps of watched slides (the GUI and CLI only
observe these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

EventKind = Literal["epoch", "step", "validation", "checkpoint", "done"]


@dataclass(frozen=True)
class ProgressEvent:
    """One thing that happened during training.

    ``epoch`` is 1-based; ``step`` counts optimiser steps within the epoch (0 where it does not apply).
    ``losses`` / ``metrics`` are plain floats, ``elapsed`` and ``eta`` seconds (``eta`` None when unknown).
    ``path`` is the checkpoint written (kind "checkpoint") or the run folder (kind "done");
    ``message`` says why training ended for "done" (finished, early stopping, ...).
    """

    kind: EventKind
    epoch: int
    step: int = 0
    total_epochs: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0
    eta: float | None = None
    path: str | None = None
    message: str = ""


@dataclass(frozen=True)
class MapEvent:
    """A map of one slide from the model after ``epoch``: ``heatmap`` float32 in [0, 1] covering the slide
    at ``downsample`` level-0 px per pixel (the slide's µm/px × downsample in napari's world). ``kind`` is
    the family's live layer: "map" for attention, "probability" for a pixel probability map."""

    slide_id: str
    epoch: int
    heatmap: np.ndarray
    downsample: float
    slide_mpp: float | None
    probs: np.ndarray
    kind: str = "map"
    #: optional boxes drawn over the map, (M, 7) float: level-0 x0, y0, x1, y1, level, value, role
    #: (role 0: a patch chosen to zoom into, edge only; 1: a patch read at that level, ``value`` its
    #: attention). ZoomMIL's zoom path; None for families without one.
    regions: np.ndarray | None = None
