"""Cohorts for the command line: a cohort CSV or a project folder → slide records with labels and splits.

* :func:`load_cohort` reads a cohort CSV (with ``project.cohort_csv.parse_rows``, the one reader of the
  format: every column is kept, ``mpp`` included) or a project folder (labels are its slide-level class
  names, in the project's class order; each slide carries the pixel size the user set).
* :func:`class_names` orders the labels (numerically when every label is a whole number).
* :func:`assign_splits` gives every slide a split and carves a stratified validation split when there is none.
* :func:`ensure_features` extracts the bags that are missing or stale, each slide opened with its µm/px.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError
from ..project.cohort_csv import CohortRow

#: One slide of a cohort: the cohort CSV's row type (``mpp``, the mask and annotation columns, ``extra``).
SlideItem = CohortRow


class CohortError(WsimilError):
    """The cohort CSV or project cannot be used as asked."""


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

    def only(self, slide_ids: Sequence[str] | None) -> Cohort:
        """The same cohort restricted to ``slide_ids`` (in the cohort's order; None keeps every slide): how a
        cluster task predicts one slide through a family's ``predict`` and writes what the whole run would."""
        if slide_ids is None:
            return self
        keep = set(slide_ids)
        return replace(self, slides=[s for s in self.slides if s.slide_id in keep])


def load_cohort(source: str | os.PathLike[str]) -> Cohort:
    """Read a cohort CSV or a project folder. A bad value (a split, an mpp that is not a positive number,
    a slide id used twice...) is an error naming its line and slide."""
    from ..project.cohort_csv import parse_rows
    from ..project.errors import ProjectError
    from ..project.project import PROJECT_FILE, Project

    src = Path(source)
    if src.is_dir() and not (src / PROJECT_FILE).is_file():
        return _folder_cohort(src)
    if src.is_dir():
        p = Project.open(src, readonly=True)
        try:
            items = [SlideItem(r.slide_id, p.slide_path(r.slide_id), r.label, r.split, mpp=r.mpp,
                               gt_mask=p.resolve(r.gt_mask) if r.gt_mask else None, gt_downsample=r.gt_downsample,
                               extra=dict(r.extra))
                     for r in p.slides]
            return Cohort(src, items, True, list(p.slide_classes) or None)
        finally:
            p.close()
    if not src.is_file():
        raise CohortError(f"cohort {src} does not exist")
    problems: list[str] = []
    try:
        items = parse_rows(src, None, problems, strict=False)
    except ProjectError as exc:
        raise CohortError(str(exc)) from None
    if len(problems) == 1:
        raise CohortError(f"{src.name} {problems[0]}")
    if problems:
        raise CohortError(f"{src.name} has {len(problems)} problems:\n  " + "\n  ".join(problems))
    return Cohort(src, items, False, None)


def _folder_cohort(folder: Path) -> Cohort:
    """A folder of slide files (new, unlabelled slides to predict): one slide per file, named by its file name."""
    from ..project.schema import id_from_path
    from ..slide.formats import SLIDE_SUFFIXES

    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(SLIDE_SUFFIXES))
    if not files:
        raise CohortError(f"{folder} holds no slide files ({', '.join(SLIDE_SUFFIXES)}) and no project: give a "
                          "cohort CSV, a project folder or a folder of slides")
    items, seen = [], set()
    for path in files:
        sid = id_from_path(path)
        if sid in seen:
            raise CohortError(f"two slides in {folder} would both be called {sid!r}; list them in a cohort CSV "
                              "with a slide_id column")
        seen.add(sid)
        items.append(SlideItem(sid, path, None))
    return Cohort(folder, items, False, None)


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


