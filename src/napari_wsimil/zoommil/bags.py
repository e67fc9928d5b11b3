"""Multi-magnification feature bags for ZoomMIL: one file per slide, every level's patches and features.

Levels go from low to high magnification (``mpps`` strictly decreasing µm/px, e.g. 8 → 4 → 1, about 1.25×,
2.5× and 10×). The patch side in pixels is the same at every level, so a patch of level ``l`` covers
``ratio × ratio`` patches of level ``l + 1`` (``ratio = mpps[l] / mpps[l + 1]``, a whole number ≥ 2).
Only the lowest level is tissue-filtered; every descendant of a kept patch is kept.

Rows are stored depth-first, as in the reference implementation (histocartography/zoommil): the
``r = ratio²`` children of level-``l`` row ``j`` are level-``l + 1`` rows ``[r·j, r·j + r)``, in row-major
order (top row left to right, then the next row). A child's corner is its parent's plus
``(b, a) · patch · mpps[l + 1] / slide_mpp`` level-0 px (floored), ``a`` the row and ``b`` the column.

The file (``<slide id>.zoom.npz``) is numpy only, no pickle: ``coords_<l>`` (N_l, 2) int64 level-0 x, y,
``features_<l>`` (N_l, D) float32 and ``attrs`` (JSON: format, mpps, patch, the encoder's identity, the
slide's stamp and µm/px), written atomically like :class:`napari_wsimil.features.bags.Bag`. Prediction need
not read a whole bag: :func:`child_coords` and :func:`encode_coords` encode just the children it selects,
straight from the slide, with the same numbers as extraction gives (same reader, same patches).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import MissingMppError, WsimilError
from ..features.bags import checked_arrays
from ..io.atomic import atomic_write
from ..io.npz import open_npz

if TYPE_CHECKING:  # pragma: no cover
    from ..features.encoder_base import Encoder
    from ..slide import PatchGrid, Slide
    from ..slide.tissue import TissueMask
    from ..train.cohort import SlideItem

#: Format of the file itself; bump when its layout changes (bags of another format are stale).
ZOOM_BAG_FORMAT = 1
ZOOM_BAG_SUFFIX = ".zoom.npz"
#: µm/px of the levels, low to high magnification: ≈1.25×, 2.5× and 10×, as in the paper on BRIGHT.
DEFAULT_MPPS = (8.0, 4.0, 1.0)
DEFAULT_PATCH = 256
#: Smallest patch side (px) a level may use.
MIN_PATCH = 8

Report = Callable[[str], None]
#: ``progress(done_patches, total_patches)`` over all levels of one slide.
Progress = Callable[[int, int], None]


class ZoomBagError(WsimilError):
    """Magnification levels that cannot be used, or a zoom bag that is missing, truncated or inconsistent."""


def _chain(values: Sequence[float]) -> str:
    return " → ".join(f"{v:g}" for v in values)


def check_levels(mpps: Sequence[float], patch: int) -> list[int]:
    """The magnification ratio of each step (``mpps[l] / mpps[l + 1]``, whole numbers ≥ 2); a
    :class:`ZoomBagError` saying what to change for levels or a patch size that cannot be used."""
    try:
        values = [float(v) for v in mpps]
    except (TypeError, ValueError):
        raise ZoomBagError(f"magnification levels are µm/px numbers such as {_chain(DEFAULT_MPPS)}; "
                           f"got {mpps!r}") from None
    if isinstance(patch, bool) or not isinstance(patch, (int, np.integer)) or patch < MIN_PATCH:
        raise ZoomBagError(f"the patch size must be a whole number of pixels, at least {MIN_PATCH} "
                           f"(typically {DEFAULT_PATCH}); got {patch!r}")
    bad = [v for v in values if not math.isfinite(v) or v <= 0]
    if bad:
        raise ZoomBagError(f"magnification levels are pixel sizes in µm/px and must be positive numbers; "
                           f"got {_chain(values)}")
    if len(values) < 2:
        raise ZoomBagError(f"ZoomMIL needs at least 2 magnification levels, from low to high magnification "
                           f"(e.g. {_chain(DEFAULT_MPPS)} µm/px); got {_chain(values) + ' µm/px' if values else 'none'}")
    if any(b >= a for a, b in pairwise(values)):
        raise ZoomBagError(f"levels must go from low to high magnification (µm/px decreasing), e.g. "
                           f"{_chain(DEFAULT_MPPS)} µm/px; got {_chain(values)} µm/px")
    ratios = []
    for a, b in pairwise(values):
        ratio = a / b
        whole = round(ratio)
        if abs(ratio - whole) > 1e-6 * ratio or whole < 2:
            raise ZoomBagError(f"each level must magnify a whole number of times (2× or more) the previous: "
                               f"{a:g} → {b:g} µm/px is {ratio:.3g}×")
        ratios.append(int(whole))
    return ratios


@dataclass(eq=False)
class ZoomBag:
    """Every level's patch corners (level-0 x, y) and features for one slide, depth-first, plus what
    produced them. Level 0 is the lowest magnification."""

    mpps: tuple[float, ...]
    patch: int
    coords: list[np.ndarray]
    features: list[np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mpps = tuple(float(v) for v in self.mpps)
        self.patch = int(self.patch)
        self._ratios = check_levels(self.mpps, self.patch)
        if len(self.coords) != len(self.mpps) or len(self.features) != len(self.mpps):
            raise ZoomBagError(f"{len(self.mpps)} levels need as many coordinate and feature arrays; got "
                               f"{len(self.coords)} and {len(self.features)}")
        self.coords = [np.asarray(c, np.int64).reshape(-1, 2) for c in self.coords]
        self.features = [np.asarray(f, np.float32) for f in self.features]
        dims = {f.shape[1] if f.ndim == 2 else None for f in self.features}
        for level, (c, f) in enumerate(zip(self.coords, self.features)):
            if f.ndim != 2 or len(f) != len(c):
                raise ZoomBagError(f"level {level}: {len(c)} patches need ({len(c)}, D) features, got {f.shape}")
        if len(dims) != 1:
            raise ZoomBagError(f"every level needs features of one size; got {sorted(map(str, dims))}")
        for level, r in enumerate(self._ratios):
            n, m = len(self.coords[level]), len(self.coords[level + 1])
            if m != n * r * r:
                raise ZoomBagError(f"level {level + 1} ({self.mpps[level + 1]:g} µm/px) has {m} patches; "
                                   f"{n} patches at level {level} need {n * r * r} ({r * r} each)")

    @property
    def ratios(self) -> list[int]:
        """Magnification ratio of each step (``mpps[l] / mpps[l + 1]``)."""
        return list(self._ratios)

    def n_children(self, level: int) -> int:
        """How many level-``level + 1`` patches one level-``level`` patch has (ratio²)."""
        return self._ratios[level] ** 2

    def children(self, level: int, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Level-``level + 1`` rows of the children of level-``level`` ``rows``, depth-first: row ``j`` →
        ``[r·j, r·j + r)``, children of the first row first."""
        r = self.n_children(level)
        rows = np.asarray(rows, np.int64).reshape(-1)
        return (rows[:, None] * r + np.arange(r, dtype=np.int64)[None, :]).reshape(-1)

    @property
    def dim(self) -> int:
        return int(self.features[0].shape[1])

    @property
    def n_levels(self) -> int:
        return len(self.mpps)

    def __len__(self) -> int:
        """Patches at the lowest magnification."""
        return len(self.coords[0])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temporary sibling, fsync, rename): a file on disk is always complete."""
        path = Path(path)
        attrs = {**self.attrs, "format": ZOOM_BAG_FORMAT, "mpps": list(self.mpps), "patch": self.patch}
        arrays: dict[str, Any] = {"attrs": np.array(json.dumps(attrs))}
        for level, (c, f) in enumerate(zip(self.coords, self.features)):
            arrays[f"coords_{level}"] = c
            arrays[f"features_{level}"] = f
        with atomic_write(path, "wb") as fh:
            np.savez(fh, **arrays)
        return path


def read_zoom_bag_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Only the attrs (the arrays stay on disk)."""
    with open_npz(path, ZoomBagError, "zoom bag", "zoom feature bag") as (_z, attrs):
        return attrs


