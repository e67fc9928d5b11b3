"""A 2-D uint8 raster on disk, chunk by chunk and durably: the store behind pixel labels and probability maps.

One zarr v3 array with 512x512 chunks: a brush stroke touches a few chunks of a 12,500² label image (a
100,000² slide at 4 µm/px), so saving after each stroke rewrites a few kilobytes instead of the whole
image, and chunks that are all 0 are not stored at all. Segmentation runs keep their probability maps
in the same store, which is why it lives here and not in the project package.

Durability. zarr 3.1.6's ``LocalStore`` already writes each key to a ``*.partial`` sibling and renames
it into place, but never fsyncs, so after a power cut a renamed chunk may be empty on some file
systems. The durable store writes through :mod:`.atomic` instead (temporary file, fsync,
``os.replace``, fsync of the folder) and fsyncs the folder after deleting a chunk that became empty.
A crash in the middle of a save therefore leaves every chunk either as it was or as it was meant to
be; a save of several chunks is not one transaction, which for paint strokes is the right trade (a
half-saved stroke is still a valid label image).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import ProjectError
from .atomic import atomic_write, fsync_dir

if TYPE_CHECKING:  # pragma: no cover
    import zarr

CHUNK = 512
FORMAT_VERSION = 1


class HasShape(Protocol):
    """Anything with the (h, w) ``shape`` of the raster to create (a project's ``LabelGeometry``)."""

    shape: tuple[int, int]


def label_shape(dimensions: tuple[int, int], downsample: float) -> tuple[int, int]:
    """(h, w) of a label array over a slide of ``dimensions`` (w, h); the tiny slack keeps an exact
    multiple (2048 / 8) from rounding up because of float error in the downsample."""
    w, h = dimensions
    return max(1, math.ceil(h / downsample - 1e-9)), max(1, math.ceil(w / downsample - 1e-9))



def _durable_put(path: Path, data: Any) -> None:
    parent = path.parent
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb", keep_previous=True, size_hint=memoryview(data).nbytes) as fh:  # the previous chunk, for `project check --repair`
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


class LabelStore:
    """One slide's raster: pixel labels in ``<project>/labels/<slide_id>.zarr``, or a run's probability map."""

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
    def create(cls, path: Path, geometry: HasShape, attrs: dict) -> LabelStore:
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
        with self._decoding():
            return np.asarray(self.array[...], dtype=np.uint8)

    def read_block(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        with self._decoding():
            return np.asarray(self.array[y0:y1, x0:x1], dtype=np.uint8)

    def read_points(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``labels[rows][:, cols]`` decoding only the chunks those rows touch."""
        with self._decoding():
            return np.asarray(self.array.oindex[np.asarray(rows, np.int64), np.asarray(cols, np.int64)],
                              dtype=np.uint8)

    @contextlib.contextmanager
    def _decoding(self) -> Iterator[None]:
        """A chunk that cannot be decoded (a disk error, a truncated copy) is one readable error naming the
        store and the repair, never a codec traceback."""
        try:
            yield
        except ProjectError:
            raise
        except Exception as exc:  # noqa: BLE001 - zstd checksum, short buffer, OSError ...
            raise ProjectError(f"{self.path} is damaged: a chunk cannot be decoded ({str(exc)[:160]}). "
                               "For a project's labels, `wsimil project check PROJECT --repair` (or the Check "
                               "button of the project widget) restores it from its previous good copy") from exc

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


def exists(path: Path) -> bool:
    return (path / "zarr.json").is_file()
