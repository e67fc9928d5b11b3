"""One pyramid level as something that returns pixels for a rectangle.

Backends differ in how they find and decode tiles; everything above them (dask arrays for napari,
region reads, patch readers) only needs ``read(y0, y1, x0, x1)`` on an in-bounds rectangle. Tiled
sources assemble rectangles from cached tiles so that neighbouring reads share decoding work.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod

import numpy as np

from .tile_cache import TILE_CACHE, TileCache

_ids = itertools.count()


def to_rgb8(tile: np.ndarray) -> np.ndarray:
    """Normalise a decoded tile to (h, w, 3) uint8 RGB: grey, RGBA and 16-bit data all occur in slides."""
    if tile.ndim == 2:
        tile = tile[..., None]
    if tile.dtype != np.uint8:
        info = np.iinfo(tile.dtype) if np.issubdtype(tile.dtype, np.integer) else None
        top = float(info.max) if info else max(float(np.nanmax(tile)), 1e-12)
        tile = np.clip(tile.astype(np.float32) * (255.0 / top), 0, 255).astype(np.uint8)
    channels = tile.shape[-1]
    if channels == 1:
        return np.repeat(tile, 3, axis=-1)
    if channels == 2:  # grey + alpha
        return np.repeat(tile[..., :1], 3, axis=-1)
    return tile[..., :3]


class LevelSource(ABC):
    """An in-bounds pixel source of shape (height, width) and native tile (tile_h, tile_w)."""

    shape: tuple[int, int]
    tile: tuple[int, int]

    @abstractmethod
    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Return RGB uint8 pixels of rows y0:y1 and columns x0:x1, all inside the level."""


class TiledSource(LevelSource):
    """A level stored as a grid of tiles, each decoded once and cached."""

    def __init__(self, shape: tuple[int, int], tile: tuple[int, int], cache: TileCache = TILE_CACHE):
        self.shape = (int(shape[0]), int(shape[1]))
        self.tile = (int(tile[0]), int(tile[1]))
        self.grid = (-(-self.shape[0] // self.tile[0]), -(-self.shape[1] // self.tile[1]))
        self.cache = cache
        self.cache_id = ("level", next(_ids))

    @abstractmethod
    def decode_tile(self, ty: int, tx: int) -> np.ndarray:
        """Decode tile (ty, tx) to RGB uint8, clipped to the level's bounds."""

    def get_tile(self, ty: int, tx: int) -> np.ndarray:
        return self.cache.get((self.cache_id, ty, tx), lambda: self.decode_tile(ty, tx))

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        th, tw = self.tile
        ty0, ty1 = y0 // th, (y1 - 1) // th
        tx0, tx1 = x0 // tw, (x1 - 1) // tw
        if ty0 == ty1 and tx0 == tx1:  # the common case for tile-aligned chunks: no copy
            tile = self.get_tile(ty0, tx0)
            return tile[y0 - ty0 * th : y1 - ty0 * th, x0 - tx0 * tw : x1 - tx0 * tw]
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                tile = self.get_tile(ty, tx)
                ay0, ax0 = ty * th, tx * tw
                sy0, sy1 = max(y0, ay0), min(y1, ay0 + tile.shape[0])
                sx0, sx1 = max(x0, ax0), min(x1, ax0 + tile.shape[1])
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[sy0 - ay0 : sy1 - ay0, sx0 - ax0 : sx1 - ax0]
        return out

    def forget(self) -> None:
        self.cache.discard(self.cache_id)
