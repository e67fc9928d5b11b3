"""Cohorts for the command line: a cohort CSV or a project folder → slide records with labels and splits.

* :func:`load_cohort` reads ``slide_id,path,label[,split]`` CSVs (paths relative to the CSV) or a
  project folder (labels are its slide-level class names, in the project's class order).
* :func:`class_names` orders the labels (numerically when every label is a whole number).
* :func:`assign_splits` gives every slide a split and carves a stratified validation split when there is none.
* :func:`ensure_features` extracts the bags that are missing or stale with ``extract_cohort``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError


class CohortError(WsimilError):
    """The cohort CSV or project cannot be used as asked."""


@dataclass(frozen=True)
class SlideItem:
    """One slide; the optional paths come from a cohort CSV's columns (projects keep them in the project):
    ``pixel_labels`` a class-id mask for training, ``annotations`` a GeoJSON, ``gt_mask`` ground truth for
    evaluation only. A downsample of None means "work it out from the mask's size"."""

    slide_id: str
    path: Path
    label: str | None = None
    split: str | None = None
    pixel_labels: Path | None = None
    pixel_labels_downsample: float | None = None
    annotations: Path | None = None
    gt_mask: Path | None = None
    gt_downsample: float | None = None


@dataclass
class Cohort:
    """Slides of a cohort; ``source`` is the CSV or project folder; ``classes`` is set for projects."""

    source: Path
    slides: list[SlideItem]
    is_project: bool = False
    classes: list[str] | None = None

    @property
    def has_splits(self) -> bool:
        return any(s.split for s in self.slides)


_SPLIT_ALIASES = {"validation": "val", "valid": "val", "training": "train", "testing": "test"}


def _norm_split(value: Any) -> str | None:
    s = str(value or "").strip().lower()
    if not s:
        return None
    s = _SPLIT_ALIASES.get(s, s)
    if s not in ("train", "val", "test"):
        raise CohortError(f"split {value!r} is not train, val or test")
    return s


def _rel_path(csv_path: Path, value: str | None) -> Path | None:
    if not value:
        return None
    p = Path(value)
    return p if p.is_absolute() else csv_path.parent / p


def _opt_float(value: str | None, column: str) -> float | None:
    if not value:
        return None
    try:
        v = float(value)
    except ValueError:
        raise CohortError(f"{column} {value!r} is not a number") from None
    if not v > 0:
        raise CohortError(f"{column} must be positive, got {value}")
    return v


def load_cohort(source: str | os.PathLike[str]) -> Cohort:
    """Read a cohort CSV or a project folder."""
    from ..project.project import PROJECT_FILE, Project, id_from_path

    src = Path(source)
    if src.is_dir():
        if not (src / PROJECT_FILE).is_file():
            raise CohortError(f"{src} is a folder without {PROJECT_FILE}: give a cohort CSV or a project folder")
        p = Project.open(src, readonly=True)
        try:
            items = [SlideItem(r.slide_id, p.slide_path(r.slide_id), r.label, r.split,
                               gt_mask=p.resolve(r.gt_mask) if r.gt_mask else None, gt_downsample=r.gt_downsample)
                     for r in p.slides]
            return Cohort(src, items, True, list(p.slide_classes) or None)
        finally:
            p.close()
    if not src.is_file():
        raise CohortError(f"cohort {src} does not exist")
    try:
        with open(src, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip().lower() for c in (reader.fieldnames or [])]
            if "path" not in cols:
                raise CohortError(f"{src.name} has no 'path' column (columns: {', '.join(cols) or 'none'})")
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CohortError(f"cannot read the cohort CSV {src}: {exc}") from exc
    items, seen = [], set()
    for line, row in enumerate(rows, 2):
        if not row.get("path"):
            raise CohortError(f"{src.name} line {line}: empty path")
        path = Path(row["path"])
        path = path if path.is_absolute() else src.parent / path
        sid = row.get("slide_id") or id_from_path(path)
        if sid in seen:
            raise CohortError(f"{src.name} line {line}: slide_id {sid!r} appears twice")
        seen.add(sid)
        try:
            split = _norm_split(row.get("split"))
        except CohortError as exc:
            raise CohortError(f"{src.name} line {line}: {exc}") from None
        try:
            optional = {k: _rel_path(src, row.get(k)) for k in ("pixel_labels", "annotations", "gt_mask")}
            optional.update({k: _opt_float(row.get(k), k) for k in ("pixel_labels_downsample", "gt_downsample")})
        except CohortError as exc:
            raise CohortError(f"{src.name} line {line}: {exc}") from None
        items.append(SlideItem(sid, path, row.get("label") or None, split, **optional))
    if not items:
        raise CohortError(f"the cohort {src} has no slides")
    return Cohort(src, items, False, None)


def class_names(labels: Sequence[str]) -> list[str]:
    """The distinct labels in order: numeric when all are whole numbers, else alphabetical."""
    distinct = set(labels)
    try:
        return [str(v) for v in sorted(distinct, key=int)]
    except ValueError:
        return sorted(distinct)


def label_indices(slides: Sequence[SlideItem], classes: Sequence[str]) -> list[int]:
    """Class index of each slide's label; a label outside ``classes`` is an error naming the slide."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for s in slides:
        if s.label not in index:
            raise CohortError(f"slide {s.slide_id} has label {s.label!r}, which is not one of the classes "
                              f"{', '.join(classes)}")
        out.append(index[s.label])
    return out


