"""Reading mask images (TIFF, OME-TIFF, PNG) as class ids, and resampling them to a slide's labels.

A mask may come from QuPath, from a ground-truth generator or from our own export, at any
downsample. We never read the slide itself: only the mask, band by band (tiled TIFFs are decoded
chunk by chunk through tifffile's zarr view; PNG has no random access and is decoded whole, which
is fine for masks, already far smaller than their slide).

Which downsample a mask has, in order of trust: the caller's ``downsample``; a mask exactly the
shape of the slide's label array (it is at label resolution: this makes our own exports round-trip
bit for bit); the downsample our exports record (OME Description / PNG text chunk /
``downsample=N`` in a TIFF description, as the synthetic ground truth writes); the mask's pixel
size over the slide's; finally the ratio of sizes, snapped to a whole number when that number
explains the mask's size exactly. Whatever the source, a mask whose aspect or size is off by more
than 1 % (beyond a pixel of rounding) belongs to another slide and is refused, saying expected vs found.

Resampling is nearest-neighbour at pixel centres: label pixel i (covering level-0
``[i·d, (i+1)·d)``) takes mask pixel ``floor((i + ½)·d / d_mask)``; label pixels past the mask's
edge are 0 (unlabelled) rather than a smeared copy of the edge.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ProjectError
from .pixel_labels import LabelGeometry

_PIL_SUFFIXES = {".png", ".bmp", ".gif", ".jpg", ".jpeg", ".webp"}
_WHOLE_STRIP_BYTES = 32 * 2**20  # strips larger than this: decode the page once instead of per band


class MaskImage:
    """A single-channel mask image opened lazily; ``points(rows, cols)`` reads ``mask[rows][:, cols]``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ProjectError(f"mask file {self.path} does not exist")
        self.mpp: float | None = None
        self.downsample: float | None = None
        self._whole: np.ndarray | None = None
        self._zarr: Any = None
        self._index: tuple[Any, ...] = ()
        self._tif: Any = None
        if self.path.suffix.lower() in _PIL_SUFFIXES:
            self._open_pil()
        else:
            self._open_tiff()

    # -- opening --------------------------------------------------------------------------------
    def _open_pil(self) -> None:
        from PIL import Image

        try:
            with Image.open(self.path) as im:
                self.shape = (im.height, im.width)
                self._mode = im.mode
                info = dict(im.info)
        except Exception as exc:  # PIL raises many types for unreadable images
            raise ProjectError(f"cannot read mask {self.path.name}: {exc}") from exc
        if self._mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "LA", "RGB", "RGBA"):
            raise ProjectError(f"mask {self.path.name} has image mode {self._mode}; expected a single-channel "
                               "image of class ids")
        dpi = info.get("dpi")
        if dpi and dpi[0]:
            self.mpp = 25400.0 / float(dpi[0])
        self.downsample = _downsample_from_text(info.get("wsimil") or info.get("Description") or "")

    def _open_tiff(self) -> None:
        import tifffile

        try:
            tif = tifffile.TiffFile(self.path)
        except Exception as exc:  # not a TIFF, truncated, ...
            raise ProjectError(f"cannot read mask {self.path.name}: {exc} (masks are TIFF, OME-TIFF or PNG)") from exc
        self._tif = tif
        try:
            series = tif.series[0]
            level = series.levels[0] if series.levels else series
            shape, axes = tuple(level.shape), level.axes
            page = level.keyframe
            keep = [i for i, (n, a) in enumerate(zip(shape, axes)) if a in "YX" or n != 1]
            if [axes[i] for i in keep] != ["Y", "X"]:
                raise ProjectError(f"mask {self.path.name} is {'x'.join(map(str, shape))} ({axes}); expected a "
                                   "single-channel 2-D image of class ids, not RGB or a stack")
            self.shape = (shape[axes.index("Y")], shape[axes.index("X")])
            self._index = tuple(None if i in keep else 0 for i in range(len(shape)))
            dtype = np.dtype(level.dtype)
            if not (dtype == bool or np.issubdtype(dtype, np.integer)):
                raise ProjectError(f"mask {self.path.name} holds {dtype} values; expected integer class ids")
            strip_bytes = (page.chunks[0] if page.chunks else self.shape[0]) * self.shape[1] * dtype.itemsize
            if page.is_tiled or strip_bytes <= _WHOLE_STRIP_BYTES:
                import zarr

                self._zarr = zarr.open(series.aszarr(level=0), mode="r")
            self._read_tiff_metadata(tif, page)
        except ProjectError:
            tif.close()
            raise
        except Exception as exc:
            tif.close()
            raise ProjectError(f"cannot read mask {self.path.name}: {exc}") from exc

    def _read_tiff_metadata(self, tif: Any, page: Any) -> None:
        if tif.is_ome and tif.ome_metadata:
            ome = tif.ome_metadata
            m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome)
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', ome)
            factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit.group(1) if unit else "µm")
            if m and factor:
                self.mpp = float(m.group(1)) * factor
            d = re.search(r"<Description>(.*?)</Description>", ome, re.S)
            if d:
                import html

                self.downsample = _downsample_from_text(html.unescape(d.group(1)))
        if self.downsample is None:
            self.downsample = _downsample_from_text(page.description or "")
        if self.mpp is None:
            tags = page.tags
            if "XResolution" in tags and "ResolutionUnit" in tags:
                num, den = tags["XResolution"].value
                unit_code = int(tags["ResolutionUnit"].value)
                if num and den and unit_code in (2, 3):
                    self.mpp = (25400.0 if unit_code == 2 else 10000.0) * den / num

    # -- reading --------------------------------------------------------------------------------
    def _load_whole(self) -> np.ndarray:
        if self._whole is None:
            if self._tif is not None:
                arr = self._tif.series[0].asarray(level=0)
                arr = arr[tuple(slice(None) if i is None else i for i in self._index)]
            else:
                arr = self._pil_array()
            self._whole = self._check_values(np.asarray(arr))
        return self._whole

    def _pil_array(self) -> np.ndarray:
        from PIL import Image

        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # the user's own mask, not an untrusted download
        try:
            with Image.open(self.path) as im:
                if im.mode == "P":
                    return np.asarray(im)  # palette indices are the class ids
                arr = np.asarray(im)
        finally:
            Image.MAX_IMAGE_PIXELS = old
        if arr.ndim == 3:
            if arr.shape[2] in (2, 4):  # drop alpha
                arr = arr[:, :, :-1]
            if arr.shape[2] == 3 and not ((arr[:, :, 0] == arr[:, :, 1]).all()
                                          and (arr[:, :, 0] == arr[:, :, 2]).all()):
                raise ProjectError(f"mask {self.path.name} is a colour image; expected a single-channel image "
                                   "whose values are class ids (a palette PNG also works)")
            arr = arr[:, :, 0]
        return arr

    def _check_values(self, arr: np.ndarray) -> np.ndarray:
        if arr.dtype == np.uint8:
            return arr
        if arr.dtype == bool:
            return arr.astype(np.uint8)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
            raise ProjectError(f"mask {self.path.name} holds values {int(arr.min())}..{int(arr.max())}; "
                               "class ids are 0-255")
        return arr.astype(np.uint8)

    def points(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``mask[rows][:, cols]`` as uint8, reading contiguous runs as slices."""
        rows = np.asarray(rows, np.int64)
        cols = np.asarray(cols, np.int64)
        if len(rows) == 0 or len(cols) == 0:
            return np.zeros((len(rows), len(cols)), np.uint8)
        if self._zarr is None:
            return self._load_whole()[np.ix_(rows, cols)]
        rsel: Any = _as_slice(rows)
        csel: Any = _as_slice(cols)
        yx = iter((rsel, csel))
        key = [next(yx) if i is None else i for i in self._index]
        if all(isinstance(k, (slice, int)) for k in key):
            arr = self._zarr[tuple(key)]
        else:
            key = [np.arange(k.start, k.stop) if isinstance(k, slice) else k for k in key]
            arr = self._zarr.oindex[tuple(key)]
        return self._check_values(np.asarray(arr))

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __enter__(self) -> MaskImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_slice(idx: np.ndarray) -> slice | np.ndarray:
    if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and (len(idx) < 2 or bool((np.diff(idx) == 1).all())):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _downsample_from_text(text: str) -> float | None:
    text = text.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
            v = d.get("wsimil", d).get("downsample")
            return float(v) if v and float(v) > 0 else None
        except (ValueError, AttributeError, TypeError):
            return None
    m = re.search(r"downsample\s*=\s*([0-9]+(?:\.[0-9]+)?)", text)
    return float(m.group(1)) if m and float(m.group(1)) > 0 else None


# ------------------------------------------------------------------------------------------ fitting


def _misfit(mask_shape: tuple[int, int], dims: tuple[int, int], ds: float) -> str | None:
    """Why a mask of ``mask_shape`` (h, w) at ``ds`` does not cover a slide of ``dims`` (w, h), or None."""
    w, h = dims
    mh, mw = mask_shape
    ew, eh = w / ds, h / ds
    if abs(mw - ew) > 1 + 0.01 * ew or abs(mh - eh) > 1 + 0.01 * eh:
        return (f"at downsample {ds:g} a mask of this {w} x {h} px slide is about {math.ceil(ew)} x "
                f"{math.ceil(eh)} px (w x h), but the mask is {mw} x {mh} px")
    return None


def choose_downsample(mask: MaskImage, dims: tuple[int, int], slide_mpp: float | None, geometry: LabelGeometry,
                      downsample: float | None = None) -> float:
    """The mask's downsample (level-0 px per mask px); ProjectError if the mask does not fit the slide."""
    w, h = dims
    mh, mw = mask.shape
    name = mask.path.name
    if downsample is not None:
        try:
            ds = float(downsample)
        except (TypeError, ValueError):
            raise ProjectError(f"mask downsample must be a number, got {downsample!r}") from None
        if not (ds > 0 and math.isfinite(ds)):
            raise ProjectError(f"mask downsample must be positive, got {downsample!r}")
        why = _misfit(mask.shape, dims, ds)
        if why:
            raise ProjectError(f"mask {name} does not fit the slide: {why}")
        return ds
    if (mh, mw) == geometry.shape:
        return geometry.downsample
    aspect_m, aspect_s = mw / mh, w / h
    tol = 0.01 + 1.0 / mw + 1.0 / mh
    if abs(aspect_m - aspect_s) / aspect_s > tol:
        raise ProjectError(f"mask {name} does not fit the slide: the mask is {mw} x {mh} px (aspect {aspect_m:.3f}) "
                           f"but the slide is {w} x {h} px (aspect {aspect_s:.3f}); is it another slide's mask?")
    candidates = []
    if mask.downsample:
        candidates.append(mask.downsample)
    if mask.mpp and slide_mpp:
        candidates.append(mask.mpp / slide_mpp)
    for ds in candidates:
        if _misfit(mask.shape, dims, ds) is None:
            return _snap(ds, dims, mask.shape)
    est = w / mw if mw >= mh else h / mh
    return _snap(est, dims, mask.shape)


def _snap(ds: float, dims: tuple[int, int], mask_shape: tuple[int, int]) -> float:
    """A whole-number downsample when one explains the mask's size exactly (ceil or floor per axis)."""
    r = round(ds)
    if r >= 1 and abs(ds - r) / r < 0.01:
        w, h = dims
        mh, mw = mask_shape
        if all(m in (math.floor(d / r), math.ceil(d / r)) for m, d in ((mw, w), (mh, h))):
            return float(r)
    return float(ds)


def resampled_bands(mask: MaskImage, mask_ds: float, geometry: LabelGeometry,
                    band: int) -> Iterator[tuple[int, np.ndarray]]:
    """(y0, rows y0..y0+band of the label array) from the mask, nearest at pixel centres."""
    lh, lw = geometry.shape
    mh, mw = mask.shape
    ratio = geometry.downsample / mask_ds
    same = abs(ratio - 1.0) < 1e-12
    cols = np.arange(lw, dtype=np.int64) if same else np.floor((np.arange(lw) + 0.5) * ratio).astype(np.int64)
    cvalid = cols < mw
    for y0 in range(0, lh, band):
        y1 = min(lh, y0 + band)
        ys = np.arange(y0, y1, dtype=np.int64)
        rows = ys if same else np.floor((ys + 0.5) * ratio).astype(np.int64)
        rvalid = rows < mh
        out = np.zeros((y1 - y0, lw), np.uint8)
        if rvalid.any() and cvalid.any():
            block = mask.points(rows[rvalid], cols[cvalid])
            if rvalid.all() and cvalid.all():
                out = block
            else:
                out[np.ix_(rvalid, cvalid)] = block
        yield y0, out
