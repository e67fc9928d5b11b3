"""A byte-bounded LRU cache of decoded tiles, shared by every level of every open slide.

Decoding a JPEG tile costs far more than copying it, and napari, patch readers and region reads
touch the same tiles again and again. The cache is bounded in bytes (not in entries) so memory does
not depend on slide size or tile shape.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np

from .. import settings


class TileCache:
    """Thread-safe LRU of numpy arrays keyed by (source id, tile index).

    ``max_bytes=None`` follows :func:`napari_wsimil.settings.current` (napari's *Preferences > Plugins*
    or ``NAPARI_WSIMIL_TILE_CACHE_MB``): a changed size applies from the next tile on, without reopening
    the slides.
    """

    def __init__(self, max_bytes: int | None = None):
        self._max_bytes = max_bytes
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            tile = self._items.get(key)
            if tile is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return tile
            self.misses += 1
        # Decode outside the lock: two threads may decode the same tile once, which is cheaper
        # than serialising every decode behind one lock.
        tile = load()
        tile.setflags(write=False)
        limit = self.max_bytes
        with self._lock:
            if key not in self._items:
                self._items[key] = tile
                self._bytes += tile.nbytes
                while self._bytes > limit and len(self._items) > 1:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.nbytes
        return tile

    @property
    def max_bytes(self) -> int:
        return self._max_bytes if self._max_bytes is not None else settings.current().tile_cache_bytes

    def discard(self, prefix: Hashable) -> None:
        """Forget every tile of one source (when its slide is closed)."""
        with self._lock:
            for key in [k for k in self._items if isinstance(k, tuple) and k and k[0] == prefix]:
                self._bytes -= self._items.pop(key).nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes


TILE_CACHE = TileCache()
