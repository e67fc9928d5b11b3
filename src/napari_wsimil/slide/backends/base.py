"""What a reading library must provide to become a slide backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..level_source import LevelSource


@dataclass
class BackendSlide:
    """A file opened by one backend: its levels (finest first) and what the file says about itself."""

    path: Path
    backend: str
    levels: list[LevelSource]
    downsamples: list[float]
    mpp: float | None = None
    objective_power: float | None = None
    vendor: str = "generic"
    properties: dict[str, str] = field(default_factory=dict)
    #: name -> function returning the associated image (label, macro, thumbnail) as RGB uint8
    associated: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


class Backend(ABC):
    name: str

    @abstractmethod
    def can_open(self, path: Path, head: bytes) -> bool:
        """Cheap test on the file's first bytes: true if this backend should try the file."""

    @abstractmethod
    def open(self, path: Path) -> BackendSlide:
        """Open the file or raise SlideError saying why it cannot be read."""


#: Pixel sizes outside this range (µm/px) are metadata errors (72 dpi written by image libraries).
PLAUSIBLE_MPP = (0.02, 100.0)


def plausible_mpp(mpp: float | None) -> float | None:
    if mpp is None or not np.isfinite(mpp) or not (PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]):
        return None
    return float(mpp)
