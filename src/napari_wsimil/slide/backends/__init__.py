"""Slide backends, one module per reading library, each imported only when a file needs it.

Order matters: tifffile is tried first for TIFF-based files (fast, pure Python plus imagecodecs),
OpenSlide for everything else and for TIFFs tifffile cannot make sense of.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import SlideError
from .base import Backend, BackendSlide

SUPPORTED = "Aperio SVS, Hamamatsu NDPI, OME-TIFF, pyramidal TIFF, DICOM, MIRAX (MRXS), Leica SCN, Philips TIFF, Ventana BIF"


def _backends() -> list[Backend]:
    from .openslide import OpenSlideBackend
    from .tiff import TiffBackend

    return [TiffBackend(), OpenSlideBackend()]


def open_backend(path: str | Path) -> BackendSlide:
    """Open ``path`` with the first backend that reads it, or raise SlideError saying why none did."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SlideError(path, "the file does not exist (was it moved or renamed?)")
    if path.is_dir():
        raise SlideError(path, "it is a folder, not a slide file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise SlideError(path, f"the file cannot be opened ({exc.strerror})") from exc
    if not head:
        raise SlideError(path, "the file is empty")
    errors: list[str] = []
    tried = False
    for backend in _backends():
        try:
            if not backend.can_open(path, head):
                continue
        except SlideError as exc:
            errors.append(exc.reason)
            continue
        tried = True
        try:
            return backend.open(path)
        except SlideError as exc:
            errors.append(f"{backend.name}: {exc.reason}")
    if not tried:
        raise SlideError(path, f"it is not a slide format this tool reads (supported: {SUPPORTED})")
    raise SlideError(path, "; ".join(errors))


__all__ = ["Backend", "BackendSlide", "open_backend", "SUPPORTED"]