def read_zoom_bag(path: str | os.PathLike[str]) -> ZoomBag:
    """A whole zoom bag, checked to be consistent (levels, children per patch, feature sizes)."""
    with open_npz(path, ZoomBagError, "zoom bag", "zoom feature bag") as (z, attrs):
        if attrs.get("format") != ZOOM_BAG_FORMAT:
            raise ZoomBagError(f"format {attrs.get('format')!r}, this version reads {ZOOM_BAG_FORMAT}: "
                               "extract it again")
        n = len(attrs["mpps"])
        bag = ZoomBag(tuple(attrs["mpps"]), int(attrs["patch"]), [z[f"coords_{i}"] for i in range(n)],
                      [z[f"features_{i}"] for i in range(n)], attrs)
    for c, f in zip(bag.coords, bag.features):  # a bag from elsewhere: finite values too
        checked_arrays(c, f, Path(path), ZoomBagError)
    return bag


# --- coordinates ----------------------------------------------------------------------------------

def _slide_mpp(slide: Slide) -> float:
    if slide.mpp is None:
        raise MissingMppError(slide.path)
    return float(slide.mpp)


def child_coords(parents: np.ndarray, parent_mpp: float, child_mpp: float, patch: int,
                 slide_mpp: float) -> np.ndarray:
    """Level-0 corners of the children of ``parents`` (N, 2) at the next level, depth-first: (N·r, 2), the
    r = ratio² children of parent ``j`` at rows ``[r·j, r·j + r)``, row-major within the parent."""
    (ratio,) = check_levels((parent_mpp, child_mpp), patch)
    size0 = patch * float(child_mpp) / float(slide_mpp)
    steps = np.floor(np.arange(ratio) * size0 + 1e-9).astype(np.int64)
    gy, gx = np.meshgrid(steps, steps, indexing="ij")  # a (row) slow, b (column) fast
    offsets = np.stack([gx.ravel(), gy.ravel()], axis=1)
    parents = np.asarray(parents, np.int64).reshape(-1, 2)
    return (parents[:, None, :] + offsets[None, :, :]).reshape(-1, 2)


