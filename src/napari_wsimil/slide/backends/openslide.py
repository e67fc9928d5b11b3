"""OpenSlide backend: the fallback for formats tifffile does not read (DICOM, MRXS, VSI-less vendors…).

openslide-python and openslide-bin are imported here only, so the package imports without them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import SlideError
from ..level_source import TiledSource
from .base import Backend, BackendSlide, plausible_mpp


def _import_openslide() -> Any:
    try:
        import openslide
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise SlideError(
            None, "this format needs OpenSlide: pip install openslide-python openslide-bin"
        ) from exc
    return openslide


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide returns premultiplied RGBA; transparent areas (outside scanned regions) become white."""
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    return rgb


# OpenSlide's C readers (libdicom among them) can crash the whole process on a damaged file, and a
# crash would take napari and the user's unsaved work with it. So a file is first opened and sampled
# in a child process; only a file that survives there is opened here. Results are cached per
# (path, size, mtime). Set NAPARI_WSIMIL_OPENSLIDE_PROBE=0 to skip (e.g. for trusted batch jobs).
_PROBE = """
import sys, openslide
o = openslide.OpenSlide(sys.argv[1])
lvl = o.level_count - 1
w, h = o.level_dimensions[lvl]
o.read_region((0, 0), lvl, (min(w, 2048), min(h, 2048)))
W, H = o.dimensions
o.read_region((W // 2, H // 2), 0, (64, 64))
o.read_region((0, 0), 0, (64, 64))
"""
_probe_cache: dict[tuple[str, int, int], str | None] = {}
_probe_lock = threading.Lock()


def probe_in_child(path: Path, timeout_s: float = 120.0) -> str | None:
    """None if OpenSlide opens and samples ``path`` in a child process, else why it could not."""
    if os.environ.get("NAPARI_WSIMIL_OPENSLIDE_PROBE", "1") == "0":
        return None
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _probe_lock:
        if key in _probe_cache:
            return _probe_cache[key]
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True,
                              timeout=timeout_s)
        if proc.returncode == 0:
            reason = None
        elif proc.returncode < 0:
            reason = f"the file is damaged: OpenSlide crashed reading it (signal {-proc.returncode})"
        else:
            last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            reason = f"OpenSlide cannot read it ({last})"
    except subprocess.TimeoutExpired:
        reason = f"OpenSlide did not finish reading it within {timeout_s:.0f} s (damaged or unsupported file)"
    with _probe_lock:
        _probe_cache[key] = reason
    return reason


class OpenSlideSource(TiledSource):
    def __init__(self, path: Path, osr: Any, level: int):
        w, h = osr.level_dimensions[level]
        props = osr.properties
        tw = int(props.get(f"openslide.level[{level}].tile-width", 512) or 512)
        th = int(props.get(f"openslide.level[{level}].tile-height", 512) or 512)
        # Small native tiles (DICOM frames of 256, MRXS 256) are grouped so a chunk costs one call.
        tw, th = max(tw, 512), max(th, 512)
        super().__init__((h, w), (min(th, h), min(tw, w)))
        self.path, self.osr, self.level = path, osr, level
        self.ds = float(osr.level_downsamples[level])

    def decode_tile(self, ty: int, tx: int) -> np.ndarray:
        th, tw = self.tile
        y0, x0 = ty * th, tx * tw
        h, w = min(th, self.shape[0] - y0), min(tw, self.shape[1] - x0)
        try:
            img = self.osr.read_region((round(x0 * self.ds), round(y0 * self.ds)), self.level, (w, h))
        except Exception as exc:
            raise SlideError(self.path, f"OpenSlide could not read level {self.level}: {exc}") from exc
        return rgba_to_rgb(np.asarray(img))


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class OpenSlideBackend(Backend):
    name = "openslide"

    def can_open(self, path: Path, head: bytes) -> bool:
        openslide = _import_openslide()
        try:
            return openslide.OpenSlide.detect_format(str(path)) is not None
        except Exception:
            return False

    def open(self, path: Path) -> BackendSlide:
        openslide = _import_openslide()
        reason = probe_in_child(path)
        if reason is not None:
            raise SlideError(path, reason)
        try:
            osr = openslide.OpenSlide(str(path))
        except Exception as exc:
            raise SlideError(path, f"OpenSlide cannot open it ({exc})") from exc
        try:
            if osr.level_count == 0 or 0 in osr.dimensions:
                raise SlideError(path, "the slide has no pixels (zero-size level)")
            levels = [OpenSlideSource(path, osr, i) for i in range(osr.level_count)]
            props = dict(osr.properties)
            mpp = plausible_mpp(_float(props.get(openslide.PROPERTY_NAME_MPP_X)))
            mag = _float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
            associated = {
                name: (lambda name=name: rgba_to_rgb(np.asarray(osr.associated_images[name].convert("RGBA"))))
                for name in osr.associated_images
            }
        except SlideError:
            osr.close()
            raise
        except Exception as exc:
            osr.close()
            raise SlideError(path, f"OpenSlide read a damaged header ({exc})") from exc

        def close() -> None:
            for level in levels:
                level.forget()
            osr.close()

        return BackendSlide(
            path=path, backend=self.name, levels=levels, downsamples=[float(d) for d in osr.level_downsamples],
            mpp=mpp, objective_power=mag, vendor=props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
            properties=props, associated=associated, close=close,
        )
