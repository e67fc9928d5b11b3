"""Pixel labels on disk: one zarr v3 array per slide, saved chunk by chunk, each chunk atomically.

Why zarr with 512x512 chunks: a brush stroke touches a few chunks of a 12,500² label image
(a 100,000² slide at 4 µm/px), so saving after each stroke rewrites a few kilobytes instead of the
whole 156 MB image, and unpainted chunks (all 0) are not stored at all.

Durability. zarr 3.1.6's ``LocalStore`` already writes each key to a ``*.partial`` sibling and
renames it into place, but never fsyncs, so after a power cut a renamed chunk may be empty on
some file systems. :class:`DurableLocalStore` writes through :mod:`.atomic` instead (temporary
file, fsync, ``os.replace``, fsync of the folder) and fsyncs the folder after deleting a chunk that
became empty. A crash in the middle of a save therefore leaves every chunk either as it was or as
it was meant to be; a save of several chunks is not one transaction, which for paint strokes is
the right trade (a half-saved stroke is still a valid label image).

Geometry. The array covers the whole slide at ``downsample`` level-0 px per label pixel:
``shape = ceil(slide_dim / downsample)``; label pixel (i, j) covers level-0 corners
``[j·d, (j+1)·d) x [i·d, (i+1)·d)``. The downsample comes from the project's label µm/px and the
slide's µm/px and is stored in the array's attributes, so labels stay aligned with the slide even
if the slide's µm/px override changes later.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_write, fsync_dir
from .errors import ProjectError

if TYPE_CHECKING:  # pragma: no cover
    import zarr

CHUNK = 512
NO_MPP_DOWNSAMPLE = 8.0
FORMAT_VERSION = 1

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), end-exclusive, label pixels


@dataclass(frozen=True)
class LabelGeometry:
    """Where a slide's label array sits: ``downsample`` level-0 px per label px, its µm/px (None when
    the slide's pixel size is unknown) and ``shape`` (h, w). ``note`` explains anything unusual."""

    downsample: float
    mpp: float | None
    shape: tuple[int, int]
    note: str | None = None


def label_shape(dimensions: tuple[int, int], downsample: float) -> tuple[int, int]:
    """(h, w) of a label array over a slide of ``dimensions`` (w, h); the tiny slack keeps an exact
    multiple (2048 / 8) from rounding up because of float error in the downsample."""
    w, h = dimensions
    return max(1, math.ceil(h / downsample - 1e-9)), max(1, math.ceil(w / downsample - 1e-9))


def compute_geometry(dimensions: tuple[int, int], slide_mpp: float | None, label_mpp: float) -> LabelGeometry:
    if slide_mpp is None:
        ds = NO_MPP_DOWNSAMPLE
        return LabelGeometry(ds, None, label_shape(dimensions, ds),
                             f"the slide does not record its pixel size, so its labels use a fixed downsample "
                             f"of {ds:g} instead of {label_mpp:g} µm/px; set the slide's µm/px before labelling "
                             "to get the project's resolution")
    ds = label_mpp / slide_mpp
    if ds < 1.0:
        return LabelGeometry(1.0, slide_mpp, label_shape(dimensions, 1.0),
                             f"the slide's pixels ({slide_mpp:g} µm) are coarser than the label resolution "
                             f"({label_mpp:g} µm/px); labels use the slide's own pixels")
    return LabelGeometry(ds, float(label_mpp), label_shape(dimensions, ds))  # exactly, not slide_mpp * ds


# ------------------------------------------------------------------------------------ durable store


def _durable_put(path: Path, data: Any) -> None:
    parent = path.parent
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    for d in missing:  # new chunk folders: persist their own directory entries too
        fsync_dir(d.parent)


