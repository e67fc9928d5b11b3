"""Feature bags: one file per slide with the patch coordinates and their features.

A bag is an ``.npz`` file (numpy only, no pickle, readable anywhere) holding ``coords`` (N, 2) int64
level-0 x, y, ``features`` (N, D) float32 and ``attrs``, a JSON text saying what made it: encoder name
and version, patch size, µm/px, slide path, and the slide file's size and mtime. It is written to a
temporary sibling and renamed into place, so a bag on disk is always complete: an interrupted
extraction leaves the previous bag (or none), never a truncated one. :func:`is_stale` compares the
attrs with the encoder and slide at hand so that runs recompute exactly what changed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import WsimilError
from ..io.atomic import atomic_write
from ..io.npz import open_npz

if TYPE_CHECKING:  # pragma: no cover
    from ..slide import Slide
    from .encoder_base import Encoder

#: Format of the file itself; bump when its layout changes (bags of another format are stale).
BAG_FORMAT = 1
BAG_SUFFIX = ".npz"


class BagError(WsimilError):
    """A bag file is missing, truncated or not a bag."""


@dataclass(eq=False)
class Bag:
    """Patch coordinates (level 0) and their features for one slide, plus what produced them."""

    coords: np.ndarray
    features: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, np.int64).reshape(-1, 2)
        self.features = np.asarray(self.features, np.float32)
        if self.features.ndim != 2 or len(self.features) != len(self.coords):
            raise ValueError(f"{len(self.coords)} coords need ({len(self.coords)}, D) features, "
                             f"got {self.features.shape}")

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temporary sibling, fsync, rename)."""
        path = Path(path)
        attrs = {"format": BAG_FORMAT, **self.attrs}
        with atomic_write(path, "wb", size_hint=self.coords.nbytes + self.features.nbytes) as fh:
            np.savez(fh, coords=self.coords, features=self.features, attrs=np.array(json.dumps(attrs)))
        return path


