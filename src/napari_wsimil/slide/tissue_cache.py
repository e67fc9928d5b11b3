"""Tissue masks kept on disk, for a process that opens the same slides again and again.

A federated site answers every message in a fresh process (Flower starts one per message), and a FedMix site
detects the tissue of each of its slides every time: ~0.3 s of CPU per small slide, seconds for a large one,
every round. The mask depends only on the slide file, its pixel size and the detector, so it is kept in a
folder the caller owns (the site's work folder), under a name derived from exactly those: the slide's path,
size and modification time, the µm/px it was opened with, and the detector's own source (a new version of
:mod:`.tissue` never reads an old mask). Files are ``.npz`` of plain arrays (no pickle), written atomically;
one that cannot be read is detected again and replaced.
"""

from __future__ import annotations

import hashlib
import io
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .tissue import TissueMask, tissue_mask


@lru_cache(maxsize=1)
def _detector_version() -> str:
    from . import tissue

    return hashlib.sha256(Path(tissue.__file__).read_bytes()).hexdigest()[:16]


def cache_key(path: str | os.PathLike[str], slide_mpp: float | None) -> str:
    """The file name of a slide's mask: changes with the file, its µm/px and the detector."""
    p = Path(path).resolve()
    st = p.stat()
    text = f"{p}|{st.st_size}|{st.st_mtime_ns}|{slide_mpp!r}|{_detector_version()}"
    return hashlib.sha256(text.encode()).hexdigest()[:32] + ".npz"


def _read(file: Path) -> TissueMask | None:
    try:
        with np.load(file, allow_pickle=False) as z:
            mpp = float(z["mpp"])
            return TissueMask(mask=z["mask"].astype(bool), downsample=float(z["downsample"]),
                              mpp=None if np.isnan(mpp) else mpp,
                              slide_shape=(int(z["slide_shape"][0]), int(z["slide_shape"][1])),
                              mode=str(z["mode"]), threshold=float(z["threshold"]))
    except (OSError, ValueError, KeyError, IndexError):
        return None


def cached_tissue_mask(slide: Any, path: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> TissueMask:
    """:func:`~.tissue.tissue_mask` of ``slide`` (opened from ``path``) with its defaults, read from
    ``cache_dir`` when it was detected before for the same file, µm/px and detector."""
    from ..io.atomic import write_bytes

    file = Path(cache_dir) / cache_key(path, slide.mpp)
    if file.is_file():
        found = _read(file)
        if found is not None:
            return found
    tm = tissue_mask(slide)
    buf = io.BytesIO()
    np.savez(buf, mask=tm.mask, downsample=np.float64(tm.downsample),
             mpp=np.float64(np.nan if tm.mpp is None else tm.mpp), slide_shape=np.asarray(tm.slide_shape, np.int64),
             mode=np.str_(tm.mode), threshold=np.float64(tm.threshold))
    file.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(file, buf.getvalue())
    return tm


__all__ = ["cache_key", "cached_tissue_mask"]
