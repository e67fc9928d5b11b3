"""Pixel-label access of a project: each slide's label store, opened on first use, and saving into it.

:class:`PixelLabelAccess` is the part of :class:`~.folder.ProjectFolder` that reads and writes
``DIR/labels/<slide_id>.zarr`` (the storage and geometry are described in pixel_labels.py): where a
slide's labels lie over it, whole-array and per-chunk saves (a brush stroke rewrites only the
chunks it touched), and importing a mask image. Every write checks the values against the class
table first and records the table in the store's attributes, so a label store read on its own
still says what its values mean.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io.raster_store import CHUNK, LabelStore, dirty_chunks, label_shape
from ..io.raster_store import exists as store_exists
from .errors import ProjectError
from .pixel_labels import (LabelGeometry, as_label_array, check_class_ids, class_counts, compute_geometry,
                           count_values, store_path, value_lut)

if TYPE_CHECKING:  # pragma: no cover
    import threading

    from .classes import ClassDef
    from .schema import SlideRecord


class PixelLabelAccess:
    """The pixel labels of a project's slides (a mixin of :class:`~.folder.ProjectFolder`).

    It keeps the open label stores in ``_stores`` (slide id -> store); the host gives it the project's
    folder, label resolution, class table, lock state and slide records (declared below)."""

    if TYPE_CHECKING:  # what the host class provides
        root: Path
        label_mpp: float
        _classes: list[ClassDef]
        _mutex: threading.RLock
        _stores: dict[str, LabelStore]

        @property
        def readonly(self) -> bool: ...
        def record(self, slide_id: str) -> SlideRecord: ...
        def slide_mpp(self, slide_id: str) -> float | None: ...
        def _check_writable(self) -> None: ...

    def _drop_stores(self, slide_id: str | None = None) -> None:
        """Forget the open store of one slide (its files moved) or of all (reload, close)."""
        if slide_id is None:
            self._stores.clear()
        else:
            self._stores.pop(slide_id, None)

    def label_geometry(self, slide_id: str) -> LabelGeometry:
        """Downsample, µm/px and shape of the slide's label array (from the saved labels if any)."""
        rec = self.record(slide_id)
        if rec.dimensions is None:
            raise ProjectError(f"slide '{slide_id}' has no recorded size; relink it to record it")
        mpp = self.slide_mpp(slide_id)
        computed = compute_geometry(rec.dimensions, mpp, self.label_mpp)
        store = self._label_store(slide_id, create=False)
        if store is None:
            return computed
        ds = float(store.attrs.get("downsample", computed.downsample))
        shape = store.shape
        if abs(ds - computed.downsample) <= 1e-9 * ds and shape == computed.shape:
            return computed
        if shape != label_shape(rec.dimensions, ds):
            raise ProjectError(f"the saved labels of '{slide_id}' ({shape[1]} x {shape[0]} at downsample {ds:g}) "
                               f"do not cover the slide ({rec.dimensions[0]} x {rec.dimensions[1]} px)")
        note = (f"labels were saved at downsample {ds:g}; the slide's pixel size has changed since, so they keep "
                "that downsample to stay aligned")
        return LabelGeometry(ds, None if mpp is None else mpp * ds, shape, note)

    def _label_store(self, slide_id: str, create: bool, geometry: LabelGeometry | None = None) -> LabelStore | None:
        with self._mutex:
            store = self._stores.get(slide_id)
            if store is not None:
                return store
            path = store_path(self.root, slide_id)
            if store_exists(path):
                store = LabelStore.open(path, readonly=self.readonly)
            elif create:
                self._check_writable()
                geometry = geometry or self.label_geometry(slide_id)
                store = LabelStore.create(path, geometry, self._label_attrs(slide_id, geometry))
            else:
                return None
            self._stores[slide_id] = store
            return store

    def _label_attrs(self, slide_id: str, geometry: LabelGeometry) -> dict:
        rec = self.record(slide_id)
        return {
            "slide_id": slide_id, "downsample": geometry.downsample, "mpp": geometry.mpp,
            "slide_dimensions": list(rec.dimensions or ()), "classes": [c.to_json() for c in self._classes],
        }

    def has_pixel_labels(self, slide_id: str) -> bool:
        self.record(slide_id)
        return store_exists(store_path(self.root, slide_id))

    def pixel_labels(self, slide_id: str) -> np.ndarray:
        """The slide's labels at label resolution (uint8 class ids; zeros where nothing is labelled)."""
        geometry = self.label_geometry(slide_id)
        store = self._label_store(slide_id, create=False)
        if store is None:
            return np.zeros(geometry.shape, np.uint8)
        return store.read()

    def pixel_label_points(self, slide_id: str) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], float] | None:
        """``(read_points, downsample)`` for the slide's saved labels, None when nothing is painted.

        ``read_points(rows, cols)`` returns ``labels[np.ix_(rows, cols)]`` decoding only the chunks it
        touches, so training code can sample labels under patches without loading the whole array."""
        if not self.has_pixel_labels(slide_id):
            return None
        geometry = self.label_geometry(slide_id)
        store = self._label_store(slide_id, create=False)
        return (store.read_points, geometry.downsample) if store is not None else None

    def save_pixel_labels(self, slide_id: str, array: Any, dirty: Iterable[Sequence[int]] | None = None) -> int:
        """Save labels; with ``dirty`` boxes (y0, y1, x0, x1 in label px) only the chunks they touch are
        written. Each chunk file is replaced atomically. Returns the number of chunks written."""
        self._check_writable()
        geometry = self.label_geometry(slide_id)
        arr = as_label_array(array, geometry.shape, slide_id)
        with self._mutex:
            if dirty is None:
                check_class_ids(class_counts(arr), slide_id, self._classes)
                store = self._label_store(slide_id, create=True, geometry=geometry)
                store.update_attrs({"classes": [c.to_json() for c in self._classes]})
                store.write_all(arr)
                h, w = geometry.shape
                return -(-h // store.array.chunks[0]) * -(-w // store.array.chunks[1])
            chunks = dirty_chunks(dirty, geometry.shape)
            if not chunks:
                return 0
            boxes = [(cy * CHUNK, (cy + 1) * CHUNK, cx * CHUNK, (cx + 1) * CHUNK) for cy, cx in chunks]
            check_class_ids(class_counts(arr, boxes), slide_id, self._classes)
            store = self._label_store(slide_id, create=True, geometry=geometry)
            store.update_attrs({"classes": [c.to_json() for c in self._classes]})
            return store.write_chunks(arr, chunks)

    def import_mask(self, slide_id: str, mask_path: str | os.PathLike[str], downsample: float | None = None,
                    values: Mapping[int, int] | None = None) -> dict[str, int]:
        """Replace the slide's pixel labels by a mask image (TIFF, OME-TIFF or PNG of class ids).

        The mask is resampled (nearest) from its downsample to label resolution, band by band; see
        mask_io.py for how its downsample is found when not given. ``values`` maps mask values to
        class ids (e.g. ``{255: 1}`` for a 0/255 tumour mask). Everything is checked before anything
        is written. Returns pixels per class name.
        """
        from .mask_io import MaskImage, choose_downsample, resampled_bands

        self._check_writable()
        rec = self.record(slide_id)
        geometry = self.label_geometry(slide_id)
        lut = value_lut(values)
        path = Path(mask_path)
        with MaskImage(path) as mask:
            ds = choose_downsample(mask, rec.dimensions, self.slide_mpp(slide_id), geometry, downsample)
            counts = np.zeros(256, np.int64)
            for _, band in resampled_bands(mask, ds, geometry, CHUNK):
                count_values(lut[band], counts)
            try:
                check_class_ids(counts, slide_id, self._classes)
            except ProjectError as exc:
                raise ProjectError(f"cannot import {path.name}: {exc}. Map mask values to class ids with "
                                   "values={mask_value: class_id}") from None
            with self._mutex:
                store = self._label_store(slide_id, create=True, geometry=geometry)
                store.update_attrs({"classes": [c.to_json() for c in self._classes]})
                for y0, band in resampled_bands(mask, ds, geometry, CHUNK):
                    store.write_rows(y0, lut[band])
        names = {c.id: c.name for c in self._classes}
        return {names[int(v)]: int(counts[v]) for v in np.flatnonzero(counts)}

