"""Synthetic slides whose tissue is real labelled H&E: ``wsimil synth OUT --textures DIR``.

Why: the procedural look of ``synthetic.py`` draws tumour that a colour statistic finds, so every method
scored on it looked perfect and then failed on real tissue. Here the generator keeps what it is good at
(tissue outlines, holes, tumour layout and the pixel-exact ground truth, all from ``SlideModel``) and fills
the tissue with real tiles from a labelled set (PCam, Kather's CRC sets, ...): tumour regions with the
tumour class, normal tissue with the others.

Texture folders (``scan_textures``): one folder per class; the tumour class is the one whose name contains
"tum" (``--tumour-class`` overrides); classes named like "empty" or "background" are left out. A class holds
images directly, or split subfolders as PCam does (``train``; ``valid``, ``val``, ``test``). Train and val
slides are drawn from training tiles only and test slides from held-out tiles only: with split folders the
held-out tiles are those of ``valid``/``val``/``test``, with flat folders each class's files are ranked by a
hash of their name and the first half (rounded up) trains, the rest is held out.

Pools (``open_textures``): every split a cohort needs is decoded once, as uint8 at native size, at most
``POOL_MIB`` MiB in all (which files are kept is a hash rank of their names: ~900 of PCam's 96-px tiles per
class and split). The white point (background) and the stain hue of every tile are evened out towards the
pools' median, since a set's tiles come from many slides and scanners and would otherwise outline each
other; tiles that are stained but featureless (out of focus, ink) are left out, and ``textures.json`` lists
them.

How a tile is rendered (``TexturedSlide``; every tile on its own, so tiles need no neighbours and memory does
not grow with the slide):

- Stamps: each layer (normal, tumour) is a jittered square lattice of stamps on a canvas at the tiles' own
  µm/px, spacing ``SPACING`` of the stamp size, so neighbours overlap. A stamp is a random square crop (``CROP``
  of the tile's side) of one pool tile, re-stained as this slide (HED amounts scaled and shifted a little per
  slide, and a little more per stamp), turned by a multiple of 90° and maybe flipped. Everything about a stamp
  comes from a hash of its global lattice index (as the procedural nuclei do), so the tiles either side of a
  border see the same stamps.
- Which tile: smooth fields (``LOOK_CELL_UM`` scale, with a finer octave) ask for a look — density and hue —
  and each stamp draws a tile at random among those near that look (``LOOK_SPREAD``): fat next to fat, dense
  lymphocytes next to dense lymphocytes, and with PCam neighbouring stamps share a tile about 1 % of the time.
  Each layer has its own look fields; tumour stamps are drawn from the denser 70 % of the tumour tiles
  (``TUMOUR_MIN_LOOK``), since PCam's least dense "tumour" tiles are fat with a few tumour cells at the centre
  (its label needs one tumour pixel in the centre 32 px) and a lesion filled with them would be fat under a
  tumour label. (A first version shared the look fields between layers, so tumour in fatty tissue was the
  fattiest tumour: on the 60-slide PCam cohort, lesions were then mostly fat and no method found them.)
  With several normal classes, one more smooth field per class picks which class fills where (the highest
  wins): patches of stroma, lymphocytes, mucosa, not confetti.
- Blending: each stamp has a Hann window times exp(smooth noise), sharpened (``MASK_NOISE``, ``MASK_SHARPEN``),
  so seams wander instead of following the lattice and cross-fades stay narrow; the stamps' mean colours blend
  linearly and their detail is divided by the root of the summed squared weights, which keeps the texture's
  contrast in the overlaps (Heitz & Neyret's variance-preserving blend), capped at the glass's colour (nothing
  is brighter than the light; the overshoot would outline seams in white areas). The canvas is resampled once per
  256-px tile (PIL bicubic, antialiased when shrinking, placed from global coordinates), not once per stamp.
- Tumour: the tumour layer replaces the normal one over a ramp ``FEATHER_UM`` µm wide centred on the ground
  truth's boundary (distance from the tumour field's zero); tissue then covers the generator's glass with the
  generator's opacity (outline, holes), and white in the tiles becomes the glass's colour. The ground truth,
  the tissue mask and the background are the procedural slide's.
- Memory: the pools, and a bounded cache of built stamps (``STAMP_CACHE_MIB``) for the neighbouring tiles.

Limits: a set with few tiles per class (Kather's 3, CRC-VAL's 10) repeats them visibly; a stamp whose tile
differs from all its neighbours still shows a roughly square outline; PCam labels a tile tumour when its
centre 32 px holds tumour, so some tumour stamps carry normal tissue at their edges.

Speed (``benchmarks/bench_synthesis.py --quick --looks-only --workers 2``, 2 cores shared with other jobs, load
~6): writing a 4096² malignant slide from PCam at 0.5 µm/px, all levels and JPEG included, takes about 105 ms per
megapixel against about 72 ms for the procedural look in the same run (x1.45; rendering alone x2.1), i.e. ~2 s
per 4096² slide. Loading the pools (decoding ~3600 PCam JPEGs, once per cohort) takes 3-5 s.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_wsimil.errors import WsimilError

#: Bumped whenever the same seed and tiles would render different slides (benchmark caches are keyed by it).
TEXTURES_VERSION = 2
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
TRAIN_DIRS = ("train",)
HELD_OUT_DIRS = ("valid", "val", "test")
TRAIN, HELD_OUT = "train", "held-out"  # which tiles a slide is drawn from
COHORT_SPLITS = ("all", "train", "test")  # what --split may ask for
SPLIT_FRACTIONS = (0.55, 0.15, 0.30)  # train, val, test share of each label's slides with --split all

CROP = 0.9  # a stamp is this share of its tile's shorter side: crops at random offsets differ
SPACING = 0.68  # lattice spacing over the stamp's size: each stamp overlaps its neighbours by ~1/3
JITTER = 0.12  # lattice jitter either way, as a share of the spacing (every pixel stays covered)
FEATHER_UM = 2.0  # width of the tumour/normal blend across the ground truth's boundary
CLASS_CELL_UM = 250.0  # scale of the field that picks which normal class fills where
LOOK_CELL_UM = 300.0  # scale of the fields that pick which look (density, hue) of a class fills where
LOOK_SPREAD = 0.2  # share of each look axis a stamp's tile is drawn from around the field's look
# Tumour stamps come from the denser 70 % of the tumour tiles: PCam calls a tile tumour when its centre 32 px
# hold one tumour pixel, so its least dense "tumour" tiles are fat or sinus with a few cells, and a lesion drawn
# from them would be ground truth over fat, which no pathologist would draw and no model could learn.
TUMOUR_MIN_LOOK = 0.3
FINE_OCTAVE = 0.4  # weight of those fields' finer octave (a quarter of the scale)
LOOK_SD = 1.0 / math.sqrt(1.0 + FINE_OCTAVE**2)  # brings the look fields back to unit SD, so all looks are used
POOL_MIB = 96  # all pools together, uint8 at native size
STAMP_CACHE_MIB = 48  # built stamps kept for the neighbouring tiles
MASK_NOISE = 2.0  # how far the seams between stamps wander (SD of the log-weight noise)
MASK_SHARPEN = 2.0  # power of the blending masks: higher, narrower cross-fades
FLAT_DENSITY = 0.4  # a tile this stained (mean OD, summed over RGB) ...
FLAT_DETAIL = 12.0  # ... with less detail than this (mean |Laplacian|, grey levels) is left out
BLEND_KEEPS_CONTRAST = True  # variance-preserving blend of the detail (else plain weighted mean)
MAX_SHRINK = 8.0  # tiles at most this many times finer than the slide (a tile's canvas grows as its square)
SLIDE_STAIN = 0.08  # per-slide stain jitter: haematoxylin and eosin amounts scaled by up to this, either way,
SLIDE_SHIFT = 0.02  # ... and shifted by up to this (optical density), like different staining runs
STAMP_STAIN = 0.04  # each stamp's haematoxylin and eosin amounts scaled by up to this more, either way
NORMALISE = 0.6  # how far each tile's mean stain colour moves towards the pools' median (0 none, 1 all)

_EXCLUDED = re.compile(r"empty|background|blank|^(\d+[_-])?(back|bg|glass)$", re.IGNORECASE)

# Ruifrok & Johnston's H&E-DAB stain vectors (as in skimage.color), rows normalised: OD = hed @ RGB_FROM_HED
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_OD_LUT = -np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)  # uint8 -> optical density


# --------------------------------------------------------------------------------- texture folders


@dataclass(frozen=True)
class TextureClass:
    """One class folder: its name and its image files per tile split (``TRAIN`` / ``HELD_OUT``)."""

    name: str
    folder: Path
    files: dict[str, tuple[Path, ...]]
    split_folders: bool  # False: the halves come from a hash of the file names
    missing: str = ""  # why a split has no files, for the error when it is needed


@dataclass(frozen=True)
class TextureLayout:
    """A textures folder: the tumour class, the normal classes, the class folders left out."""

    root: Path
    tumour: TextureClass
    normal: tuple[TextureClass, ...]
    excluded: tuple[str, ...]


def scan_textures(root: str | os.PathLike[str], tumour_class: str | None = None) -> TextureLayout:
    """Find the classes and their files in ``root``; a ``WsimilError`` names what is wrong.

    Only lists files (nothing is decoded): every check that needs no pixels happens here, so a bad folder
    fails before anything is read or written.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise WsimilError(f"textures folder {root} does not exist or is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    excluded = tuple(p.name for p in folders if _EXCLUDED.search(p.name))
    classes = [p for p in folders if p.name not in excluded]
    if len(classes) < 2:
        found = ", ".join(p.name for p in classes) or "none"
        raise WsimilError(f"textures folder {root} needs at least 2 tissue class folders (one of them tumour), "
                          f"found {len(classes)}: {found}")
    names = [p.name for p in classes]
    if tumour_class is not None:
        matches = [p for p in classes if p.name == tumour_class] or \
                  [p for p in classes if p.name.lower() == tumour_class.lower()]
        if not matches:
            raise WsimilError(f"tumour class {tumour_class!r} is not a class folder of {root} "
                              f"(classes: {', '.join(names)})")
    else:
        matches = [p for p in classes if "tum" in p.name.lower()]
        if not matches:
            raise WsimilError(f"no tumour class in {root}: no class folder's name contains 'tum' "
                              f"(classes: {', '.join(names)}); name it with --tumour-class")
        if len(matches) > 1:
            found = ", ".join(p.name for p in matches)
            raise WsimilError(f"several classes in {root} look like tumour ({found}); pick one with --tumour-class")
    tumour = matches[0]
    scanned = {p: _scan_class(p) for p in classes}
    return TextureLayout(root, scanned[tumour], tuple(scanned[p] for p in classes if p != tumour), excluded)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def _scan_class(folder: Path) -> TextureClass:
    subs = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    if any(name in subs for name in TRAIN_DIRS + HELD_OUT_DIRS):
        files: dict[str, tuple[Path, ...]] = {TRAIN: (), HELD_OUT: ()}
        missing = []
        for split, names in ((TRAIN, TRAIN_DIRS), (HELD_OUT, HELD_OUT_DIRS)):
            present = [subs[n] for n in names if n in subs]
            if not present:
                missing.append(f"class folder {folder} has no {' or '.join(names)} split folder")
                continue
            for sub in present:
                imgs = _images(sub)
                if not imgs:
                    raise WsimilError(f"split folder {sub} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
                files[split] += tuple(imgs)
        return TextureClass(folder.name, folder, files, True, "; ".join(missing))
    imgs = _images(folder)
    if not imgs:
        raise WsimilError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTS))}) "
                          "and no train/valid/test split folders")
    if len(imgs) < 2:
        raise WsimilError(f"class folder {folder} holds a single image: at least 2 are needed to hold some "
                          "out for the test slides")
    ranked = sorted(imgs, key=lambda p: (_name_hash(p.name), p.name))
    half = (len(ranked) + 1) // 2
    files = {TRAIN: tuple(sorted(ranked[:half])), HELD_OUT: tuple(sorted(ranked[half:]))}
    return TextureClass(folder.name, folder, files, False)


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big")


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
            od = _OD_LUT[t[::2, ::2].reshape(-1, 3)] @ _HED_FROM_RGB.astype(np.float32)
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
    ranked = sorted(files, key=lambda p: (_name_hash(p.name), str(p)))
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
    density = float(_OD_LUT[rgb[::2, ::2].reshape(-1, 3)].sum(1).mean())
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
    means = np.array([_OD_LUT[t[::2, ::2].reshape(-1, 3)].mean(0) for t in tiles], np.float64) + 1e-3
    dirs = means / means.sum(1, keepdims=True)
    target = np.median(dirs, axis=0)
    target /= target.sum()
    for i, t in enumerate(tiles):
        scale = (target / dirs[i]) ** strength
        scale *= means[i].sum() / (means[i] * scale).sum()
        lut = 256.0 * np.exp(-_OD_LUT[:, None].astype(np.float64) * scale[None, :]) - 1.0
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
    wanted = [s for s in (TRAIN, HELD_OUT) if s in set(splits)]
    classes = (layout.tumour, *layout.normal)
    for split in wanted:  # a missing split folder is found before decoding thousands of images
        for cls in classes:
            if not cls.files[split]:
                raise WsimilError(cls.missing or f"class folder {cls.folder} has no {split} images")
    budget = int(pool_mib * 2**20 / max(1, len(wanted) * len(classes)))
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
    return TextureSet(layout, {s: Pools(s, t, n, tile_mpp, crop, where) for s, (t, n) in loaded.items()},
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


# ------------------------------------------------------------------------------------- the cohort


def cohort_splits(labels: Sequence[int], seed: int, split: str = "all") -> list[str]:
    """Each slide's split, stratified by label and seeded.

    ``all``: within each label the slides are shuffled and cut at 55 % / 70 %: train / val / test (a slide
    at rank r of k falls at (r + 0.5) / k), so a label with 2 slides gives one train and one test slide.
    ``train``: train and val only, in the same 55 : 15 ratio. ``test``: every slide is a test slide.
    """
    if split not in COHORT_SPLITS:
        raise WsimilError(f"--split must be one of {', '.join(COHORT_SPLITS)}, got {split!r}")
    labels = np.asarray(labels)
    out = ["test"] * len(labels)
    if split == "test":
        return out
    tr, va, _ = SPLIT_FRACTIONS
    cuts = (tr, tr + va) if split == "all" else (tr / (tr + va), 1.0)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B117]))
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        for r, i in enumerate(idx):
            q = (r + 0.5) / len(idx)
            out[i] = "train" if q < cuts[0] else "val" if q < cuts[1] else "test"
    return out