def durable_store_class() -> type:
    """``LocalStore`` whose writes are fsync'ed atomic replacements (see the module docstring).

    Built on first use so that importing this module does not import zarr.
    """
    global _STORE_CLASS
    if _STORE_CLASS is not None:
        return _STORE_CLASS
    from zarr.storage import LocalStore

    class DurableLocalStore(LocalStore):
        async def set(self, key: str, value: Any) -> None:
            if not self._is_open:
                await self._open()
            self._check_writable()
            await asyncio.to_thread(_durable_put, self.root / key, value.as_buffer_like())

        async def set_if_not_exists(self, key: str, value: Any) -> None:
            if not (self.root / key).exists():
                await self.set(key, value)

        def set_sync(self, key: str, value: Any) -> None:
            self._ensure_open_sync()
            self._check_writable()
            _durable_put(self.root / key, value.as_buffer_like())

        async def delete(self, key: str) -> None:
            await super().delete(key)
            await asyncio.to_thread(fsync_dir, (self.root / key).parent)

    _STORE_CLASS = DurableLocalStore
    return DurableLocalStore


_STORE_CLASS: type | None = None


# ------------------------------------------------------------------------------------- label store


class LabelStore:
    """One slide's pixel labels in ``<project>/labels/<slide_id>.zarr``."""

    def __init__(self, path: Path, array: zarr.Array):
        self.path = path
        self.array = array

    @classmethod
    def open(cls, path: Path, readonly: bool = False) -> LabelStore:
        import zarr

        store = durable_store_class()(path, read_only=readonly)
        try:
            arr = zarr.open_array(store=store, mode="r" if readonly else "r+",
                                  config={"write_empty_chunks": False})
        except Exception as exc:  # zarr raises several types for a missing or damaged zarr.json
            raise ProjectError(f"the pixel labels in {path} cannot be opened ({exc}); move the folder aside "
                               "to start the slide's labels afresh") from exc
        if arr.ndim != 2 or arr.dtype != np.uint8:
            raise ProjectError(f"the pixel labels in {path} are {arr.dtype} {arr.shape}, expected a 2-D uint8 array")
        return cls(path, arr)

    @classmethod
    def create(cls, path: Path, geometry: LabelGeometry, attrs: dict) -> LabelStore:
        import zarr
        from zarr.codecs import BytesCodec, ZstdCodec

        path.parent.mkdir(parents=True, exist_ok=True)
        store = durable_store_class()(path)
        arr = zarr.create_array(
            store=store, shape=geometry.shape, chunks=(CHUNK, CHUNK), dtype="uint8", fill_value=0,
            serializer=BytesCodec(), compressors=[ZstdCodec(level=3, checksum=True)],
            attributes={"wsimil_labels": FORMAT_VERSION, **attrs}, overwrite=False,
            config={"write_empty_chunks": False}, dimension_names=["y", "x"],
        )
        fsync_dir(path.parent)
        return cls(path, arr)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def attrs(self) -> dict:
        return dict(self.array.attrs)

    def update_attrs(self, attrs: dict) -> None:
        current = self.attrs
        if any(current.get(k) != v for k, v in attrs.items()):
            self.array.update_attributes(attrs)

    def read(self) -> np.ndarray:
        return np.asarray(self.array[...], dtype=np.uint8)

    def read_block(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.asarray(self.array[y0:y1, x0:x1], dtype=np.uint8)

    def read_points(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``labels[rows][:, cols]`` decoding only the chunks those rows touch."""
        return np.asarray(self.array.oindex[np.asarray(rows, np.int64), np.asarray(cols, np.int64)],
                          dtype=np.uint8)

    def write_all(self, array: np.ndarray) -> None:
        self.array[...] = array

    def write_rows(self, y0: int, block: np.ndarray) -> None:
        self.array[y0:y0 + block.shape[0], :] = block

    def write_chunks(self, array: np.ndarray, chunks: Iterable[tuple[int, int]]) -> int:
        """Write the given (chunk row, chunk column)s of ``array``; returns the number written.

        Runs of neighbouring chunks in a row go in one call (fewer round trips through zarr's event
        loop); every region is chunk-aligned, so zarr never reads a chunk back to merge it.
        """
        h, w = self.shape
        n = 0
        for cy, runs in _runs(chunks):
            y0, y1 = cy * CHUNK, min(h, (cy + 1) * CHUNK)
            for cx0, cx1 in runs:
                x0, x1 = cx0 * CHUNK, min(w, cx1 * CHUNK)
                self.array[y0:y1, x0:x1] = np.array(array[y0:y1, x0:x1], copy=True)
                n += cx1 - cx0
        return n


def dirty_chunks(boxes: Iterable[Sequence[int]], shape: tuple[int, int], chunk: int = CHUNK) -> set[tuple[int, int]]:
    """Chunk indices (row, column) that the (y0, y1, x0, x1) boxes touch, clipped to the array."""
    h, w = shape
    out: set[tuple[int, int]] = set()
    for box in boxes:
        try:
            y0, y1, x0, x1 = (int(v) for v in box)
        except (TypeError, ValueError):
            raise ProjectError(f"a dirty region is (y0, y1, x0, x1) in label pixels, got {box!r}") from None
        y0, y1, x0, x1 = max(0, y0), min(h, y1), max(0, x0), min(w, x1)
        if y1 <= y0 or x1 <= x0:
            continue
        for cy in range(y0 // chunk, (y1 - 1) // chunk + 1):
            for cx in range(x0 // chunk, (x1 - 1) // chunk + 1):
                out.add((cy, cx))
    return out


def _runs(chunks: Iterable[tuple[int, int]]) -> list[tuple[int, list[tuple[int, int]]]]:
    by_row: dict[int, list[int]] = {}
    for cy, cx in chunks:
        by_row.setdefault(cy, []).append(cx)
    out = []
    for cy in sorted(by_row):
        xs = sorted(set(by_row[cy]))
        runs: list[tuple[int, int]] = []
        start = prev = xs[0]
        for x in xs[1:]:
            if x != prev + 1:
                runs.append((start, prev + 1))
                start = x
            prev = x
        runs.append((start, prev + 1))
        out.append((cy, runs))
    return out


def count_values(array: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Pixels per value 0-255 of a uint8 array, added to ``counts``.

    bincount is linear (np.unique would sort 156 MB) but casts its input to int64, 8 bytes a pixel:
    going through ~1 Mpx row blocks keeps that temporary at 8 MB whatever the array size.
    """
    if counts is None:
        counts = np.zeros(256, np.int64)
    arr = np.asarray(array, np.uint8)
    if arr.ndim != 2:
        arr = arr.reshape(1, -1)
    step = max(1, (1 << 20) // max(1, arr.shape[1]))
    for y in range(0, arr.shape[0], step):
        block = arr[y:y + step]
        if block.size:
            counts += np.bincount(block.ravel(), minlength=256)
    return counts


def class_counts(array: np.ndarray, boxes: Iterable[Box] | None = None) -> np.ndarray:
    """Pixels per value 0-255 in the whole array or in the given (y0, y1, x0, x1) boxes."""
    counts = np.zeros(256, np.int64)
    if boxes is None:
        return count_values(array, counts)
    for y0, y1, x0, x1 in boxes:
        count_values(array[max(0, y0):max(0, y1), max(0, x0):max(0, x1)], counts)
    return counts


def as_label_array(array: Any, shape: tuple[int, int], slide_id: str) -> np.ndarray:
    """The caller's array as uint8 of the label shape, or a ProjectError saying what is wrong."""
    arr = np.asarray(array)
    if arr.shape != tuple(shape):
        raise ProjectError(f"pixel labels of '{slide_id}' must be {shape[0]} x {shape[1]} (h x w, the slide at "
                           f"label resolution), got {' x '.join(map(str, arr.shape))}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ProjectError(f"pixel labels of '{slide_id}' must be integer class ids, got {arr.dtype}")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0 or hi > 255:
        raise ProjectError(f"pixel labels of '{slide_id}' hold values {lo}..{hi}; class ids are 0-255")
    return arr.astype(np.uint8)


def store_path(root: Path, slide_id: str) -> Path:
    return root / "labels" / f"{slide_id}.zarr"


def exists(path: Path) -> bool:
    return (path / "zarr.json").is_file()