def slide_stamp(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a slide file's content cheaply: its path, size and modification time."""
    path = Path(path)
    st = path.stat()
    return {"slide_path": str(path.resolve()), "slide_size": int(st.st_size),
            "slide_mtime_ns": int(st.st_mtime_ns)}


def bag_attrs(encoder: Encoder, slide: Slide, patch_size: int, mpp: float | None,
              **extra: Any) -> dict[str, Any]:
    """The attrs a bag made now by ``encoder`` from ``slide`` carries."""
    return {**encoder.identity, "patch_size": int(patch_size), "mpp": None if mpp is None else float(mpp),
            "slide_mpp": slide.mpp, **slide_stamp(slide.path), **extra}


def patch_size_level0(attrs: dict[str, Any]) -> float:
    """Side of one patch in level-0 pixels: the patch size scaled by patch µm/px over slide µm/px
    (the patch size itself when either is unknown, i.e. patches were read at level 0)."""
    patch, mpp, slide_mpp = int(attrs["patch_size"]), attrs.get("mpp"), attrs.get("slide_mpp")
    return patch * float(mpp) / float(slide_mpp) if mpp and slide_mpp else float(patch)


def read_bag_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Only the attrs (npz members load lazily: the features stay on disk)."""
    with open_npz(path, BagError, "bag", "feature bag") as (_z, attrs):
        return attrs


def read_bag(path: str | os.PathLike[str]) -> Bag:
    """A whole bag, checked to be consistent."""
    with open_npz(path, BagError, "bag", "feature bag") as (z, attrs):
        coords, features = np.asarray(z["coords"]), np.asarray(z["features"])
    return Bag(*checked_arrays(coords, features, Path(path)), attrs)


def checked_arrays(coords: np.ndarray, features: np.ndarray, path: Path,
                   error: type[WsimilError] = BagError) -> tuple[np.ndarray, np.ndarray]:
    """A bag's arrays after checking what a bag from elsewhere could get wrong: numeric dtypes, (N, 2)
    coordinates, (N, D) features, and finite values. Why: a NaN feature or a string array would otherwise
    surface epochs later as a NaN loss or a cryptic cast error far from the file that caused it."""
    name = f"{path.name} ({path})"
    if coords.dtype.kind not in "iu" or coords.ndim != 2 or coords.shape[1:] != (2,):
        raise error(f"{name} is not a readable feature bag: its coords are {coords.dtype} {coords.shape}, "
                    "expected integer (N, 2)")
    if features.dtype.kind != "f" or features.ndim != 2 or len(features) != len(coords):
        raise error(f"{name} is not a readable feature bag: its features are {features.dtype} "
                    f"{features.shape}, expected float ({len(coords)}, D)")
    if not np.isfinite(features).all():
        raise error(f"{name} holds {int((~np.isfinite(features)).sum())} NaN or infinite feature values; "
                    "extract its features again")
    return coords, features


def stale_reasons(bag: Bag | dict[str, Any] | str | os.PathLike[str], encoder: Encoder,
                  slide: Slide | str | Path,
                  patch_size: int | None = None, mpp: float | None = None,
                  slide_mpp: float | None = None) -> list[str]:
    """Why a bag no longer matches ``encoder`` and ``slide`` (empty: it is up to date).

    ``patch_size``/``mpp`` are checked when given; so is the slide's level-0 µm/px, taken from an
    open ``slide`` or from ``slide_mpp`` (a project's corrected pixel size changes every patch even
    though the file did not change). A bag that cannot be read counts as stale.
    """
    if isinstance(bag, Bag):
        attrs = bag.attrs
    elif isinstance(bag, dict):
        attrs = bag
    else:
        try:
            attrs = read_bag_attrs(bag)
        except BagError as exc:
            return [str(exc)]
    reasons = []
    if attrs.get("format", BAG_FORMAT) != BAG_FORMAT:
        reasons.append(f"bag format {attrs.get('format')} (now {BAG_FORMAT})")
    ident = encoder.identity
    for key in ("encoder", "encoder_version"):
        if attrs.get(key) != ident[key]:
            reasons.append(f"{key} {attrs.get(key)!r} (now {ident[key]!r})")
    if patch_size is not None and attrs.get("patch_size") != int(patch_size):
        reasons.append(f"patch size {attrs.get('patch_size')} (now {patch_size})")
    if mpp is not None and (attrs.get("mpp") is None or abs(float(attrs["mpp"]) - float(mpp)) > 1e-9):
        reasons.append(f"{attrs.get('mpp')} µm/px (now {mpp})")
    if slide_mpp is None and not isinstance(slide, (str, Path)):
        slide_mpp = slide.mpp
    if slide_mpp is not None and attrs.get("slide_mpp") is not None and \
            abs(float(attrs["slide_mpp"]) - float(slide_mpp)) > 1e-9:
        reasons.append(f"slide pixel size {attrs['slide_mpp']} µm/px (now {slide_mpp})")
    path = Path(slide) if isinstance(slide, (str, Path)) else Path(slide.path)
    try:
        stamp = slide_stamp(path)
    except OSError:
        return reasons  # the slide is gone: keep the bag, it is all there is
    for key in ("slide_size", "slide_mtime_ns"):
        if attrs.get(key) != stamp[key]:
            reasons.append(f"the slide file changed ({key})")
            break
    return reasons


def is_stale(bag: Bag | dict[str, Any] | str | os.PathLike[str], encoder: Encoder, slide: Slide | str | Path,
             patch_size: int | None = None, mpp: float | None = None, slide_mpp: float | None = None) -> bool:
    """True when ``bag`` was made by another encoder/version, at another patch size or µm/px, or from
    a slide file that has changed since; see :func:`stale_reasons` for the why."""
    return bool(stale_reasons(bag, encoder, slide, patch_size, mpp, slide_mpp))


__all__ = ["Bag", "BagError", "BAG_FORMAT", "BAG_SUFFIX", "bag_attrs", "is_stale", "read_bag",
           "read_bag_attrs",
           "slide_stamp", "stale_reasons"]
