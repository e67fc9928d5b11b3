"""Pyramidal tiled TIFF writing whose memory does not grow with the image.

A whole-slide image may be 100,000 px on a side, so no level is ever held in memory. Level 0 comes
tile by tile from a callable; while a tile is encoded, its 2x-reduced copy (a 128x128 "quarter") is
spilled raw to a scratch file beside the output. The next level is then assembled from four quarters
per tile, spilling its own quarters, and so on. Memory is a handful of tiles per worker, whatever the
slide size; the scratch files live on disk (page cache, not process memory) and are removed at the end.

Layout chosen so that both tifffile-based readers and OpenSlide read the file:

- every pyramid level is its own top-level page (OpenSlide ignores SubIFDs), reduced levels are marked
  ``subfiletype=1`` (reduced-resolution image);
- the pixel size is stored as XResolution/YResolution in pixels per centimetre on every page (scaled
  per level), which OpenSlide reports as ``openslide.mpp-x``/``-y`` and tifffile as ``page.resolution``;
- RGB is JPEG-compressed as YCbCr 4:2:0, the usual encoding of scanner files.

The file is written to a temporary name beside the target and moved into place with ``os.replace``, so
a reader never sees a half-written slide and an interrupted write leaves the old file, if any, intact.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

TILE = 256
TileFn = Callable[[int, int], np.ndarray]
Progress = Callable[[int, int], None]
Resample = Literal["mean", "nearest"]
Compression = Literal["jpeg", "zlib"]


@dataclass(frozen=True)
class PyramidInfo:
    """What was written: level shapes (height, width), level-0 pixel size, channel count."""

    path: Path
    level_shapes: tuple[tuple[int, int], ...]
    mpp: float | None
    channels: int

    @property
    def level_count(self) -> int:
        return len(self.level_shapes)


def pyramid_shapes(shape: tuple[int, int], min_size: int = 1024) -> list[tuple[int, int]]:
    """Level shapes, halving (floored) until the long side is at most ``min_size``.

    Floor keeps every reduced pixel made only of real pixels; readers derive the downsample from the
    level dimensions, so the ~1 px difference from ceil does not matter.
    """
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"image shape must be positive, got {shape!r}")
    shapes = [(h, w)]
    while max(h, w) > min_size and min(h, w) >= 2:
        h, w = h // 2, w // 2
        shapes.append((h, w))
    return shapes


def write_pyramid(
    path: str | os.PathLike[str],
    shape: tuple[int, int],
    render_tile: TileFn,
    *,
    channels: int = 3,
    mpp: float | None = None,
    description: str | None = None,
    compression: Compression = "jpeg",
    quality: int = 90,
    min_size: int = 1024,
    resample: Resample = "mean",
    workers: int | None = None,
    progress: Progress | None = None,
    ome: bool = False,
    name: str | None = None,
) -> PyramidInfo:
    """Write a tiled pyramidal TIFF whose level 0 is produced by ``render_tile(ty, tx)``.

    ``render_tile`` returns the uint8 tile at tile row ``ty``, column ``tx`` of level 0, shaped
    (256, 256, channels) or (256, 256) for one channel; edge tiles may be smaller (their edge is
    replicated) or full-size with content past the image edge (cropped by readers; reduced levels use
    floor sizes, so it leaks into them by at most the odd last pixel).
    It is called from ``workers`` threads at once, so it must be thread-safe (a pure function of its
    arguments is). ``compression='jpeg'`` needs 3 channels; masks use ``'zlib'`` (lossless) with
    ``resample='nearest'`` so labels stay labels. ``progress(done, total)`` counts tiles of all levels.

    With ``ome`` the file is an OME-TIFF (what QuPath, Bio-Formats and Fiji read with its pixel size): the
    OME-XML takes the first page's description, records PhysicalSizeX/Y in µm and carries ``description``
    as the image's Description (named ``name``), and the reduced levels are SubIFDs of level 0, the OME
    pyramid layout (OpenSlide then sees level 0 only, which is why slides are not written this way).
    """
    path = Path(path)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if compression == "jpeg" and channels != 3:
        raise ValueError("JPEG pyramids need 3 channels; write masks with compression='zlib'")
    if mpp is not None and not (mpp > 0):
        raise ValueError(f"mpp must be positive, got {mpp}")
    shapes = pyramid_shapes(shape, min_size)
    workers = max(1, workers if workers is not None else min(os.cpu_count() or 1, 8))
    total = sum(_ntiles(s)[0] * _ntiles(s)[1] for s in shapes)
    encode = _encoder(compression, quality, channels)

    path.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = path.with_name(f"{path.name}.{token}.tmp")
    spills = [path.with_name(f"{path.name}.{token}.level{i}.spill") for i in range(len(shapes))]
    h0, w0 = shapes[0]
    bigtiff = h0 * w0 * channels > 2**31  # compressed size is far smaller; this is cheap insurance
    done = 0
    try:
        import tifffile

        with tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=ome) as tw, ThreadPoolExecutor(workers) as pool:
            for level, lshape in enumerate(shapes):
                source = _QuarterReader(spills[level], shapes[level - 1], channels) if level else None
                spill_out = spills[level + 1] if level + 1 < len(shapes) else None
                out = _Spill(spill_out, write=True) if spill_out else None
                try:
                    job = _LevelJob(lshape, channels, render_tile if level == 0 else source, out,
                                    resample, encode)
                    chunks = _ordered(pool, job, workers * 3)

                    def counted(it: Iterator[bytes]) -> Iterator[bytes]:
                        nonlocal done
                        for chunk in it:
                            yield chunk
                            done += 1
                            if progress is not None:
                                progress(done, total)

                    lmpp = None if mpp is None else mpp * (h0 / lshape[0] + w0 / lshape[1]) / 2
                    layout = _ome_layout(level, len(shapes), channels, mpp, description, name) if ome else \
                        {"description": description if level == 0 else None, "metadata": None}
                    tw.write(
                        counted(chunks),
                        shape=(*lshape, channels) if channels == 3 else lshape,
                        dtype=np.uint8,
                        tile=(TILE, TILE),
                        photometric="rgb" if channels == 3 else "minisblack",
                        compression=compression,
                        compressionargs={"level": quality} if compression == "jpeg" else None,
                        subfiletype=1 if level else 0,
                        resolution=None if lmpp is None else (1e4 / lmpp, 1e4 / lmpp),
                        resolutionunit=None if lmpp is None else "CENTIMETER",
                        software="napari-wsimil",
                        **layout,
                    )
                finally:
                    if out is not None:
                        out.close()
                    if source is not None:
                        source.close()
                    if level:
                        spills[level].unlink(missing_ok=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        for spill in spills:
            spill.unlink(missing_ok=True)
    return PyramidInfo(path, tuple(shapes), mpp, channels)


def write_image_pyramid(
    path: str | os.PathLike[str],
    image: np.ndarray,
    *,
    mpp: float | None = None,
    description: str | None = None,
    compression: Compression | None = None,
    quality: int = 90,
    min_size: int = 1024,
    resample: Resample | None = None,
    ome: bool = False,
    name: str | None = None,
) -> PyramidInfo:
    """Write an in-memory uint8 image (e.g. a low-resolution ground-truth mask) the same way.

    Single-channel images default to lossless zlib and nearest-neighbour reduction, RGB to JPEG and
    mean reduction.
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    channels = 1 if image.ndim == 2 else image.shape[2]

    def tile(ty: int, tx: int) -> np.ndarray:
        return image[ty * TILE:(ty + 1) * TILE, tx * TILE:(tx + 1) * TILE]

    return write_pyramid(
        path, image.shape[:2], tile, channels=channels, mpp=mpp, description=description,
        compression=compression or ("zlib" if channels == 1 else "jpeg"), quality=quality,
        min_size=min_size, resample=resample or ("nearest" if channels == 1 else "mean"), workers=1,
        ome=ome, name=name,
    )