def cohort_encoder(encoder: str, weights: str | None, device: str, mpp: float) -> Any:
    """The encoder ``encoder`` (told ``mpp`` when it measures in µm), built once per process and weights file
    version (it is used in eval mode only, so sharing it is safe); a self-supervised one without its weights is refused (the name alone would be an untrained random network, silently)."""
    from ..features import build_encoder
    from ..features.extract import encoder_scale_options

    if weights is None and encoder in ("ssl-ae", "ssl-simclr"):
        raise CohortError(f"--encoder {encoder} needs its trained weights: train it on the project first "
                          f"('wsimil features PROJECT --encoder {encoder} --mpp {mpp:g}', which caches it under "
                          "PROJECT/features/ssl) and pass that file with --weights")
    key = (encoder, str(weights), _mtime(weights), device, float(mpp))
    enc = _ENCODERS.get(key)
    if enc is None:
        enc = build_encoder(encoder, weights=weights, device=device, **encoder_scale_options(encoder, mpp))
        if len(_ENCODERS) >= 2:  # a process rarely alternates between more; big encoders hold GPU memory
            _ENCODERS.pop(next(iter(_ENCODERS)))
        _ENCODERS[key] = enc
    return enc


#: encoders built by :func:`cohort_encoder` in this process: a cluster worker predicting slide after slide
#: builds (and loads the weights of) each encoder once, not once per slide
_ENCODERS: dict[tuple[Any, ...], Any] = {}


def _mtime(path: str | None) -> int:
    try:
        return Path(path).stat().st_mtime_ns if path else 0
    except OSError:
        return 0


