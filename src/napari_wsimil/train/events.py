"""The one progress-event type every training method yields (the GUI and CLI only observe these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
