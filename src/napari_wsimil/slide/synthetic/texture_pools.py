"""Pools of real tiles for textured cohorts: decoded, checked and evened out once per cohort.

Pools (``open_textures``): every split a cohort needs is decoded once, as uint8 at native size, at most
``POOL_MIB`` MiB in all, a third per split (which files are kept is a hash rank of their names: ~900 of
PCam's 96-px tiles per class and split). The white point (background) and the stain hue of every tile are
evened out towards the pools' median, since a set's tiles come from many slides and scanners and would
otherwise outline each other; tiles that are stained but featureless (out of focus, ink) are left out, and
``textures.json`` lists them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_wsimil.errors import WsimilError
from napari_wsimil.slide.synthetic.stain import HED_FROM_RGB, OD_LUT
from napari_wsimil.slide.synthetic.texture_folders import (
    HELD_OUT,
    SPLIT_FRACTIONS,
    TRAIN,
    VAL,
    VAL_MIN_HELD_OUT,
    TextureClass,
    TextureLayout,
    name_hash,
    scan_textures,
)

CROP = 0.9  # a stamp is this share of its tile's shorter side: crops at random offsets differ
LOOK_SPREAD = 0.2  # share of each look axis a stamp's tile is drawn from around the field's look
POOL_MIB = 144  # all pools together, uint8 at native size: a third per split (train, val, test)
FLAT_DENSITY = 0.4  # a tile this stained (mean OD, summed over RGB) ...
FLAT_DETAIL = 12.0  # ... with less detail than this (mean |Laplacian|, grey levels) is left out
MAX_SHRINK = 8.0  # tiles at most this many times finer than the slide (a tile's canvas grows as its square)
NORMALISE = 0.6  # how far each tile's mean stain colour moves towards the pools' median (0 none, 1 all)


# ------------------------------------------------------------------------------------------ pools


@dataclass
class Pool:
    """The tiles of one class and one tile split that a slide may draw from, uint8 RGB at native size."""

    name: str
    tiles: list[np.ndarray]
    files: list[Path]
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.intp))
    groups: int = 1

    def __post_init__(self) -> None:
        """Arrange the tiles by look so that a smooth field can pick similar tiles for neighbouring stamps:
        ``groups`` groups by density (mean optical density), each sorted by hue (haematoxylin share)."""
        n = len(self.tiles)
        dens, hue = np.empty(n), np.empty(n)
        for i, t in enumerate(self.tiles):
            od = OD_LUT[t[::2, ::2].reshape(-1, 3)] @ HED_FROM_RGB.astype(np.float32)
            h, e = np.maximum(od[:, 0], 0).mean(), np.maximum(od[:, 1], 0).mean()
            dens[i], hue[i] = h + e, h / (h + e + 1e-6)
        self.groups = max(1, round(math.sqrt(n / 2)))
        by_dens = np.argsort(dens, kind="stable")
        parts = np.array_split(by_dens, self.groups)
        self.order = np.concatenate([p[np.argsort(hue[p], kind="stable")] for p in parts])

    def pick(self, r1: float, r2: float, u1: float, u2: float) -> np.ndarray:
        """The tile at look (r1, r2) in [0, 1)^2, spread at random by (u1, u2) over ``LOOK_SPREAD`` of each
        axis (at least 2-3 groups or positions): neighbouring stamps, whose looks are nearly the same, draw
        from a few dozen similar tiles of a large pool, so they look alike but are rarely the same tile."""
        n, g = len(self.tiles), self.groups
        per = n / g
        gi = min(g - 1, max(0, int((r1 + (u1 - 0.5) * max(LOOK_SPREAD, 2.5 / g)) * g)))
        lo, hi = round(gi * per), round((gi + 1) * per)
        span = hi - lo
        pos = min(span - 1, max(0, int((r2 + (u2 - 0.5) * max(LOOK_SPREAD, 5.0 / span)) * span)))
        return self.tiles[int(self.order[lo + pos])]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tiles)


@dataclass
class Pools:
    """What a slide is drawn from: the tumour pool and the normal pools of one tile split."""

    split: str
    tumour: Pool
    normal: tuple[Pool, ...]
    tile_mpp: float
    crop: int  # px of the source tiles that one stamp takes
    source: str = ""  # the textures folder, as recorded in cohort.csv


def _read_tile(path: Path) -> tuple[np.ndarray, float | None]:
    """Decode one image to uint8 RGB; its µm/px from the resolution tags when they are trustworthy."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mpp = _mpp_from_tags(im)
            arr = np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy: stain is evened out in place
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise WsimilError(f"cannot read the texture image {path}: {exc}") from None
    if min(arr.shape[:2]) < 16:
        raise WsimilError(f"texture image {path} is only {arr.shape[1]} x {arr.shape[0]} px: too small to use")
    return arr, mpp


