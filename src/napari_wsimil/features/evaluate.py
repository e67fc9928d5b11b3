"""``features-eval``: how well does an encoder's feature space tell tumour tiles from the others?

A folder of labelled tiles (one subfolder per class: ``TUM/``, ``01_TUMOR/``, ``tumor/``..., with the
tiles directly inside or in split subfolders such as ``train/`` and ``valid/``) is encoded with any
registered encoder, then a linear probe (:mod:`.probe`) is fitted for tumour vs each other class
and tumour vs all the rest. With ``train`` and ``valid`` (or ``val``/``test``) splits in every class
the probe is fitted on train and scored on the held-out split, as the dataset's authors intend
(PCam's splits come from different slides); otherwise stratified k-fold cross-validation is used.
Balanced accuracy (threshold 0) and ROC AUC of the probe's decision values are reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError
from . import probe
from .encoders import Encoder, build_encoder

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
TRAIN_SPLIT = "train"
HELD_OUT_SPLITS = ("valid", "val", "validation", "test")


class TileSetError(WsimilError):
    """A tile folder cannot be evaluated: no tumour class, an empty class, an unreadable tile."""


@dataclass
class TileSet:
    """Labelled tiles: ``paths[i]`` is of class ``classes[labels[i]]``, from split ``splits[i]`` ("" none)."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray
    splits: np.ndarray
    train_split: str | None = None  # set when the probe uses the given splits
    test_split: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def scan_tiles(root: str | Path, max_per_class: int | None = None, seed: int = 0) -> TileSet:
    """The tiles under ``root``, one subfolder per class; ``max_per_class`` keeps a random subset of
    each class (of each split of each class when splits are used), the same for the same seed."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise TileSetError(f"{root} is not a folder of class subfolders")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise TileSetError(f"{root} needs at least two class subfolders (one per tissue class), "
                           f"found {len(class_dirs)}")
    per_class: list[list[tuple[Path, str]]] = []
    for d in class_dirs:
        files = _images(d)
        if not files:
            raise TileSetError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        per_class.append([(f, f.relative_to(d).parts[0] if len(f.relative_to(d).parts) > 1 else "")
                          for f in files])
    # the dataset's own splits, when every class has a train split and the same held-out split
    split_sets = [{s for _, s in tiles} for tiles in per_class]
    held_out = next((h for h in HELD_OUT_SPLITS
                     if all(h in s and TRAIN_SPLIT in s for s in split_sets)), None)
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    labels: list[int] = []
    splits: list[str] = []
    for i, tiles in enumerate(per_class):
        groups: dict[str, list[Path]] = {}
        for f, s in tiles:
            key = s if held_out else ""
            if held_out and s not in (TRAIN_SPLIT, held_out):
                continue  # a third split is not used
            groups.setdefault(key, []).append(f)
        for s, files in sorted(groups.items()):
            if max_per_class is not None and len(files) > max_per_class:
                pick = np.sort(rng.choice(len(files), size=max_per_class, replace=False))
                files = [files[j] for j in pick]
            paths += files
            labels += [i] * len(files)
            splits += [s] * len(files)
    return TileSet(root, [d.name for d in class_dirs], paths, np.asarray(labels, np.int64),
                   np.asarray(splits, dtype=object), TRAIN_SPLIT if held_out else None, held_out)


def find_tumour_class(classes: Sequence[str], name: str | None = None) -> int:
    """The index of the tumour class: ``name`` (case-insensitive), else the one class named like
    "tum..." (TUM, 01_TUMOR, tumor, tumour)."""
    if name is not None:
        hits = [i for i, c in enumerate(classes) if c == name] or \
               [i for i, c in enumerate(classes) if c.lower() == name.lower()]
        if not hits:
            raise TileSetError(f"no class named {name!r}; the classes are {', '.join(classes)}")
        return hits[0]
    hits = [i for i, c in enumerate(classes) if "tum" in c.lower()]
    if len(hits) != 1:
        which = "no class" if not hits else f"{len(hits)} classes ({', '.join(classes[i] for i in hits)})"
        raise TileSetError(f"{which} look like the tumour class among {', '.join(classes)}; "
                           "name it with --tumour-class NAME")
    return hits[0]


def read_tile(path: Path, scale: float = 1.0) -> np.ndarray:
    """An RGB tile as uint8 (H, W, 3), resampled by ``scale`` (antialiased) when it is not 1."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if abs(scale - 1.0) > 1e-6:
                size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                im = im.resize(size, Image.Resampling.BILINEAR)
            return np.asarray(im, np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise TileSetError(f"cannot read tile {path.name} ({path}): {exc}") from exc


def encode_tiles(tiles: TileSet, encoder: Encoder, batch_size: int = 64, scale: float = 1.0,
                 progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Features (N, D) of every tile, in order; tiles of one size are batched together."""
    out = np.empty((len(tiles), encoder.dim), np.float32)
    for start in range(0, len(tiles), batch_size):
        idx = range(start, min(start + batch_size, len(tiles)))
        images = [read_tile(tiles.paths[i], scale) for i in idx]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for j, im in enumerate(images):
            by_shape.setdefault(im.shape, []).append(j)
        for members in by_shape.values():
            feats = encoder.encode(np.stack([images[j] for j in members]))
            out[[start + j for j in members]] = feats
        if progress is not None:
            progress(idx.stop, len(tiles))
    return out


@dataclass
class TaskResult:
    """The probe's result for tumour vs ``other`` (a class, or "all" the others)."""

    task: str
    other: str
    n_tumour: int
    n_other: int
    balanced_accuracy: float
    auc: float
    folds: int | None  # None: fitted on the train split, scored on the held-out one


@dataclass
class EvalReport:
    """What ``features-eval`` prints and writes as JSON."""

    tiles_dir: str
    encoder: str
    encoder_version: str
    dim: int
    classes: dict[str, int]
    tumour_class: str
    protocol: str
    tile_mpp: float | None
    mpp: float | None
    tasks: list[TaskResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The results as aligned text."""
        width = max([len(t.task) for t in self.tasks] + [4])
        lines = [f"{'task':<{width}}  {'tumour':>6}  {'other':>6}  {'bal.acc':>7}  {'AUC':>6}"]
        lines += [f"{t.task:<{width}}  {t.n_tumour:>6}  {t.n_other:>6}  "
                  f"{t.balanced_accuracy:>7.3f}  {t.auc:>6.3f}" for t in self.tasks]
        return "\n".join(lines)


def probe_tasks(features: np.ndarray, tiles: TileSet, tumour: int, folds: int = 5, seed: int = 0,
                c: float = probe.DEFAULT_C) -> list[TaskResult]:
    """Tumour vs each other class, then tumour vs all the others (when there are more than two classes)."""
    others = [i for i in range(len(tiles.classes)) if i != tumour]
    name = tiles.classes[tumour]
    tasks: list[tuple[str, str, np.ndarray]] = [
        (f"{name} vs {tiles.classes[o]}", tiles.classes[o], np.isin(tiles.labels, [tumour, o]))
        for o in others]
    if len(others) > 1:
        tasks.append((f"{name} vs all", "all", np.ones(len(tiles), bool)))
    results = []
    for task, other, rows in tasks:
        x, labels = features[rows], tiles.labels[rows]
        y = labels == tumour
        if tiles.train_split is not None:
            split = tiles.splits[rows]
            tr, te = split == tiles.train_split, split == tiles.test_split
            for part, what in ((tr, tiles.train_split), (te, tiles.test_split)):
                if y[part].all() or not y[part].any():
                    raise TileSetError(f"{task}: the {what} split lacks one of the two classes")
            scores = probe.probe_scores(x[tr], y[tr], x[te], c)
            y_eval, k = y[te], None
        else:
            smallest = int(np.bincount(labels)[np.unique(labels)].min())
            if smallest < 2:
                raise TileSetError(f"{task}: a class has {smallest} tile; cross-validation needs at least "
                                   "2 per class")
            k = min(folds, smallest)
            scores = probe.cross_validated_scores(x, y, labels, k, seed, c)
            y_eval = y
        results.append(TaskResult(task, other, int(y_eval.sum()), int((~y_eval).sum()),
                                  probe.balanced_accuracy(y_eval, scores > 0), probe.roc_auc(y_eval, scores),
                                  k))
    return results


def evaluate_encoder(tiles_dir: str | Path, encoder: Encoder | str = "handcrafted", *,
                     weights: str | Path | None = None, folds: int = 5, tile_mpp: float | None = None,
                     mpp: float | None = None, tumour_class: str | None = None,
                     max_per_class: int | None = None, batch_size: int = 64, device: str = "auto",
                     seed: int = 0, progress: Callable[[str, int, int], None] | None = None) -> EvalReport:
    """Encode the tiles of ``tiles_dir`` and probe tumour vs the other classes (see the module docstring).

    ``mpp`` resamples every tile to that µm/px first, which needs ``tile_mpp``, the tiles' own. All
    input is checked (classes, tumour class, the encoder and its weights) before any tile is encoded.
    """
    if folds < 2:
        raise TileSetError(f"--folds must be at least 2, got {folds}")
    if mpp is not None and tile_mpp is None:
        raise TileSetError("resampling to --mpp needs the tiles' own µm/px: give --tile-mpp")
    for value, what in ((mpp, "--mpp"), (tile_mpp, "--tile-mpp")):
        if value is not None and not value > 0:
            raise TileSetError(f"{what} must be positive, got {value}")
    tiles = scan_tiles(tiles_dir, max_per_class, seed)
    tumour = find_tumour_class(tiles.classes, tumour_class)
    if isinstance(encoder, Encoder):
        enc = encoder.to(device)
    else:
        enc = build_encoder(encoder, weights=weights, device=device)
    scale = 1.0 if mpp is None else float(tile_mpp) / float(mpp)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    features = encode_tiles(tiles, enc, batch_size, scale,
                            None if progress is None else (lambda d, t: progress("encode", d, t)))
    t1 = time.perf_counter()
    results = probe_tasks(features, tiles, tumour, folds, seed)
    t2 = time.perf_counter()
    if tiles.train_split:
        protocol = f"fit on the {tiles.train_split} split, scored on the {tiles.test_split} split"
    else:
        ks = sorted({r.folds for r in results if r.folds})
        protocol = f"stratified {'/'.join(map(str, ks))}-fold cross-validation (out-of-fold scores)"
    return EvalReport(str(tiles.root), enc.name, enc.version, int(enc.dim), tiles.counts(),
                      tiles.classes[tumour], protocol, tile_mpp, mpp, results,
                      {"encode": round(t1 - t0, 3), "probe": round(t2 - t1, 3),
                       "tiles_per_second": round(len(tiles) / max(t1 - t0, 1e-9), 1)})


__all__ = ["EvalReport", "TaskResult", "TileSet", "TileSetError", "encode_tiles", "evaluate_encoder",
           "find_tumour_class", "probe_tasks", "read_tile", "scan_tiles"]