def lowest_coords(slide: Slide, mpps: Sequence[float], patch: int, tissue: TissueMask | None = None, *,
                  min_tissue: float = 0.5) -> np.ndarray:
    """Level-0 corners of the tissue patches at the lowest magnification (``mpps[0]``), as single-level
    bags choose them (:func:`napari_wsimil.slide.patch_grid`); a slide smaller than one patch is an error."""
    from ..slide import patch_grid

    check_levels(mpps, patch)
    slide_mpp = _slide_mpp(slide)
    size0 = patch * float(mpps[0]) / slide_mpp
    height, width = slide.level_shapes[0]
    if width < size0 or height < size0:
        side = patch * float(mpps[0])
        raise ZoomBagError(
            f"{slide.path.name} ({slide.path}) is too small for the lowest magnification: the slide is "
            f"{width * slide_mpp:.0f} × {height * slide_mpp:.0f} µm, one {patch} px patch at {float(mpps[0]):g} µm/px "
            f"covers {side:g} × {side:g} µm. Use a higher lowest magnification (fewer µm/px) or a smaller patch.")
    return patch_grid(slide, patch, float(mpps[0]), min_tissue=min_tissue, tissue=tissue).coords


def level_coords(slide: Slide, mpps: Sequence[float], patch: int, tissue: TissueMask | None = None, *,
                 min_tissue: float = 0.5) -> list[np.ndarray]:
    """Level-0 corners of every level's patches: the tissue patches of the lowest level, then all their
    descendants, depth-first (see the module docstring)."""
    levels = [lowest_coords(slide, mpps, patch, tissue, min_tissue=min_tissue)]
    slide_mpp = _slide_mpp(slide)
    for a, b in pairwise(mpps):
        levels.append(child_coords(levels[-1], a, b, patch, slide_mpp))
    return levels


def child_grid(slide: Slide, mpp: float, patch: int, coords: np.ndarray) -> PatchGrid:
    """A patch grid of exactly these level-0 corners at ``mpp`` µm/px, in this order (no tissue filter),
    that :func:`napari_wsimil.features.extract_features` and the patch reader read."""
    from ..slide import PatchGrid

    size0 = patch * float(mpp) / _slide_mpp(slide)
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    return PatchGrid(coords=coords, patch_size=int(patch), mpp=float(mpp), size_level0=size0,
                     tissue_fraction=np.full(len(coords), np.nan), stride_level0=size0, level=None,
                     slide_path=str(slide.path))