def _mpp_from_tags(im) -> float | None:  # noqa: ANN001 (a PIL image)
    """µm/px from TIFF, JPEG (JFIF) or PNG resolution tags, or None when absent or not believable.

    Unit-less densities (JFIF's 1:1 aspect ratio) say nothing; the defaults image tools write (72, 96, 300
    dpi) give 85-350 µm/px, outside the 0.05-10 µm/px of any microscope scan, and are rejected by that range.
    """
    density = unit_um = None
    tags = getattr(im, "tag_v2", None)
    if tags is not None and 282 in tags:  # TIFF XResolution; ResolutionUnit 2 inch (default), 3 cm, 1 none
        unit = int(tags.get(296, 2))
        density, unit_um = float(tags[282]), {2: 25400.0, 3: 10000.0}.get(unit)
    elif "jfif_unit" in im.info:
        unit = int(im.info["jfif_unit"])  # 0: the density is only an aspect ratio
        density, unit_um = float(im.info["jfif_density"][0]), {1: 25400.0, 2: 10000.0}.get(unit)
    elif "dpi" in im.info:
        density, unit_um = float(im.info["dpi"][0]), 25400.0
    if not density or not unit_um or density <= 0:
        return None
    mpp = unit_um / density
    return mpp if 0.05 <= mpp <= 10.0 else None


def _load_pool(cls: TextureClass, split: str, budget: int
               ) -> tuple[list[np.ndarray], list[Path], list[float | None], list[Path]]:
    """Decode the class's files of ``split`` in hash-rank order until ``budget`` bytes are held.

    Returns the tiles, their files and µm/px tags, and the files left out as featureless (see ``_featureless``;
    kept after all when a class has nothing else, since flat tiles are then what the user gave).
    """
    files = cls.files[split]
    if not files:
        raise WsimilError(cls.missing or f"class folder {cls.folder} has no {split} images")
    ranked = sorted(files, key=lambda p: (name_hash(p.name), str(p)))
    tiles, kept, mpps, flat = [], [], [], []
    held = 0
    for path in ranked:
        arr, mpp = _read_tile(path)
        if tiles and held + arr.nbytes > budget:
            break
        if _featureless(arr):
            flat.append((arr, path, mpp))
            continue
        tiles.append(arr)
        kept.append(path)
        mpps.append(mpp)
        held += arr.nbytes
    if not tiles:
        return [f[0] for f in flat], [f[1] for f in flat], [f[2] for f in flat], []
    return tiles, kept, mpps, [f[1] for f in flat]


def _featureless(rgb: np.ndarray) -> bool:
    """Whether a tile is stained but shows no structure: out of focus, ink, a scanner's dark frame.

    Such tiles are rare in a labelled set, but a stamp of one stands out as a flat square in real texture.
    Blank background (fat, lumen) is featureless too and is kept: it is what those regions look like.
    """
    grey = rgb[::2, ::2].astype(np.float32).mean(-1)
    lap = np.abs(4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:])
    density = float(OD_LUT[rgb[::2, ::2].reshape(-1, 3)].sum(1).mean())
    return density > FLAT_DENSITY and float(lap.mean()) < FLAT_DETAIL


