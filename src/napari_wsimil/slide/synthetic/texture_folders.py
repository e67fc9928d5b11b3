"""Texture folders for textured cohorts (``wsimil synth OUT --textures DIR``): classes, files, splits.

Texture folders (``scan_textures``): one folder per class; the tumour class is the one whose name contains
"tum" (``--tumour-class`` overrides); classes named like "empty" or "background" are left out. A class holds
images directly, or split subfolders as PCam does (``train``; ``valid``, ``val``, ``test``). Each slide split
draws from its own tiles: train slides from training tiles, and validation and test slides from held-out tiles
that no training slide shows, each from its own part of them. With split folders the held-out tiles are those of
``valid``/``val``/``test``; with flat folders each class's files are ranked by a hash of their name and the
first half (rounded up) trains, the rest is held out. Of the held-out tiles, the last ``VAL_TILE_SHARE`` in
name-hash rank are the validation slides' (at least two), the rest the test slides'. Training tiles are left
as they were, so training slides do not change. Were validation slides drawn from the training tiles, a model
that memorised them would look perfect on validation and model selection would be blind to it. But a
validation set of one tile per class is no better: on CRC-VAL-HE-7K (10 tiles per class, 5 held out),
CLAM-SB's validation loss on one held-out tile per class was lowest at epoch 3 (validation AUC 0.56 at epoch
30), while its epoch-30 model scored 1.00 on the other 4 tiles' test slides. So validation tiles are held out
only from a class with at least ``VAL_MIN_HELD_OUT`` held-out tiles (PCam: hundreds); a smaller set's
validation slides share the training tiles, as before, and ``textures.json`` and the log say so.

Only file names are read here (nothing is decoded), so a bad folder fails before anything is read or written;
``texture_pools`` decodes the tiles, ``textured`` draws slides from them.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from napari_wsimil.errors import WsimilError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
TRAIN_DIRS = ("train",)
HELD_OUT_DIRS = ("valid", "val", "test")
TRAIN, VAL, HELD_OUT = "train", "val", "held-out"  # which tiles a slide is drawn from
VAL_TILE_SHARE = 0.25  # of the held-out tiles, rounded, drawn by validation slides only ...
VAL_MIN_HELD_OUT = 8  # ... when a class has this many held-out tiles (validation >= 2, test >= 6)
COHORT_SPLITS = ("all", "train", "test")  # what --split may ask for
SPLIT_FRACTIONS = (0.55, 0.15, 0.30)  # train, val, test share of each label's slides with --split all

_EXCLUDED = re.compile(r"empty|background|blank|^(\d+[_-])?(back|bg|glass)$", re.IGNORECASE)


# --------------------------------------------------------------------------------- texture folders


@dataclass(frozen=True)
class TextureClass:
    """One class folder: its name and its image files per tile split (``TRAIN`` / ``HELD_OUT``)."""

    name: str
    folder: Path
    files: dict[str, tuple[Path, ...]]
    split_folders: bool  # False: the halves come from a hash of the file names
    missing: str = ""  # why a split has no files, for the error when it is needed
    val_shared: bool = False  # too few held-out tiles to spare: validation slides share the training tiles


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
        return _with_val(TextureClass(folder.name, folder, files, True, "; ".join(missing)))
    imgs = _images(folder)
    if not imgs:
        raise WsimilError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTS))}) "
                          "and no train/valid/test split folders")
    if len(imgs) < 2:
        raise WsimilError(f"class folder {folder} holds a single image: at least 2 are needed to hold some "
                          "out for the test slides")
    ranked = sorted(imgs, key=lambda p: (name_hash(p.name), p.name))
    half = (len(ranked) + 1) // 2
    files = {TRAIN: tuple(sorted(ranked[:half])), HELD_OUT: tuple(sorted(ranked[half:]))}
    return _with_val(TextureClass(folder.name, folder, files, False))


def _with_val(cls: TextureClass) -> TextureClass:
    """Split the held-out tiles between validation (the last ``VAL_TILE_SHARE`` in name-hash rank) and test,
    when there are enough of them (module doc)."""
    held = sorted(cls.files[HELD_OUT], key=lambda p: (name_hash(p.name), str(p)))
    if len(held) < VAL_MIN_HELD_OUT:
        return replace(cls, files={**cls.files, VAL: cls.files[TRAIN]}, val_shared=True)
    n_val = max(int(round(len(held) * VAL_TILE_SHARE)), 2)
    files = {**cls.files, HELD_OUT: tuple(sorted(held[:-n_val])), VAL: tuple(sorted(held[-n_val:]))}
    return replace(cls, files=files)


def name_hash(name: str) -> int:
    """A stable 64-bit hash of a file name (SHA-1, not Python's salted ``hash``).

    Shared because the held-out half of a flat class folder (here) and which files the pools keep
    (``texture_pools``) are both ranked by it, so they stay the same from run to run and machine to machine.
    """
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big")


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
    """Train slides are drawn from training tiles, val and test slides from their own parts of the held-out
    tiles."""
    return {"test": HELD_OUT, "val": VAL}.get(cohort_split, TRAIN)
