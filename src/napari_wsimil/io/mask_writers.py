"""Masks written from row bands, never whole: a pyramidal OME-TIFF and a streamed PNG.

Both read their pixels through a :class:`LabelSampler` (nearest neighbour from a raster store at any
downsample), so a 100,000² slide's mask is written in a few MB of memory. Project exports and
segmentation masks both use them.

OME-TIFF layout: level 0 at the chosen resolution, reduced levels (x2 each, nearest at pixel centres,
until the long side is at most 1024 px) as SubIFDs of level 0, which is what QuPath and Bio-Formats
read as an OME pyramid; 512x512 tiles, zlib; PhysicalSizeX/Y in µm when the pixel size is known. PNG
is streamed row band by row band through zlib, with its pixel size in the pHYs chunk.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from .atomic import atomic_path, atomic_write
from .raster_store import LabelStore, label_shape

TILE = 512
MIN_LEVEL_SIZE = 1024


class Geometry(Protocol):
    """Where a raster sits over its slide: ``downsample`` level-0 px per raster px, and its (h, w)."""

    downsample: float
    shape: tuple[int, int]


class LabelSampler:
    """Nearest-neighbour reads of a slide's labels at any downsample; zeros when none were saved."""

    def __init__(self, store: LabelStore | None, geometry: Geometry):
        self.store = store
        self.geometry = geometry

    def index(self, out_ds: float, start: int, stop: int, axis: int) -> np.ndarray:
        """Label indices along ``axis`` (0 rows, 1 columns) of output pixels start..stop at ``out_ds``."""
        i = np.arange(start, stop, dtype=np.int64)
        ratio = out_ds / self.geometry.downsample
        if abs(ratio - 1.0) > 1e-12:
            i = np.floor((i + 0.5) * ratio).astype(np.int64)
        return np.minimum(i, self.geometry.shape[axis] - 1)

    def band(self, out_ds: float, y0: int, y1: int, width: int) -> np.ndarray:
        rows = self.index(out_ds, y0, y1, 0)
        if self.store is None:
            return np.zeros((y1 - y0, width), np.uint8)
        cols = self.index(out_ds, 0, width, 1)
        if abs(out_ds / self.geometry.downsample - 1.0) <= 1e-12 and width == self.geometry.shape[1]:
            return self.store.read_block(int(rows[0]), int(rows[-1]) + 1, 0, width)
        return self.store.read_points(rows, cols)


def write_ome_tiff(path: Path, sampler: LabelSampler, dims: tuple[int, int], out_ds: float, out_mpp: float | None,
                   name: str, description: str) -> None:
    import tifffile

    levels = []
    ds = out_ds
    while True:
        shape = label_shape(dims, ds)
        levels.append((ds, shape))
        if max(shape) <= MIN_LEVEL_SIZE or min(shape) < 2:
            break
        ds *= 2
    h0, w0 = levels[0][1]
    bigtiff = h0 * w0 > 2**31
    most = sum(h * w for _, (h, w) in levels)  # uncompressed: what the disk-full message can promise
    with atomic_path(path, size_hint=most) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=True) as tw:
        for k, (ds, shape) in enumerate(levels):
            kwargs: dict = {
                "shape": shape, "dtype": np.uint8, "tile": (TILE, TILE), "compression": "zlib",
                "photometric": "minisblack",
            }
            if out_mpp is not None:
                lmpp = out_mpp * ds / out_ds
                kwargs["resolution"] = (1e4 / lmpp, 1e4 / lmpp)
                kwargs["resolutionunit"] = "CENTIMETER"
            if k == 0:
                metadata: dict = {"axes": "YX", "Name": name, "Description": description}
                if out_mpp is not None:
                    metadata.update(PhysicalSizeX=out_mpp, PhysicalSizeY=out_mpp,
                                    PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
                tw.write(_tiles(sampler, ds, shape), subifds=len(levels) - 1, metadata=metadata, **kwargs)
            else:
                tw.write(_tiles(sampler, ds, shape), subfiletype=1, **kwargs)


def _tiles(sampler: LabelSampler, ds: float, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    h, w = shape
    for y0 in range(0, h, TILE):
        strip = sampler.band(ds, y0, min(h, y0 + TILE), w)
        if strip.shape[0] < TILE:
            strip = np.pad(strip, ((0, TILE - strip.shape[0]), (0, 0)))
        for x0 in range(0, w, TILE):
            tile = strip[:, x0:x0 + TILE]
            if tile.shape[1] < TILE:
                tile = np.pad(tile, ((0, 0), (0, TILE - tile.shape[1])))
            yield np.ascontiguousarray(tile)


def write_png(path: Path, shape: tuple[int, int], bands: Iterator[np.ndarray], mpp: float | None,
              text: str | None = None) -> None:
    """A greyscale 8-bit PNG from row bands, streamed through zlib, written atomically."""
    h, w = shape

    def chunk(fh, kind: bytes, data: bytes) -> None:
        fh.write(struct.pack(">I", len(data)) + kind + data)
        fh.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    with atomic_write(path, "wb", size_hint=h * w + h) as fh:  # at most: zlib never grows 8-bit rows by much
        fh.write(b"\x89PNG\r\n\x1a\n")
        chunk(fh, b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        if mpp:
            ppm = max(1, round(1e6 / mpp))
            chunk(fh, b"pHYs", struct.pack(">IIB", ppm, ppm, 1))
        if text:
            chunk(fh, b"tEXt", b"wsimil\x00" + text.encode("latin-1", "replace"))
        comp = zlib.compressobj(6)
        pending = bytearray()
        rows = 0
        for band in bands:
            band = np.asarray(band, np.uint8)
            if band.shape[1] != w:
                raise ValueError(f"band width {band.shape[1]} != {w}")
            rows += band.shape[0]
            filtered = np.zeros((band.shape[0], w + 1), np.uint8)  # filter type 0 (None) per row
            filtered[:, 1:] = band
            pending += comp.compress(filtered.tobytes())
            if len(pending) >= 1 << 20:
                chunk(fh, b"IDAT", bytes(pending))
                pending.clear()
        if rows != h:
            raise ValueError(f"PNG got {rows} rows, expected {h}")
        pending += comp.flush()
        chunk(fh, b"IDAT", bytes(pending))
        chunk(fh, b"IEND", b"")