def _normalise_stain(tiles: list[np.ndarray], strength: float = NORMALISE) -> None:
    """Even out the tiles' white point and stain hue, in place.

    Why: a labelled set's tiles come from many slides and scanners, so neighbouring stamps would differ in
    background and stain and outline each other (a greyish fat stamp in white fat reads as a blob).

    - White: where a tile shows background (bright, unsaturated pixels, at least 2 % of it), each channel is
      divided by its background level (an offset in optical density), so the background becomes white; the
      renderer then gives white the slide's glass colour, so fat, lumens, holes and glass agree.
    - Hue: each tile's optical density is scaled per RGB channel so that its mean OD vector turns towards the
      median direction of all tiles (by ``strength``) while keeping its total density: hue is evened out, the
      amount of tissue and stain (fat vs dense lymphocytes, pale vs dark tumour) is not.
    """
    levels = np.arange(256, dtype=np.float64)
    for t in tiles:
        px = t[::2, ::2].reshape(-1, 3).astype(np.int16)
        bright = px[(px.min(1) >= 190) & (px.max(1) - px.min(1) <= 30)]
        if len(bright) >= 0.02 * len(px):
            white = np.percentile(bright, 75, axis=0)
            lut = np.clip(np.rint(256.0 * (levels[:, None] + 1.0) / (white[None, :] + 1.0) - 1.0), 0, 255)
            lut = lut.astype(np.uint8)
            for ch in range(3):
                t[..., ch] = lut[t[..., ch], ch]
    means = np.array([OD_LUT[t[::2, ::2].reshape(-1, 3)].mean(0) for t in tiles], np.float64) + 1e-3
    dirs = means / means.sum(1, keepdims=True)
    target = np.median(dirs, axis=0)
    target /= target.sum()
    for i, t in enumerate(tiles):
        scale = (target / dirs[i]) ** strength
        scale *= means[i].sum() / (means[i] * scale).sum()
        lut = 256.0 * np.exp(-OD_LUT[:, None].astype(np.float64) * scale[None, :]) - 1.0
        lut = np.clip(np.rint(lut), 0, 255).astype(np.uint8)
        for ch in range(3):
            t[..., ch] = lut[t[..., ch], ch]


@dataclass
class TextureSet:
    """The pools a cohort needs (one ``Pools`` per tile split used), loaded and checked once."""

    layout: TextureLayout
    pools: dict[str, Pools]
    tile_mpp: float
    mpp_source: str
    featureless: dict[str, dict[str, list[Path]]] = field(default_factory=dict)  # split -> class -> files

    def manifest(self) -> dict:
        """What the cohort was drawn from, for ``textures.json``: classes, µm/px, and every tile file used."""
        root = self.layout.root.resolve()

        def rel(p: Path) -> str:
            try:
                return p.resolve().relative_to(root).as_posix()
            except ValueError:
                return str(p)

        return {
            "source": str(root),
            "tumour_class": self.layout.tumour.name,
            "normal_classes": [c.name for c in self.layout.normal],
            "excluded_classes": list(self.layout.excluded),
            "held_out_by": {c.name: ("split folders" if c.split_folders else "hash of file names (halves)")
                            for c in (self.layout.tumour, *self.layout.normal)},
            "val_tiles": {c.name: (f"the training tiles: fewer than {VAL_MIN_HELD_OUT} held-out tiles, all kept "
                                   "for the test slides, so validation cannot show memorised tiles"
                                   if c.val_shared else "their own quarter of the held-out tiles (by name hash)")
                          for c in (self.layout.tumour, *self.layout.normal)},
            "tile_mpp": self.tile_mpp,
            "tile_mpp_from": self.mpp_source,
            "tiles": {split: {p.name: sorted(rel(f) for f in p.files) for p in (pools.tumour, *pools.normal)}
                      for split, pools in self.pools.items()},
            "left_out_featureless": {split: {name: sorted(rel(f) for f in files) for name, files in d.items()}
                                     for split, d in self.featureless.items()},
        }