def tile_split_for(cohort_split: str) -> str:
    """Train and val slides are drawn from training tiles, test slides from held-out tiles."""
    return HELD_OUT if cohort_split == "test" else TRAIN


def write_manifest(path: Path, textures: TextureSet, slides: dict[str, tuple[str, str]]) -> None:
    """``textures.json``: the source, classes, µm/px and tile files per split, and each slide's splits."""
    data = textures.manifest()
    data["split_fractions"] = dict(zip(("train", "val", "test"), SPLIT_FRACTIONS))
    data["slides"] = {sid: {"split": s, "tiles": t} for sid, (s, t) in slides.items()}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------- rendering


class TexturedSlide:
    """A ``SlideModel``'s layout and ground truth, its tissue filled with stamps of real tiles.

    Stamps are laid out and blended on a canvas at the tiles' own µm/px (global native coordinates), and each
    256-px tile of the slide is resampled from the part of that canvas under it: one resampling per tile,
    not one per stamp, and the canvas is the same whichever tile asks, so neighbouring tiles join without a
    seam. Thread-safe; ``render_tile`` is a pure function of the slide, its pools and the tile's position.
    """

    def __init__(self, model, pools: Pools):  # noqa: ANN001 (synthetic.SlideModel; imported lazily)
        from napari_wsimil.slide.synthetic import _Field, _physical_grid

        self.model = model
        self.pools = pools
        self.shape = model.shape
        self.gt_downsample = model.gt_downsample
        um = 1.0 / model.mpp
        self.k = model.mpp / pools.tile_mpp  # native (tile) pixels per slide pixel
        if self.k > MAX_SHRINK:
            raise WsimilError(f"texture tiles at {pools.tile_mpp:g} µm/px are too fine for a slide at "
                              f"{model.mpp:g} µm/px (more than {MAX_SHRINK:g}x smaller): use a finer --mpp")
        self.margin = 3 + math.ceil(2 * max(1.0, self.k))  # native px the resampling filter reaches
        c = self.size = pools.crop  # stamp side, native px
        self.spacing = max(1, round(SPACING * c))
        self.jitter = int(JITTER * self.spacing)
        self.feather_px = max(1.0, FEATHER_UM * um)
        rng = np.random.default_rng(np.random.SeedSequence([model.seed & (2**64 - 1), 0x7E47]))
        self.masks = _masks(rng, c)
        self.key = np.uint64(rng.integers(0, 2**63, dtype=np.int64))
        # this slide's staining run: haematoxylin and eosin amounts scaled and shifted a little
        self.stain_scale = 1.0 + rng.uniform(-SLIDE_STAIN, SLIDE_STAIN, 2)
        self.stain_shift = rng.uniform(-SLIDE_SHIFT, SLIDE_SHIFT, 2)
        self.white = model.lut[3 * 256].astype(np.float64)  # the glass's colour (see SlideModel.glass)
        self._white32 = self.white.astype(np.float32)
        # fields in native pixels: which normal class, and which look (density, hue) within a class
        nshape = (math.ceil(self.shape[0] * self.k) + 1, math.ceil(self.shape[1] * self.k) + 1)
        num = 1.0 / pools.tile_mpp

        def field(cell_um: float) -> _Field:
            # a finer octave makes the borders between regions wander (argmax of smooth fields alone gives
            # nearly straight borders)
            return _Field([(1.0, _physical_grid(rng, nshape, cell_um * num, 1.5)),
                           (FINE_OCTAVE, _physical_grid(rng, nshape, cell_um * num / 4, 1.5))])

        self.class_fields = [field(CLASS_CELL_UM) for _ in pools.normal] if len(pools.normal) > 1 else []
        # each layer its own look fields; the tumour layer draws from its denser tiles only (TUMOUR_MIN_LOOK)
        self.look_fields = [[field(LOOK_CELL_UM) for _ in range(2)] for _layer in range(2)]
        self._cache: OrderedDict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_cap = max(64, STAMP_CACHE_MIB * 2**20 // (c * c * 8 * 4))
        self._lock = threading.Lock()
        self._ones = np.ones(c * c, np.float32)

    # the layout and truth are the model's
    def ground_truth(self) -> np.ndarray:
        return self.model.ground_truth()

    def tissue_mask_gt(self) -> np.ndarray:
        return self.model.tissue_mask_gt()

    def render_tile(self, ty: int, tx: int) -> np.ndarray:
        """RGB uint8 tile (256, 256, 3) at tile row ``ty``, column ``tx`` of level 0."""
        from napari_wsimil.slide.synthetic import TILE

        m = self.model
        y0, x0 = ty * TILE, tx * TILE
        ys = np.arange(y0, y0 + TILE, dtype=np.float64)
        xs = np.arange(x0, x0 + TILE, dtype=np.float64)
        alpha = m.tissue_opacity(ys, xs, y0)
        if not alpha.any():
            return m.glass(y0, x0)
        share = m.tumour_share(ys, xs, self.feather_px)
        if share is not None and not share.any():
            share = None
        if share is None and alpha.min() >= 1.0:  # inside tissue, away from tumour: the layer as it is
            return self._layer(0, y0, x0, TILE, alpha)
        if alpha.min() >= 1.0:
            out = np.zeros((TILE, TILE, 3), np.float32)
        else:
            out = m.glass(y0, x0).astype(np.float32)
            out *= (1.0 - alpha)[..., None]
        layers = [(0, alpha if share is None else alpha * (1.0 - share))]
        if share is not None:
            layers.append((1, alpha * share))
        for layer, weight in layers:
            if weight.any():
                rgb = self._layer(layer, y0, x0, TILE, weight).astype(np.float32)
                rgb *= weight[..., None]
                out += rgb
        np.clip(out, 0.0, 255.0, out=out)
        out += 0.5
        return out.astype(np.uint8)

    # -- stamps ----------------------------------------------------------------------------------

    def _cells(self, layer: int, ny0: int, nx0: int, nh: int, nw: int):
        """Lattice cells whose stamp touches the native window: indices, top-left corners, 10 uniforms each."""
        from napari_wsimil.slide.synthetic import _splitmix

        s, c, j = self.spacing, self.size, self.jitter
        off = s // 2 - c // 2  # a cell's stamp, unjittered, is centred on the cell
        gy = np.arange((ny0 - c - off - j) // s, (ny0 + nh - off + j) // s + 1, dtype=np.int64)
        gx = np.arange((nx0 - c - off - j) // s, (nx0 + nw - off + j) // s + 1, dtype=np.int64)
        gy, gx = (a.ravel() for a in np.meshgrid(gy, gx, indexing="ij"))
        with np.errstate(over="ignore"):
            hsh = _splitmix(self.key ^ _splitmix(gy.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                                                 + gx.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
                                                 + np.uint64(0x5747 + layer)))
            u = np.empty((len(hsh), 10))
            for k in range(10):
                hsh = _splitmix(hsh + np.uint64(0x632BE59BD9B4E019))
                u[:, k] = (hsh >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
        top = gy * s + off + np.rint((2 * u[:, 0] - 1) * j).astype(np.int64)
        left = gx * s + off + np.rint((2 * u[:, 1] - 1) * j).astype(np.int64)
        keep = (top < ny0 + nh) & (top + c > ny0) & (left < nx0 + nw) & (left + c > nx0)
        return gy[keep], gx[keep], top[keep], left[keep], u[keep]

    def _layer(self, layer: int, y0: int, x0: int, n: int, weight: np.ndarray) -> np.ndarray:
        """One layer (0 normal, 1 tumour) over the slide's n x n pixels at (y0, x0), uint8 RGB.

        Blends the stamps on the native canvas under those pixels and resamples
        (PIL's bicubic, antialiased when shrinking) with a box placed from global coordinates. Stamps whose
        footprint has no weight are skipped: they would only change pixels that the layer does not show.
        """
        from PIL import Image
        from scipy.special import ndtr

        k, mg = self.k, self.margin
        ny0, nx0 = math.floor(y0 * k) - mg, math.floor(x0 * k) - mg
        ny1, nx1 = math.ceil((y0 + n) * k) + mg, math.ceil((x0 + n) * k) + mg
        nh, nw = ny1 - ny0, nx1 - nx0
        gy, gx, top, left, u = self._cells(layer, ny0, nx0, nh, nw)
        c = self.size
        # which part of the weight each stamp can reach, in slide pixels (filter reach included)
        r0 = np.clip(np.floor((top - mg) / k).astype(np.int64) - y0, 0, n)
        r1 = np.clip(np.ceil((top + c + mg) / k).astype(np.int64) - y0, 0, n)
        c0 = np.clip(np.floor((left - mg) / k).astype(np.int64) - x0, 0, n)
        c1 = np.clip(np.ceil((left + c + mg) / k).astype(np.int64) - x0, 0, n)
        cy = (top + c / 2).astype(np.float64)
        cx = (left + c / 2).astype(np.float64)
        if layer == 0 and self.class_fields:
            cls = np.argmax(np.stack([f.points(cy, cx) for f in self.class_fields]), axis=0)
        else:
            cls = np.zeros(len(gy), np.intp)
        look = ndtr(np.stack([f.points(cy, cx) for f in self.look_fields[layer]], axis=1) * LOOK_SD)
        if layer == 1:
            look[:, 0] = TUMOUR_MIN_LOOK + (1.0 - TUMOUR_MIN_LOOK) * look[:, 0]
        mean_acc = np.zeros((nh, nw, 3), np.float32)
        detail = np.zeros((nh, nw, 3), np.float32)
        wsum = np.zeros((nh, nw), np.float32)
        w2sum = np.zeros((nh, nw), np.float32)
        everywhere = bool(weight.all())
        for i in range(len(gy)):
            if not everywhere and not weight[r0[i]:r1[i], c0[i]:c1[i]].any():
                continue  # (an empty slice has nothing either)
            d, mm, mask, mask2 = self._stamp(layer, int(gy[i]), int(gx[i]), int(cls[i]), look[i], u[i])
            ty0, tx0 = int(top[i]) - ny0, int(left[i]) - nx0
            a0, b0 = max(0, ty0), max(0, tx0)
            a1, b1 = min(nh, ty0 + c), min(nw, tx0 + c)
            src = np.s_[a0 - ty0:a1 - ty0, b0 - tx0:b1 - tx0]
            detail[a0:a1, b0:b1] += d[src]
            mean_acc[a0:a1, b0:b1] += mm[src]
            wsum[a0:a1, b0:b1] += mask[src]
            w2sum[a0:a1, b0:b1] += mask2[src]
        np.maximum(wsum, 1e-12, out=wsum)
        np.maximum(w2sum, 1e-24, out=w2sum)
        mean_acc /= wsum[..., None]
        detail /= (np.sqrt(w2sum) if BLEND_KEEPS_CONTRAST else wsum)[..., None]
        mean_acc += detail
        np.minimum(mean_acc, self._white32, out=mean_acc)  # nothing is brighter than the light: the blend's
        np.maximum(mean_acc, 0.0, out=mean_acc)  # kept contrast would otherwise outline seams in white areas
        mean_acc += 0.5
        canvas = mean_acc.astype(np.uint8)
        box = (x0 * k - nx0, y0 * k - ny0, (x0 + n) * k - nx0, (y0 + n) * k - ny0)
        return np.asarray(Image.fromarray(canvas).resize((n, n), Image.Resampling.BICUBIC, box=box))

    def _stamp(self, layer: int, gy: int, gx: int, cls: int, look: np.ndarray, u: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One lattice cell's stamp, ready to add: its weighted detail ((x - mean) * mask), weighted mean
        (mean * mask), its blending mask and the mask squared (float32). A random crop of a tile of the look
        asked for, stained as this slide with a little jitter of its own, turned and maybe flipped, with one
        of the slide's masks, itself turned. Cached, bounded."""
        key = (layer, gy, gx)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        pool = self.pools.tumour if layer == 1 else self.pools.normal[cls]
        tile = pool.pick(float(look[0]), float(look[1]), float(u[2]), float(u[3]))
        c = self.size
        oy = int(u[4] * (tile.shape[0] - c + 1))
        ox = int(u[5] * (tile.shape[1] - c + 1))
        stamp = tile[oy:oy + c, ox:ox + c]
        jitter = 2.0 * u[8:10] - 1.0
        d = _restain(stamp, self.stain_scale * (1.0 + STAMP_STAIN * jitter), self.stain_shift, self.white)
        turn = int(u[6] * 8)
        d = np.rot90(d, turn & 3)
        if turn & 4:
            d = d[:, ::-1]
        d = np.ascontiguousarray(d)
        mean = (self._ones @ d.reshape(-1, 3)) * np.float32(1.0 / (c * c))  # (a matrix product: fast)
        d -= mean
        mask = np.ascontiguousarray(np.rot90(self.masks[int(u[7] * len(self.masks))],
                                             int(u[7] * 4 * len(self.masks)) & 3))
        d *= mask[..., None]
        hit = (d, mask[..., None] * mean, mask, mask * mask)
        with self._lock:
            self._cache[key] = hit
            while len(self._cache) > self._cache_cap:
                self._cache.popitem(last=False)
        return hit


def _masks(rng: np.random.Generator, c: int, n: int = 8) -> list[np.ndarray]:
    """Blending masks for stamps of side ``c``: a Hann window (zero at the edges, so each stamp fades out)
    times exp(smooth noise), sharpened. The noise makes the seams between stamps wander instead of following
    the lattice's straight lines, the sharpening keeps the cross-fades narrow (a wide cross-fade between two
    unrelated textures reads as a blurred double exposure). Every pixel stays covered: the lattice's spacing
    and jitter keep it inside its own cell's stamp, where the window is positive."""
    from napari_wsimil.slide.synthetic import _smooth_noise

    ramp = np.sin(np.pi * (np.arange(c) + 0.5) / c) ** 2
    hann = ramp[:, None] * ramp[None, :]
    out = []
    for _ in range(n):
        noise = _smooth_noise(rng, (c, c), c / 8.0)
        m = (hann * np.exp(MASK_NOISE * np.clip(noise, -3.0, 3.0))) ** MASK_SHARPEN
        out.append((m / m.max()).astype(np.float32))
    return out


def _restain(rgb: np.ndarray, scale: np.ndarray, shift: np.ndarray, white: np.ndarray) -> np.ndarray:
    """Scale the haematoxylin and eosin amounts of a uint8 RGB image by ``scale`` (2) and add ``shift`` (2, in
    optical density), seen through a light of colour ``white`` (3, what blank glass looks like): a different
    staining run, not a colour cast, since stains are linear in optical density (Beer-Lambert). Colour
    deconvolution makes that a 3x3 map of OD, OD' = OD @ M + b, and then
    I'_c = (white_c + 1) exp(-b_c) prod_j ((I_j + 1) / 256) ** M_jc - 1: nine 256-entry tables and two products
    per pixel, no logarithm or exponential per pixel. Returns float32 RGB, unrounded, within 0-255."""
    alpha = np.array([scale[0], scale[1], 1.0])
    beta = np.array([shift[0], shift[1], 0.0])
    m = (_HED_FROM_RGB * alpha[None, :]) @ _RGB_FROM_HED  # OD' = OD @ m + b
    b = beta @ _RGB_FROM_HED
    base = (np.arange(256, dtype=np.float64) + 1.0) / 256.0
    # tables[j, c][v] = ((v + 1) / 256) ** m[j, c], the factor input channel j contributes to output c
    tables = (base[None, None, :] ** m[:, :, None]).astype(np.float32)
    tables[0] *= ((np.asarray(white, np.float64) + 1.0) * np.exp(-b)).astype(np.float32)[:, None]
    out = np.empty(rgb.shape, np.float32)
    idx = [rgb[..., j].astype(np.intp) for j in range(3)]
    for c in range(3):
        ch = np.take(tables[0, c], idx[0])
        ch *= np.take(tables[1, c], idx[1])
        ch *= np.take(tables[2, c], idx[2])
        out[..., c] = ch
    out -= 1.0
    np.clip(out, 0.0, 255.0, out=out)
    return out