# --- encoding -------------------------------------------------------------------------------------

def zoom_encoder(encoder: Encoder | str, mpps: Sequence[float], device: str = "auto",
                 weights: str | os.PathLike[str] | None = None) -> Encoder:
    """One encoder for every level: an :class:`Encoder` moved to ``device``, or a registered name built once.
    An encoder that measures in µm (handcrafted-v2) is told the highest magnification's µm/px (``mpps[-1]``),
    where the children that decide a prediction are read."""
    from ..features.encoder_base import Encoder as EncoderBase
    from ..features.encoders import build_encoder
    from ..features.extract import encoder_scale_options

    if isinstance(encoder, EncoderBase):
        return encoder.to(device)
    return build_encoder(encoder, weights=weights, device=device,
                         **encoder_scale_options(encoder, float(mpps[-1])))


def encode_coords(slide: Slide, encoder: Encoder | str, coords: np.ndarray, mpp: float, patch: int,
                  device: str = "auto", *, batch_size: int = 64, num_workers: int = 4,
                  progress: Progress | None = None, cancel: threading.Event | None = None) -> np.ndarray:
    """(N, D) float32 features of exactly the patches at these level-0 corners, read at ``mpp`` µm/px, in
    order. Pass the encoder the bags were made with (a name is built by :func:`zoom_encoder` for ``mpp``).
    No corners: (0, D), nothing read."""
    from ..features.extract import extract_features

    enc = zoom_encoder(encoder, (mpp,), device)
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    if len(coords) == 0:
        return np.zeros((0, enc.dim), np.float32)
    grid = child_grid(slide, mpp, patch, coords)
    bag = extract_features(slide, enc, grid=grid, device=enc.device, batch_size=batch_size,
                           num_workers=num_workers, progress=progress, cancel=cancel, min_tissue=0.0)
    return bag.features


def extract_zoom_bag(slide: Slide | str | os.PathLike[str], encoder: Encoder | str,
                     mpps: Sequence[float] = DEFAULT_MPPS, patch: int = DEFAULT_PATCH, device: str = "auto",
                     report: Report | None = None, *, tissue: TissueMask | None = None, min_tissue: float = 0.5,
                     batch_size: int = 64, num_workers: int = 4, weights: str | os.PathLike[str] | None = None,
                     progress: Progress | None = None, cancel: threading.Event | None = None) -> ZoomBag:
    """Every level of ``slide`` encoded (training needs every descendant), level by level through the
    patch reader (pixels are streamed in batches, never a whole level at once). ``report`` gets one line per
    level; ``progress(done, total)`` counts patches over all levels; ``cancel`` stops at the next batch."""
    from ..features.bags import bag_attrs
    from ..slide import open_slide

    check_levels(mpps, patch)
    mpps = tuple(float(v) for v in mpps)
    opened = open_slide(slide) if isinstance(slide, (str, os.PathLike)) else slide
    try:
        enc = zoom_encoder(encoder, mpps, device, weights)
        coords = level_coords(opened, mpps, patch, tissue, min_tissue=min_tissue)
        total = sum(len(c) for c in coords)
        done = 0
        features = []
        for level, (c, mpp) in enumerate(zip(coords, mpps)):
            if report is not None:
                report(f"{opened.path.name}: level {level + 1}/{len(mpps)} ({mpp:g} µm/px): {len(c)} patches")
            step = None if progress is None else (lambda d, _t, base=done: progress(base + d, total))
            features.append(encode_coords(opened, enc, c, mpp, patch, enc.device, batch_size=batch_size,
                                          num_workers=num_workers, progress=step, cancel=cancel))
            done += len(c)
        attrs = bag_attrs(enc, opened, patch, mpps[0], mpps=list(mpps), min_tissue=float(min_tissue),
                          n_patches=[len(c) for c in coords])
    finally:
        if opened is not slide:
            opened.close()
    return ZoomBag(mpps, patch, coords, features, attrs)


# --- staleness and cohorts ------------------------------------------------------------------------

