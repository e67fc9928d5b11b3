"""OME-Zarr (OME-NGFF 0.4) multiscale images: masks, heatmaps and probability maps for tools that read NGFF.

Why NGFF 0.4 on zarr format 2: it is the version that napari-ome-zarr, QuPath (via Bio-Formats), Fiji's
MoBIE/n5-viewer and vizarr all read today; 0.5 needs zarr format 3, which most of them do not read yet.
ome-zarr-py is not needed: the layout is a zarr group with a ``multiscales`` attribute, written here with
zarr directly and checked against the specification by the tests
(https://ngff.openmicroscopy.org/0.4/#multiscale-md):

* the root group's ``.zattrs`` holds ``multiscales`` (one entry, ``version`` "0.4"), whose ``axes`` are
  ``y`` and ``x`` of ``type`` "space" in ``micrometer`` when the pixel size is known, and whose ``datasets``
  go from finest to coarsest, each with exactly one ``scale`` coordinate transformation (µm per pixel of
  that level, so every level lands on the same physical extent);
* arrays are zarr format 2 with ``"dimension_separator": "/"`` (the spec's requirement for 0.4);
* masks add ``image-label`` (colours and class names per label value), which makes napari-ome-zarr open
  them as a Labels layer; our own description (slide id, downsample, classes...) sits under ``wsimil``.

Written lazily, level by level: level 0 comes in row bands of one chunk's height from the caller and is
stored chunk by chunk, each reduced level is made tile by tile from the level above read back from the
store, so memory is one band plus a few chunks whatever the image size. The store is written under a temporary name beside the target and moved
into place at the end, so a reader never sees half a store and a failed write leaves the old one.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

NGFF_VERSION = "0.4"
CHUNK = 512
#: reduced levels are added until the long side is at most this many pixels
MIN_LEVEL_SIZE = 512
Resample = Literal["nearest", "mean"]
#: ``read_band(y0, y1)`` → the (y1 - y0, width) rows of level 0
BandReader = Callable[[int, int], np.ndarray]


def level_shapes(shape: tuple[int, int], min_size: int = MIN_LEVEL_SIZE) -> list[tuple[int, int]]:
    """Shapes of the pyramid: halved (rounding up, so the last row and column are kept) until the long side
    is at most ``min_size``."""
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"image shape must be positive, got {shape!r}")
    shapes = [(h, w)]
    while max(h, w) > min_size and min(h, w) >= 2:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        shapes.append((h, w))
    return shapes


def multiscales_attrs(n_levels: int, mpp: float | None, name: str, resample: Resample,
                      description: str | None = None) -> dict[str, Any]:
    """The ``multiscales`` entry of NGFF 0.4 for a 2-D (y, x) pyramid of ``n_levels`` halvings."""
    unit = {"unit": "micrometer"} if mpp else {}
    base = float(mpp) if mpp else 1.0
    datasets = [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [base * 2 ** k,
                                                                                           base * 2 ** k]}]}
                for k in range(n_levels)]
    entry: dict[str, Any] = {
        "version": NGFF_VERSION, "name": name,
        "axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
        "datasets": datasets,
        "type": "nearest" if resample == "nearest" else "mean",
        "metadata": {"method": "napari_wsimil.io.ngff: 2x2 " + ("nearest (top-left)" if resample == "nearest"
                                                                else "mean")},
    }
    if description:
        entry["metadata"]["description"] = description
    return entry


def image_label_attrs(classes: Sequence[Any]) -> dict[str, Any]:
    """``image-label`` (NGFF 0.4) for a mask whose values are class ids: one colour and class name each."""
    colors, props = [], []
    for c in classes:
        cid, name, color = _class_fields(c)
        rgb = color.lstrip("#")
        rgba = [int(rgb[i:i + 2], 16) for i in (0, 2, 4)] + [255] if len(rgb) >= 6 else [255, 255, 255, 255]
        colors.append({"label-value": cid, "rgba": rgba})
        props.append({"label-value": cid, "class": name})
    return {"version": NGFF_VERSION, "colors": colors, "properties": props}


def _class_fields(c: Any) -> tuple[int, str, str]:
    if isinstance(c, dict):
        return int(c["id"]), str(c["name"]), str(c.get("color") or "#ffffff")
    return int(c.id), str(c.name), str(getattr(c, "color", None) or "#ffffff")


def write_ngff(path: str | os.PathLike[str], shape: tuple[int, int], read_band: BandReader, *,
               mpp: float | None, name: str, dtype: Any = np.uint8, resample: Resample = "nearest",
               attrs: dict[str, Any] | None = None, classes: Sequence[Any] | None = None,
               description: str | None = None, min_size: int = MIN_LEVEL_SIZE) -> Path:
    """Write an NGFF 0.4 multiscale image at ``path`` (a folder, by convention ``*.ome.zarr``).

    ``read_band(y0, y1)`` gives level 0's rows ``y0:y1`` (full width); ``mpp`` is level 0's µm/px (None:
    unknown, the axes then carry no unit); ``classes`` (objects or dicts with id, name, color) make it a
    label image; ``attrs`` are added to the root attributes (ours go under ``"wsimil"``)."""
    import numcodecs
    import zarr

    path = Path(path)
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    shapes = level_shapes(shape, min_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        compressor = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
        arrays = [root.create_array(str(k), shape=s, chunks=(min(CHUNK, s[0]), min(CHUNK, s[1])), dtype=dtype,
                                    compressors=compressor, fill_value=0,
                                    chunk_key_encoding={"name": "v2", "separator": "/"})
                  for k, s in enumerate(shapes)]
        h0, w0 = shapes[0]
        for y0 in range(0, h0, CHUNK):
            y1 = min(h0, y0 + CHUNK)
            band = np.asarray(read_band(y0, y1))
            if band.shape != (y1 - y0, w0):
                raise ValueError(f"read_band({y0}, {y1}) gave shape {band.shape}, expected {(y1 - y0, w0)}")
            band = band.astype(dtype, copy=False)
            for x0 in range(0, w0, CHUNK):  # chunk by chunk: zarr would encode a whole band's chunks at once
                arrays[0][y0:y1, x0:x0 + CHUNK] = band[:, x0:x0 + CHUNK]
        for k in range(1, len(shapes)):
            src, (h, w) = arrays[k - 1], shapes[k]
            for y0 in range(0, h, CHUNK):
                y1 = min(h, y0 + CHUNK)
                for x0 in range(0, w, CHUNK):
                    x1 = min(w, x0 + CHUNK)
                    fine = np.asarray(src[2 * y0:min(src.shape[0], 2 * y1), 2 * x0:min(src.shape[1], 2 * x1)])
                    arrays[k][y0:y1, x0:x1] = _halve(fine, (y1 - y0, x1 - x0), resample).astype(dtype, copy=False)
        meta: dict[str, Any] = {"multiscales": [multiscales_attrs(len(shapes), mpp, name, resample, description)]}
        if classes is not None:
            meta["image-label"] = image_label_attrs(classes)
        meta.update(attrs or {})
        root.attrs.update(meta)
        _swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _halve(fine: np.ndarray, out_shape: tuple[int, int], resample: Resample) -> np.ndarray:
    """A 2x reduction of ``fine`` to ``out_shape`` (ceil sizes: a lone last row/column stands alone)."""
    h, w = out_shape
    if resample == "nearest":
        return fine[::2, ::2][:h, :w]
    padded = np.pad(fine.astype(np.float64), ((0, 2 * h - fine.shape[0]), (0, 2 * w - fine.shape[1])), mode="edge")
    mean = padded.reshape(h, 2, w, 2).mean(axis=(1, 3))
    if np.issubdtype(fine.dtype, np.integer):
        return np.floor(mean + 0.5)
    return mean


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Move the finished store over ``path``; an old store is set aside first and removed after, so an
    interruption leaves either store whole."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_ngff_levels(path: str | os.PathLike[str]) -> tuple[list[Any], dict[str, Any]]:
    """(zarr arrays finest first, root attributes) of an NGFF multiscale image; arrays stay on disk."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    attrs = dict(root.attrs)
    ms = attrs["multiscales"][0]
    return [root[d["path"]] for d in ms["datasets"]], attrs


__all__ = ["CHUNK", "NGFF_VERSION", "image_label_attrs", "level_shapes", "multiscales_attrs", "read_ngff_levels",
           "write_ngff"]