# --------------------------------------------------------------------------------------------------


def _ome_layout(level: int, count: int, channels: int, mpp: float | None, description: str | None,
                name: str | None) -> dict:
    """tifffile ``write`` arguments of one level of an OME pyramid: level 0 carries the OME metadata and
    announces the reduced levels as its SubIFDs; those are marked reduced-resolution images."""
    if level:
        return {"metadata": None}
    meta: dict = {"axes": "YXS" if channels == 3 else "YX"}
    if name:
        meta["Name"] = name
    if description:
        meta["Description"] = description
    if mpp is not None:
        meta.update(PhysicalSizeX=float(mpp), PhysicalSizeY=float(mpp), PhysicalSizeXUnit="µm",
                    PhysicalSizeYUnit="µm")
    return {"subifds": count - 1, "metadata": meta}


def _ntiles(shape: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // TILE), -(-shape[1] // TILE)


def _encoder(compression: str, quality: int, channels: int) -> Callable[[np.ndarray], bytes]:
    """Encode exactly as tifffile would for the same write() arguments (tiles are passed pre-encoded
    so that rendering, reduction and encoding of one tile all run in one worker)."""
    import imagecodecs

    if compression == "jpeg":
        def encode(tile: np.ndarray) -> bytes:
            return imagecodecs.jpeg_encode(tile, level=quality, colorspace="RGB", outcolorspace="YCBCR",
                                           subsampling=(2, 2))
    elif compression == "zlib":
        def encode(tile: np.ndarray) -> bytes:
            return imagecodecs.zlib_encode(tile)
    else:
        raise ValueError(f"compression must be 'jpeg' or 'zlib', got {compression!r}")
    return encode


def _pad(tile: np.ndarray, channels: int) -> np.ndarray:
    tile = np.asarray(tile, dtype=np.uint8)
    if tile.ndim == 2:
        tile = tile[:, :, None]
    if tile.shape[2] != channels:
        raise ValueError(f"tile has {tile.shape[2]} channels, expected {channels}")
    if tile.shape[:2] != (TILE, TILE):
        if tile.shape[0] > TILE or tile.shape[1] > TILE:
            raise ValueError(f"tile shape {tile.shape[:2]} is larger than {TILE}x{TILE}")
        # replicate the edge so JPEG blocks and reduced levels see no black seam
        tile = np.pad(tile, ((0, TILE - tile.shape[0]), (0, TILE - tile.shape[1]), (0, 0)), mode="edge")
    return np.ascontiguousarray(tile)


def _reduce(tile: np.ndarray, resample: str) -> np.ndarray:
    if resample == "nearest":
        return np.ascontiguousarray(tile[::2, ::2])
    rows = tile[0::2].astype(np.uint16)
    rows += tile[1::2]
    q = rows[:, 0::2] + rows[:, 1::2]
    q += 2  # round half up
    q >>= 2
    return q.astype(np.uint8)


class _Spill:
    """A scratch file of fixed-size records read and written by several threads at given offsets.

    Positional I/O (pread/pwrite) needs no lock; where the OS lacks it (Windows) a lock guards
    seek + read/write.
    """

    def __init__(self, path: Path, write: bool):
        self.fh = open(path, "w+b" if write else "rb", buffering=0)
        self.fd = self.fh.fileno()
        self.positional = hasattr(os, "pread") and hasattr(os, "pwrite")
        self.lock = threading.Lock()

    def write(self, offset: int, data: bytes) -> None:
        if self.positional:
            os.pwrite(self.fd, data, offset)
            return
        with self.lock:
            self.fh.seek(offset)
            self.fh.write(data)

    def read(self, offset: int, size: int) -> bytes:
        if self.positional:
            return os.pread(self.fd, size, offset)
        with self.lock:
            self.fh.seek(offset)
            return self.fh.read(size)

    def close(self) -> None:
        self.fh.close()


class _QuarterReader:
    """Random access to the fixed-size raw quarters that the finer level spilled, row-major by tile."""

    def __init__(self, path: Path, fine_shape: tuple[int, int], channels: int):
        self.spill = _Spill(path, write=False)
        self.nty, self.ntx = _ntiles(fine_shape)
        self.channels = channels
        self.size = (TILE // 2) ** 2 * channels

    def __call__(self, ty: int, tx: int) -> np.ndarray:
        half = TILE // 2
        out = np.empty((TILE, TILE, self.channels), np.uint8)
        last = None
        for dy in (0, 1):
            for dx in (0, 1):
                fy, fx = 2 * ty + dy, 2 * tx + dx
                if fy < self.nty and fx < self.ntx:
                    buf = self.spill.read((fy * self.ntx + fx) * self.size, self.size)
                    last = np.frombuffer(buf, np.uint8).reshape(half, half, self.channels)
                # past the finer level's last tile the reduced tile is outside the image: repeat
                # the neighbour rather than leave black, which would bleed into JPEG blocks
                out[dy * half:(dy + 1) * half, dx * half:(dx + 1) * half] = last if last is not None else 0
        return out

    def close(self) -> None:
        self.spill.close()


class _LevelJob:
    """One tile of one level: get pixels, spill the reduced quarter for the next level, encode."""

    def __init__(self, shape: tuple[int, int], channels: int, source: TileFn, spill: _Spill | None,
                 resample: str, encode: Callable[[np.ndarray], bytes]):
        self.nty, self.ntx = _ntiles(shape)
        self.channels = channels
        self.source = source
        self.spill = spill
        self.resample = resample
        self.encode = encode
        self.qsize = (TILE // 2) ** 2 * channels

    def __len__(self) -> int:
        return self.nty * self.ntx

    def __call__(self, index: int) -> bytes:
        ty, tx = divmod(index, self.ntx)
        tile = _pad(self.source(ty, tx), self.channels)
        if self.spill is not None:
            self.spill.write(index * self.qsize, _reduce(tile, self.resample).tobytes())
        return self.encode(tile if self.channels == 3 else tile[:, :, 0])


def _ordered(pool: ThreadPoolExecutor, job: _LevelJob, lookahead: int) -> Iterator[bytes]:
    """Results of ``job(i)`` in order, at most ``lookahead`` in flight, so memory stays bounded."""
    pending: deque[Future[bytes]] = deque()
    n = len(job)
    submitted = 0
    try:
        while submitted < n or pending:
            while submitted < n and len(pending) < lookahead:
                pending.append(pool.submit(job, submitted))
                submitted += 1
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
        for fut in pending:
            if not fut.cancelled():
                fut.exception()  # wait, so no worker writes to a spill file being removed
