"""tifffile backend: Aperio SVS (JPEG and JPEG 2000), Hamamatsu NDPI, OME-TIFF and generic pyramidal TIFF.

Tiles are read with ``os.pread`` (thread-safe, no shared file position) and decoded by tifffile's
own per-page decoder, which knows the JPEG tables, NDPI restart markers and colour spaces. This
skips zarr's per-chunk machinery, which costs more than decoding a 256² JPEG tile.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import SlideError
from ..level_source import TiledSource, to_rgb8
from .base import Backend, BackendSlide, plausible_mpp

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
JPEG_CODES = {6, 7, 33007, 34892}
ASSOCIATED = {"label", "macro", "thumbnail"}


class TiffPageSource(TiledSource):
    """One pyramid level of a TIFF: a tiled or striped page decoded tile by tile."""

    def __init__(self, path: Path, fd: int, page: Any, file_size: int):
        key = page.keyframe
        depth, th, tw, _ = key.chunks if len(key.chunks) == 4 else (1, *key.chunks[-3:])
        shape = key.imagelength, key.imagewidth
        super().__init__(shape, (th, tw))
        self.path, self.fd = path, fd
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        self.ntiles_x = -(-shape[1] // tw)
        if key.planarconfig != 1 and key.samplesperpixel > 1:
            raise SlideError(path, "colour planes stored separately (planar TIFF) are not supported")
        if len(self.offsets) < self.grid[0] * self.ntiles_x:
            raise SlideError(path, f"level {shape[1]}x{shape[0]} lists fewer tiles than its size needs")
        end = int((self.offsets + self.counts).max(initial=0))
        if end > file_size:
            raise SlideError(
                path, f"the file is truncated: its tiles need {end:,} bytes but the file has {file_size:,}"
            )
        self._decode = key.decode
        self._decodeargs: dict[str, Any] = {"_fullsize": key.is_tiled}
        if key.compression in JPEG_CODES:
            self._decodeargs["jpegtables"] = page.jpegtables
            self._decodeargs["jpegheader"] = key.jpegheader
        self.fill = 255

    def decode_tile(self, ty: int, tx: int) -> np.ndarray:
        index = ty * self.ntiles_x + tx
        th, tw = self.tile
        h = min(th, self.shape[0] - ty * th)
        w = min(tw, self.shape[1] - tx * tw)
        count = int(self.counts[index])
        if count == 0:  # sparse tile: scanners leave background tiles out
            return np.full((h, w, 3), self.fill, np.uint8)
        data = os.pread(self.fd, count, int(self.offsets[index]))
        try:
            segment, _, _ = self._decode(data, index, **self._decodeargs)
        except Exception as exc:  # codec errors come in many types
            raise SlideError(self.path, f"tile {index} (row {ty}, column {tx}) is corrupt: {exc}") from exc
        if segment is None:
            return np.full((h, w, 3), self.fill, np.uint8)
        segment = np.asarray(segment)
        segment = segment.reshape(segment.shape[-3:]) if segment.ndim > 3 else segment
        return to_rgb8(segment[:h, :w])


def _svs_value(description: str, key: str) -> float | None:
    match = re.search(rf"\|\s*{key}\s*=\s*([0-9.eE+-]+)", description)
    return float(match.group(1)) if match else None


def _ome_mpp(ome: str | None) -> float | None:
    if not ome:
        return None
    match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome)
    if not match:
        return None
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', ome)
    factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit.group(1) if unit else "µm")
    return float(match.group(1)) * factor if factor else None


def _resolution_mpp(page: Any) -> float | None:
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value)
    if not num or not den or unit not in (2, 3):
        return None
    per_unit = num / den
    return (25400.0 if unit == 2 else 10000.0) / per_unit


def _describe(tif: Any) -> tuple[str, float | None, float | None, dict[str, str]]:
    page = tif.pages.first
    desc = page.description or ""
    props: dict[str, str] = {"tiff.ImageDescription": desc[:2000]}
    if tif.is_svs:
        mpp, mag = _svs_value(desc, "MPP"), _svs_value(desc, "AppMag")
        return "aperio", plausible_mpp(mpp), mag, props
    if tif.is_ndpi:
        mag = page.tags.get(65421)
        return "hamamatsu", plausible_mpp(_resolution_mpp(page)), float(mag.value) if mag else None, props
    if tif.is_ome:
        ome = tif.ome_metadata
        mag = re.search(r'NominalMagnification="([0-9.]+)"', ome or "")
        return "ome", plausible_mpp(_ome_mpp(ome)), float(mag.group(1)) if mag else None, props
    return "generic-tiff", plausible_mpp(_resolution_mpp(page)), None, props


MAX_IFDS = 10_000


def check_ifd_chain(path: Path) -> None:
    """Walk the chain of image directories (IFDs) before tifffile does, reading a few bytes per IFD.

    Why: a damaged next-IFD pointer that points back to an earlier IFD makes some readers loop for ever
    (the fuzzer found tifffile's series detection spinning past 10 s), and a pointer past the end or a
    directory claiming millions of entries should be named, not followed. A slide has tens of IFDs."""
    import struct

    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            size = os.fstat(fh.fileno()).st_size
            if len(head) < 8 or head[:4] not in TIFF_MAGIC:
                return
            bo = "<" if head[:2] == b"II" else ">"
            big = head[2:4] in (b"+\x00", b"\x00+")
            if big and len(head) < 16:
                raise SlideError(path, "the file is truncated inside its TIFF header")
            # NDPI is classic TIFF with 64-bit IFD offsets (tifffile reads it so when the name ends in .ndpi)
            ndpi = not big and bo == "<" and path.suffix.lower() == ".ndpi"
            wide = big or ndpi
            offset = struct.unpack(bo + ("Q" if wide else "I"), head[8:16] if big else head[4:12] if ndpi
                                   else head[4:8])[0]
            seen: set[int] = set()
            while offset:
                if offset in seen:
                    raise SlideError(path, f"the TIFF's list of images loops back on itself (the directory at byte "
                                           f"{offset:,} is listed twice): the file is damaged")
                if len(seen) >= MAX_IFDS:
                    raise SlideError(path, f"the TIFF lists more than {MAX_IFDS:,} images: the file is damaged")
                count_size, entry, ptr = (8, 20, 8) if big else (2, 12, 8 if ndpi else 4)
                if offset + count_size > size:
                    raise SlideError(path, f"the file is truncated: an image directory at byte {offset:,} lies past "
                                           f"its end ({size:,} bytes)")
                seen.add(offset)
                fh.seek(offset)
                n = struct.unpack(bo + ("Q" if big else "H"), fh.read(count_size))[0]
                end = offset + count_size + n * entry
                if end + ptr > size:
                    raise SlideError(path, f"the file is truncated or damaged: the image directory at byte "
                                           f"{offset:,} claims {n:,} entries, past the end of the file")
                fh.seek(end)
                offset = struct.unpack(bo + ("Q" if wide else "I"), fh.read(ptr))[0]
    except OSError as exc:
        raise SlideError(path, f"the file cannot be read ({exc.strerror or exc})") from exc


class TiffBackend(Backend):
    name = "tifffile"

    def can_open(self, path: Path, head: bytes) -> bool:
        return head[:4] in TIFF_MAGIC

    def open(self, path: Path) -> BackendSlide:
        import tifffile

        check_ifd_chain(path)
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:
            raise SlideError(path, f"the TIFF structure is damaged ({exc})") from exc
        fd = -1
        try:
            if not tif.series:
                raise SlideError(path, "the TIFF holds no image")
            series = tif.series[0]
            if series.ndim not in (2, 3) or (series.ndim == 3 and series.shape[-1] not in (1, 3, 4)):
                raise SlideError(path, f"image of shape {series.shape} is not a 2-D RGB or grey slide")
            pages = [level.pages[0] if hasattr(level, "pages") else level.keyframe for level in series.levels]
            if any(p is None or 0 in p.shape for p in pages):
                raise SlideError(path, "a pyramid level has zero size")
            fd = os.open(path, os.O_RDONLY)
            size = os.fstat(fd).st_size
            levels = [TiffPageSource(path, fd, p, size) for p in pages]
            base = levels[0].shape
            downsamples = [base[1] / lv.shape[1] for lv in levels]
            vendor, mpp, mag, props = _describe(tif)
            associated = {
                s.name.lower(): (lambda s=s: to_rgb8(np.asarray(s.asarray())))
                for s in tif.series[1:]
                if s.name and s.name.lower() in ASSOCIATED
            }
        except SlideError:
            tif.close()
            if fd >= 0:
                os.close(fd)
            raise
        except Exception as exc:
            tif.close()
            if fd >= 0:
                os.close(fd)
            raise SlideError(path, f"the TIFF is damaged or not a slide ({type(exc).__name__}: {exc})") from exc

        lock = threading.Lock()
        closed = [False]

        def close() -> None:
            with lock:
                if not closed[0]:
                    closed[0] = True
                    for level in levels:
                        level.forget()
                    os.close(fd)
                    tif.close()

        return BackendSlide(
            path=path, backend=self.name, levels=levels, downsamples=downsamples, mpp=mpp,
            objective_power=mag, vendor=vendor, properties=props, associated=associated, close=close,
        )