def extract_missing(slides: Sequence[SlideItem], out_dir: Path, suffix: str,
                    is_current: Callable[[Path, SlideItem], bool], extract: Callable[[Any, SlideItem], Any],
                    report: Callable[[str], None] | None = None, project: Path | None = None, *,
                    head: str = "features", task: str = "feature extraction",
                    describe: Callable[[Any], str] | None = None) -> dict[str, Path]:
    """The loop every kind of per-slide bag shares; returns slide id → ``out_dir/<slide id><suffix>``.

    A slide whose bag ``is_current(path, slide)`` is skipped; any other is opened (through ``project`` when
    given, else with its own µm/px) and ``extract(slide, item)`` gives an object with ``attrs`` and ``save``,
    saved atomically with its slide id (an interrupted run leaves complete bags only). Every failing slide is
    reported, then one error names the first ("``task`` failed for ..."). Each slide is claimed first
    (:mod:`napari_wsimil.io.claims`), so two processes on one project share the slides instead of both doing all
    of them; a slide another live process holds is waited for."""
    from ..errors import MissingMppError
    from ..slide import open_slide

    say = report or (lambda _m: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proj: Any = None
    if project is not None:
        from ..project.project import Project

        proj = Project.open(project, readonly=True)
    bags: dict[str, Path] = {}
    failed: list[tuple[str, str]] = []

    def one(index: int, s: SlideItem, quiet_busy: bool = False) -> bool:
        """Extract slide ``s`` under its claim; False when another live process holds it."""
        from ..io.claims import Claim, try_claim

        where = f"{head} [{index + 1}/{count}] {s.slide_id}"
        bag_path = out / f"{s.slide_id}{suffix}"
        bags[s.slide_id] = bag_path
        if bag_path.exists() and is_current(bag_path, s):
            say(f"{where}: up to date")
            return True
        claim = try_claim(out, f"{s.slide_id}{suffix}")
        if not isinstance(claim, Claim):
            if not quiet_busy:
                say(f"{where}: being extracted by {claim.describe()}; waiting for it")
            return False
        with claim:
            if bag_path.exists() and is_current(bag_path, s):  # another process finished it meanwhile
                say(f"{where}: up to date")
                return True
            try:
                with (proj.open_slide(s.slide_id) if proj is not None else open_slide(s.path, mpp=s.mpp)) as slide:
                    bag = extract(slide, s)
                bag.attrs["slide_id"] = s.slide_id
                bag.save(bag_path)
            except (WsimilError, OSError) as exc:
                msg = str(exc)
                if isinstance(exc, MissingMppError):
                    msg += (" In a cohort CSV give it in an mpp column (µm/px at full resolution); in a project, "
                            "set the slide's pixel size.")
                say(f"{where}: FAILED: {msg}")
                failed.append((s.slide_id, msg))
                return True
        say(f"{where}: {describe(bag) if describe is not None else f'{len(bag)} patches'}")
        return True

    count = len(slides)
    try:
        waiting = [(i, s) for i, s in enumerate(slides) if not one(i, s)]
        while waiting:  # slides another process holds: wait for its bags (or take over if it died)
            time.sleep(0.5)
            waiting = [(i, s) for i, s in waiting if not one(i, s, quiet_busy=True)]
    finally:
        if proj is not None:
            proj.close()
    if failed:
        raise CohortError(f"{task} failed for {failed[0][0]}: {failed[0][1]}"
                          + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
    return bags


def ensure_features(slides: Sequence[SlideItem], out_dir: Path, encoder: str, patch: int, mpp: float,
                    report: Callable[[str], None] | None = None, device: str = "auto",
                    weights: str | None = None, project: Path | None = None,
                    timings: dict[str, float] | None = None) -> dict[str, Path]:
    """Extract the bags of ``slides`` that are missing or stale; returns slide id → bag path.

    ``timings``, when given, receives slide id → seconds spent encoding it, for the slides this call extracted
    (none for bags that were current): a prediction on new slides then reports what reading and encoding cost.

    With an ``imported:NAME`` encoder nothing is extracted: every slide must already have its imported bag
    at this patch size and µm/px (:func:`napari_wsimil.features.interop.imported_bags`).

    Each slide is opened with its own µm/px (``SlideItem.mpp``: the CSV's ``mpp`` column, or the pixel
    size set in the project), so a slide whose file does not record it can be used when the cohort does.
    With ``project`` the slides open through it (a missing file then says how to relink it). A slide
    whose extraction fails is an error naming it (training on a silently smaller cohort would mislead)."""
    from ..features import extract_features, stale_reasons
    from ..features.bags import BAG_SUFFIX
    from ..features.interop import imported_bags, is_imported

    if is_imported(encoder):  # features made elsewhere (wsimil features-import): nothing to compute
        bags = imported_bags([s.slide_id for s in slides], Path(out_dir), encoder, patch, mpp)
        if report is not None:
            report(f"features: {len(bags)} imported {encoder} bags")
        return bags
    enc = cohort_encoder(encoder, weights, device, mpp)

    def compute(slide: Any, item: SlideItem) -> Any:
        t0 = time.perf_counter()
        bag = extract_features(slide, enc, patch, mpp, device=enc.device)
        if timings is not None:
            timings[item.slide_id] = time.perf_counter() - t0
        return bag

    return extract_missing(
        slides, out_dir, BAG_SUFFIX, lambda path, s: not stale_reasons(path, enc, s.path, patch, mpp, s.mpp),
        compute, report, project)


def imported_geometry(source: str | os.PathLike[str], run_dir: str | os.PathLike[str], encoder: str
                      ) -> tuple[int, float] | None:
    """(patch size, µm/px) the ``imported:NAME`` bags of a cohort were imported at, from the first bag found;
    None when there is none. A run on imported features defaults to them: they cannot be remade at others."""
    from ..features.bags import BAG_SUFFIX, BagError, read_bag_attrs

    folder = features_dir_for(load_cohort(source), run_dir, encoder)
    for path in sorted(folder.glob(f"*{BAG_SUFFIX}")) if folder.is_dir() else []:
        try:
            attrs = read_bag_attrs(path)
        except BagError:
            continue
        if attrs.get("patch_size") and attrs.get("mpp"):
            return int(attrs["patch_size"]), float(attrs["mpp"])
    return None


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


__all__ = ["Cohort", "CohortError", "SlideItem", "assign_splits", "check_tissue", "class_names", "cohort_encoder",
           "ensure_features", "extract_missing", "features_dir_for", "imported_geometry", "label_indices",
           "load_cohort"]