def open_textures(root: str | os.PathLike[str], *, splits: Sequence[str], tumour_class: str | None = None,
                  tile_mpp: float | None = None, mpp: float = 0.5, pool_mib: float = POOL_MIB) -> TextureSet:
    """Scan ``root``, decode the pools of the tile ``splits`` asked for and settle the tiles' µm/px.

    Every problem is a ``WsimilError`` raised before anything is written: no tumour class, fewer than 2
    classes, an empty class or split folder, a split needed but missing, an unreadable image (named), tiles
    of unknown µm/px without ``tile_mpp``, or stamps too small at the slide's ``mpp``.
    """
    if tile_mpp is not None:
        try:
            tile_mpp = float(tile_mpp)
        except (TypeError, ValueError):
            raise WsimilError(f"--tile-mpp must be a number of µm per pixel, got {tile_mpp!r}") from None
        if not (0.05 <= tile_mpp <= 10.0):
            raise WsimilError(f"--tile-mpp must be between 0.05 and 10 µm per pixel, got {tile_mpp:g}")
    layout = scan_textures(root, tumour_class)
    classes = (layout.tumour, *layout.normal)
    # where each slide split's tiles come from: validation slides of a set too small to spare validation tiles
    # use the training pool itself (so its tiles are neither decoded nor stain-evened twice)
    pool_of = {TRAIN: TRAIN, HELD_OUT: HELD_OUT, VAL: TRAIN if all(c.val_shared for c in classes) else VAL}
    tile_splits = (TRAIN, VAL, HELD_OUT)
    asked = [s for s in tile_splits if s in set(splits)]
    wanted = list(dict.fromkeys(pool_of[s] for s in asked))
    for split in wanted:  # a missing split folder is found before decoding thousands of images
        for cls in classes:
            if not cls.files[split]:
                raise WsimilError(cls.missing or f"class folder {cls.folder} has no {split} images")
    # a split's pool keeps the same tiles whichever other splits the cohort uses
    budget = int(pool_mib * 2**20 / (len(tile_splits) * len(classes)))
    raw: dict[tuple[str, int], tuple[list[np.ndarray], list[Path]]] = {}
    tags: list[tuple[Path, float | None]] = []
    skipped: dict[str, dict[str, list[Path]]] = {}
    for split in wanted:
        for i, cls in enumerate(classes):
            tiles, files, mpps, flat = _load_pool(cls, split, budget)
            raw[split, i] = (tiles, files)
            tags += list(zip(files, mpps))
            if flat:
                skipped.setdefault(split, {})[cls.name] = flat
    _normalise_stain([t for tiles, _ in raw.values() for t in tiles])
    loaded: dict[str, tuple[Pool, tuple[Pool, ...]]] = {}
    for split in wanted:
        pools = [Pool(cls.name, *raw[split, i]) for i, cls in enumerate(classes)]
        loaded[split] = (pools[0], tuple(pools[1:]))
    if tile_mpp is None:
        tile_mpp = _mpp_from_files(tags)
        source = "resolution tags"
    else:
        source = "--tile-mpp"
    if mpp / tile_mpp > MAX_SHRINK:
        raise WsimilError(f"texture tiles at {tile_mpp:g} µm/px are too fine for slides at {mpp:g} µm/px (more "
                          f"than {MAX_SHRINK:g}x smaller): use a finer --mpp")
    side = min(min(t.shape[:2]) for tum, nor in loaded.values() for p in (tum, *nor) for t in p.tiles)
    crop = max(12, int(CROP * side))
    where = str(layout.root.resolve())
    made = {s: Pools(s, t, n, tile_mpp, crop, where) for s, (t, n) in loaded.items()}
    return TextureSet(layout, {s: made[pool_of[s]] for s in asked},
                      tile_mpp, source, skipped)


def _mpp_from_files(tags: list[tuple[Path, float | None]]) -> float:
    unknown = [p for p, m in tags if m is None]
    if unknown:
        raise WsimilError(f"tiles of unknown µm/px: pass --tile-mpp ({unknown[0]} has no believable "
                          "resolution tag)")
    values = np.array([m for _, m in tags], np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi > lo * 1.03:
        raise WsimilError(f"the texture tiles' resolution tags disagree ({lo:.3g} to {hi:.3g} µm/px): "
                          "pass --tile-mpp")
    return float(np.median(values))


def write_manifest(path: Path, textures: TextureSet, slides: dict[str, tuple[str, str]]) -> None:
    """``textures.json``: the source, classes, µm/px and tile files per split, and each slide's splits."""
    data = textures.manifest()
    data["split_fractions"] = dict(zip(("train", "val", "test"), SPLIT_FRACTIONS))
    data["slides"] = {sid: {"split": s, "tiles": t} for sid, (s, t) in slides.items()}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
