"""Extra pyramid levels computed on demand for files whose pyramid stops too early.

napari draws the coarsest level when zoomed out; if that level is full resolution (a single-level
TIFF, a DICOM with one level) every zoomed-out frame would decode the whole slide. Each added level
halves the previous one with a box filter, tile by tile, so nothing beyond a few tiles is in memory.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .level_source import LevelSource, TiledSource

#: Levels are added until the long side of the coarsest is at most this many pixels.
COARSEST_LONG_SIDE = 1024


class DownsampledLevel(TiledSource):
    """``parent`` reduced by ``factor`` with an area (box) filter."""

    def __init__(self, parent: LevelSource, factor: int = 2, tile: int = 512):
        shape = (max(1, parent.shape[0] // factor), max(1, parent.shape[1] // factor))
        super().__init__(shape, (min(tile, shape[0]), min(tile, shape[1])))
        self.parent = parent
        self.factor = factor

    def decode_tile(self, ty: int, tx: int) -> np.ndarray:
        th, tw = self.tile
        y0, x0 = ty * th, tx * tw
        y1, x1 = min(y0 + th, self.shape[0]), min(x0 + tw, self.shape[1])
        f = self.factor
        fine = self.parent.read(y0 * f, y1 * f, x0 * f, x1 * f)
        return np.asarray(Image.fromarray(np.ascontiguousarray(fine)).reduce(f))


def complete_pyramid(levels: list[LevelSource], downsamples: list[float]) -> tuple[list[LevelSource], list[float]]:
    """Append box-filtered levels until the coarsest fits in ``COARSEST_LONG_SIDE`` pixels."""
    levels, downsamples = list(levels), list(downsamples)
    while max(levels[-1].shape) > COARSEST_LONG_SIDE and min(levels[-1].shape) >= 2:
        levels.append(DownsampledLevel(levels[-1], 2))
        downsamples.append(downsamples[-1] * 2.0)
    return levels, downsamples