def zoom_stale_reasons(path_or_bag: ZoomBag | dict[str, Any] | str | os.PathLike[str], encoder: Encoder,
                       slide_path: Slide | str | os.PathLike[str], mpps: Sequence[float], patch: int, *,
                       slide_mpp: float | None = None) -> list[str]:
    """Why a zoom bag no longer matches (empty: up to date): its format, the encoder or its version, the
    patch size, the levels, the slide's µm/px (``slide_mpp``, or an open slide's) or the slide file itself
    changed. A bag that cannot be read counts as stale."""
    from ..features.bags import stale_reasons

    if isinstance(path_or_bag, ZoomBag):
        b = path_or_bag
        attrs = {**b.attrs, "format": ZOOM_BAG_FORMAT, "mpps": list(b.mpps), "patch": b.patch}
    elif isinstance(path_or_bag, dict):
        attrs = path_or_bag
    else:
        try:
            attrs = read_zoom_bag_attrs(path_or_bag)
        except ZoomBagError as exc:
            return [str(exc)]
    reasons = []
    if attrs.get("format") != ZOOM_BAG_FORMAT:
        reasons.append(f"zoom bag format {attrs.get('format')} (now {ZOOM_BAG_FORMAT})")
    had = [float(v) for v in attrs.get("mpps") or []]
    if len(had) != len(mpps) or any(abs(a - float(b)) > 1e-9 for a, b in zip(had, mpps)):
        reasons.append(f"levels {_chain(had)} µm/px (now {_chain(mpps)})")
    slide: Any = Path(slide_path) if isinstance(slide_path, (str, os.PathLike)) else slide_path
    rest = {k: v for k, v in attrs.items() if k != "format"}
    return reasons + stale_reasons(rest, encoder, slide, patch_size=patch, slide_mpp=slide_mpp)


def zoom_bag_is_stale(path_or_bag: ZoomBag | dict[str, Any] | str | os.PathLike[str], encoder: Encoder,
                      slide_path: Slide | str | os.PathLike[str], mpps: Sequence[float], patch: int, *,
                      slide_mpp: float | None = None) -> bool:
    """True when the bag must be extracted again; see :func:`zoom_stale_reasons` for the why."""
    return bool(zoom_stale_reasons(path_or_bag, encoder, slide_path, mpps, patch, slide_mpp=slide_mpp))


def ensure_zoom_bags(slides: Sequence[SlideItem], out_dir: str | os.PathLike[str], encoder: str,
                     mpps: Sequence[float], patch: int, report: Report | None = None, device: str = "auto",
                     weights: str | None = None, project: str | os.PathLike[str] | None = None
                     ) -> dict[str, Path]:
    """Extract the zoom bags of ``slides`` that are missing or stale into ``out_dir/<slide id>.zoom.npz``;
    returns slide id → path. Like :func:`napari_wsimil.train.cohort.ensure_features`: the encoder is built
    once, each slide opens with its own µm/px (through ``project`` when given), bags are written atomically
    (a killed run leaves complete bags only, and the next run goes on from there), and a failing slide is
    one error naming it."""
    from ..train.cohort import cohort_encoder, extract_missing

    check_levels(mpps, patch)
    mpps = tuple(float(v) for v in mpps)
    say = report or (lambda _m: None)
    enc = cohort_encoder(encoder, weights, device, mpps[-1])

    def current(path: Path, s: SlideItem) -> bool:
        return not zoom_stale_reasons(path, enc, s.path, mpps, patch, slide_mpp=s.mpp)

    def extract(slide: Slide, s: SlideItem) -> ZoomBag:
        return extract_zoom_bag(slide, enc, mpps, patch, device=enc.device, report=say)

    def describe(bag: ZoomBag) -> str:
        return " / ".join(f"{len(c)}" for c in bag.coords) + f" patches at {_chain(bag.mpps)} µm/px"

    return extract_missing(slides, Path(out_dir), ZOOM_BAG_SUFFIX, current, extract, report,
                           None if project is None else Path(project), head="zoom features",
                           task="zoom feature extraction", describe=describe)


__all__ = ["DEFAULT_MPPS", "DEFAULT_PATCH", "MIN_PATCH", "ZOOM_BAG_FORMAT", "ZOOM_BAG_SUFFIX", "ZoomBag",
           "ZoomBagError", "check_levels", "child_coords", "child_grid", "encode_coords", "ensure_zoom_bags",
           "extract_zoom_bag", "level_coords", "lowest_coords", "read_zoom_bag", "read_zoom_bag_attrs",
           "zoom_bag_is_stale", "zoom_encoder", "zoom_stale_reasons"]
