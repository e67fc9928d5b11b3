"""The Slide: a pyramid of lazy levels in physical units.

Everything above this module asks for pixels in µm/px and level-0 coordinates; this is the one
place that maps a physical resolution to a pyramid level (the nearest finer level, then a resize),
so that no caller handles level indices or vendor quirks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..errors import MissingMppError, SlideError
from .backends import BackendSlide, open_backend
from .level_source import LevelSource
from .pyramid import complete_pyramid

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da

#: A level counts as "fine enough" for a request if it is at most this much coarser (rounding slack).
_MPP_SLACK = 1.01


class _LevelArray:
    """Array-like view of a LevelSource that dask slices chunk by chunk."""

    def __init__(self, source: LevelSource):
        self.source = source
        self.shape = (*source.shape, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        if y1 <= y0 or x1 <= x0:
            return np.empty((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)[:, :, key[2] if len(key) > 2 else slice(None)]
        out = self.source.read(y0, y1, x0, x1)
        return out[:, :, key[2]] if len(key) > 2 else out


def _floor(value: float) -> int:
    """Floor that forgives float round-off: (x * ds) / ds must map back to x, not x - 1."""
    return int(np.floor(value + 1e-6))


def _chunks_for(source: LevelSource) -> tuple[int, int, int]:
    """Dask chunks: the file's tiles, with strips (NDPI, striped TIFF) grouped into ~512-row bands."""
    th, tw = source.tile
    h, w = source.shape
    if th < 128:
        th = min(h, th * -(-512 // th))
    if tw > 4096:  # very wide strips: narrower chunks so napari loads what is on screen
        tw = 2048
    return (min(th, h), min(tw, w), 3)


class Slide:
    """A whole-slide image opened lazily. Create it with :func:`open_slide`."""

    def __init__(self, opened: BackendSlide, mpp: float | None = None):
        self._opened = opened
        self.path: Path = opened.path
        self.backend: str = opened.backend
        self.vendor: str = opened.vendor
        self.objective_power: float | None = opened.objective_power
        self.properties: Mapping[str, str] = opened.properties
        self.file_mpp: float | None = opened.mpp
        self._mpp: float | None = None
        self.mpp = mpp if mpp is not None else opened.mpp
        sources, downsamples = complete_pyramid(opened.levels, opened.downsamples)
        self._sources: list[LevelSource] = sources
        self.downsamples: list[float] = downsamples
        self.file_level_count = len(opened.levels)
        self._closed = False

    # --- geometry -------------------------------------------------------------------------------
    @property
    def mpp(self) -> float | None:
        """µm per pixel at level 0; None when the file does not say and nobody set it."""
        return self._mpp

    @mpp.setter
    def mpp(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if not np.isfinite(value) or value <= 0:
                raise SlideError(self.path, f"a pixel size of {value} µm/px is not possible; give a positive number")
        self._mpp = value

    @property
    def level_count(self) -> int:
        return len(self._sources)

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        """(height, width) of each level, finest first."""
        return [s.shape for s in self._sources]

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) at level 0, as OpenSlide reports it."""
        h, w = self._sources[0].shape
        return w, h

    def dimensions_of(self, level: int) -> tuple[int, int]:
        """(width, height) of ``level``."""
        h, w = self._sources[level].shape
        return w, h

    def level_mpp(self, level: int) -> float:
        if self.mpp is None:
            raise MissingMppError(self.path)
        return self.mpp * self.downsamples[level]

    def best_level_for_mpp(self, mpp: float) -> int:
        """The coarsest level that is still at least as fine as ``mpp`` (level 0 if none is)."""
        if self.mpp is None:
            raise MissingMppError(self.path)
        return self.best_level_for_downsample(mpp / self.mpp)

    def best_level_for_downsample(self, downsample: float) -> int:
        best = 0
        for i, d in enumerate(self.downsamples):
            if d <= downsample * _MPP_SLACK:
                best = i
        return best

    # --- pixels --------------------------------------------------------------------------------
    @cached_property
    def levels(self) -> list[da.Array]:
        """Lazy (H, W, 3) uint8 dask arrays, finest first; chunks follow the file's tiles."""
        import dask.array as da

        stat = os.stat(self.path)
        token = hashlib.sha1(f"{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return [
            da.from_array(
                _LevelArray(src), chunks=_chunks_for(src), name=f"wsimil-{token}-{i}",
                asarray=False, fancy=False, lock=False, meta=np.empty((0, 0, 0), np.uint8),
            )
            for i, src in enumerate(self._sources)
        ]

    def read_level(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels of a rectangle in ``level``'s own coordinates; outside the slide is white."""
        self._check_open()
        if not 0 <= level < len(self._sources):
            raise SlideError(self.path, f"level {level} does not exist (the slide has {len(self._sources)})")
        src = self._sources[level]
        h, w = src.shape
        out_h, out_w = y1 - y0, x1 - x0
        if out_h <= 0 or out_w <= 0:
            raise SlideError(self.path, f"asked for an empty region ({out_w}x{out_h} px)")
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if cy0 == y0 and cx0 == x0 and cy1 == y1 and cx1 == x1:
            return np.array(src.read(y0, y1, x0, x1), copy=True)
        out = np.full((out_h, out_w, 3), 255, np.uint8)
        if cy1 > cy0 and cx1 > cx0:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = src.read(cy0, cy1, cx0, cx1)
        return out

    def read_region(
        self,
        location: tuple[float, float],
        size: tuple[int, int],
        level: int | None = None,
        mpp: float | None = None,
    ) -> np.ndarray:
        """RGB pixels of ``size`` (w, h) whose top-left is ``location`` (x, y) in level-0 pixels.

        Give ``level`` for a pyramid level, or ``mpp`` for a physical resolution: then the nearest
        finer level is read and resized with an area filter, which is what a patch at "0.5 µm/px"
        means whatever the scanner's native resolution.
        """
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise SlideError(self.path, f"asked for an empty region ({w}x{h} px)")
        if (level is None) == (mpp is None):
            raise ValueError("give exactly one of level= or mpp=")
        x, y = float(location[0]), float(location[1])
        if level is not None:
            ds = self.downsamples[level]
            ly, lx = _floor(y / ds), _floor(x / ds)
            return self.read_level(level, ly, ly + h, lx, lx + w)
        if self.mpp is None:
            raise MissingMppError(self.path)
        target = mpp / self.mpp  # level-0 px per output px
        level = self.best_level_for_downsample(target)
        ds = self.downsamples[level]
        scale = target / ds  # level px per output px (>= ~1 unless upsampling past level 0)
        if abs(scale - 1.0) < 1e-3:
            ly, lx = _floor(y / ds), _floor(x / ds)
            return self.read_level(level, ly, ly + h, lx, lx + w)
        fy, fx = y / ds, x / ds
        ly0, lx0 = int(np.floor(fy)), int(np.floor(fx))
        ly1, lx1 = int(np.ceil(fy + h * scale)), int(np.ceil(fx + w * scale))
        region = self.read_level(level, ly0, max(ly1, ly0 + 1), lx0, max(lx1, lx0 + 1))
        box = (fx - lx0, fy - ly0, fx - lx0 + w * scale, fy - ly0 + h * scale)
        resample = Image.Resampling.BOX if scale > 1 else Image.Resampling.BILINEAR
        return np.asarray(Image.fromarray(region).resize((w, h), resample=resample, box=box))

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide, its long side at most ``max_size`` px, read from a coarse level."""
        h, w = self.level_shapes[0]
        target = max(h, w) / max_size
        level = self.best_level_for_downsample(max(target, 1.0))
        lh, lw = self.level_shapes[level]
        img = self.read_level(level, 0, lh, 0, lw)
        scale = max(lh, lw) / max_size
        if scale > 1:
            img = np.asarray(
                Image.fromarray(img).resize((max(1, round(lw / scale)), max(1, round(lh / scale))), Image.Resampling.BOX)
            )
        return img

    # --- metadata ------------------------------------------------------------------------------
    @property
    def associated_images(self) -> dict[str, np.ndarray]:
        """Label, macro and thumbnail images the scanner stored, read on first access."""
        if not hasattr(self, "_associated"):
            self._associated = {}
            for name, load in self._opened.associated.items():
                try:
                    self._associated[name] = load()
                except Exception:  # a damaged label image must not make the slide unreadable
                    continue
        return self._associated

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for humans, layer metadata and logs."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "mpp": self.mpp,
            "file_mpp": self.file_mpp,
            "objective_power": self.objective_power,
            "dimensions": list(self.dimensions),
            "levels": [list(s) for s in self.level_shapes],
            "downsamples": self.downsamples,
            "file_levels": self.file_level_count,
            "associated_images": sorted(self._opened.associated),
        }

    # --- lifetime ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise SlideError(self.path, "the slide was closed")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._opened.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = f"{self.mpp:.3f} µm/px" if self.mpp else "mpp unknown"
        return f"<Slide {self.path.name} {w}x{h} {mpp} levels={self.level_count} backend={self.backend}>"


def open_slide(path: str | os.PathLike[str], mpp: float | None = None) -> Slide:
    """Open a whole-slide image lazily.

    ``mpp`` sets the pixel size at level 0 (µm/px) when the file lacks it or records it wrongly.
    Raises SlideError with a readable reason for anything that is not a readable slide.
    """
    return Slide(open_backend(path), mpp=mpp)