def assign_splits(slides: Sequence[SlideItem], classes: Sequence[str], seed: int = 0,
                  val_fraction: float = 0.25) -> list[SlideItem]:
    """Every slide gets a split, and there is a validation split whenever the cohort allows one.

    Slides with a split keep it (slides without one in such a cohort are training slides). When no slide is
    in ``val`` — no split column at all, or a CSV with train/test only — a stratified validation split is
    carved from the training slides, the same for a given seed: in each class ``round(n·val_fraction)``
    slides (at least 1 when the class has 2 or more) go to val. Why always: early stopping and the choice of
    the checkpoint need slides the model did not train on, and the test slides must never serve for that.
    ``val_fraction`` 0 turns the carving off (the last epoch's model is then the one used)."""
    out = [s if s.split else replace(s, split="train") for s in slides]
    if val_fraction <= 0 or any(s.split == "val" for s in out):
        return out
    train_idx = [i for i, s in enumerate(out) if s.split == "train"]
    labels = np.asarray(label_indices([out[i] for i in train_idx], classes))
    rng = np.random.default_rng(seed)
    val: set[int] = set()
    for k in range(len(classes)):
        idx = np.flatnonzero(labels == k)
        if len(idx) < 2:
            continue
        n_val = min(len(idx) - 1, max(1, int(round(len(idx) * val_fraction))))
        val.update(train_idx[int(i)] for i in rng.permutation(idx)[:n_val])
    return [replace(s, split="val") if i in val else s for i, s in enumerate(out)]


def features_dir_for(cohort: Cohort, run_dir: str | os.PathLike[str], encoder: str) -> Path:
    """Where bags go: PROJECT/features/ENCODER for a project, else RUN/../features/ENCODER (the encoder's name
    made safe as a folder name: ``timm:vit_large_patch16_224`` has a colon, which Windows refuses)."""
    from ..features.extract import safe_dirname

    if cohort.is_project:
        return cohort.source / "features" / safe_dirname(encoder)
    return Path(run_dir).resolve().parent / "features" / safe_dirname(encoder)


def ensure_features(slides: Sequence[SlideItem], out_dir: Path, encoder: str, patch: int, mpp: float,
                    report: Callable[[str], None] | None = None, device: str = "auto",
                    weights: str | None = None, project: Path | None = None) -> dict[str, Path]:
    """Extract the bags of ``slides`` that are missing or stale; returns slide id → bag path.

    A slide whose extraction fails is an error naming it (training on a silently smaller cohort would
    mislead)."""
    from ..features import extract_cohort

    say = report or (lambda _m: None)

    def progress(ev: Any) -> None:
        head = f"features [{ev.index + 1}/{ev.count}] {ev.slide_id}"
        if ev.stage == "done":
            say(f"{head}: {ev.total} patches")
        elif ev.stage == "skipped":
            say(f"{head}: up to date")
        elif ev.stage == "failed":
            say(f"{head}: FAILED: {ev.message}")

    wanted = {s.slide_id for s in slides}
    if project is not None:
        from ..project.project import Project
        source: Any = Project.open(project, readonly=True)
    else:
        source = {s.slide_id: s.path for s in slides}
    try:
        if project is not None:
            # only the slides asked for, but with the project's per-slide µm/px
            results = _extract_project_subset(source, wanted, out_dir, encoder, patch, mpp, device, progress,
                                              weights)
        else:
            results = extract_cohort(source, out_dir, encoder, patch_size=patch, mpp=mpp, device=device,
                                     progress=progress, weights=weights)
    finally:
        if project is not None:
            source.close()
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise CohortError(f"feature extraction failed for {failed[0].slide_id}: {failed[0].message}"
                          + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
    return {r.slide_id: r.bag_path for r in results if r.slide_id in wanted}


def check_tissue(bags: dict[str, Path], mpp: float, patch: int) -> None:
    """A slide whose bag has no patches had no tissue at this patch size: say which, before training."""
    empty = []
    for sid, path in bags.items():
        with np.load(path, allow_pickle=False) as z:
            if len(z["coords"]) == 0:
                empty.append(sid)
    if empty:
        raise CohortError(f"no tissue found on {len(empty)} slide(s): {', '.join(empty)} (no {patch} px patch at "
                          f"{mpp:g} µm/px is half tissue); drop them from the cohort or check the scans")


def _extract_project_subset(project: Any, wanted: set[str], out_dir: Path, encoder: str, patch: int, mpp: float,
                            device: str, progress: Callable[[Any], None], weights: str | None) -> list[Any]:
    from ..features import extract_cohort

    if set(project.slide_ids) <= wanted:
        return extract_cohort(project, out_dir, encoder, patch_size=patch, mpp=mpp, device=device,
                              progress=progress, weights=weights)
    # a subset: go slide by slide through a mapping (per-slide µm/px overrides are then not applied)
    return extract_cohort({sid: project.slide_path(sid) for sid in project.slide_ids if sid in wanted}, out_dir,
                          encoder, patch_size=patch, mpp=mpp, device=device, progress=progress, weights=weights)


__all__ = ["Cohort", "CohortError", "SlideItem", "assign_splits", "check_tissue", "class_names", "ensure_features",
           "features_dir_for", "label_indices", "load_cohort"]
