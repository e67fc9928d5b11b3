"""Everything between "train this method on that cohort" and the engine's first epoch, for the CLI and the GUI.

:func:`prepare_mil_run` checks the request (before hours are spent), splits the slides, extracts the
feature bags that are missing, derives MS-CLAM's tile labels from the drawings, builds the method and
writes ``RUN/run.json``. The caller then iterates ``engine.train(prepared.method, spec.out,
resume=spec.resume)``: ``wsimil train`` prints the events; the training widget runs it in a child process
(:mod:`.subprocess_run`) whose events a napari worker relays.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WsimilError


@dataclass
class MILRunSpec:
    """What to train: the CLI's options; ``config`` holds further method settings (the GUI's form)."""

    source: Path
    method: str
    out: Path
    epochs: int = 200
    encoder: str = "handcrafted"
    weights: str | None = None
    mpp: float = 0.5
    patch: int = 256
    seed: int = 0
    lr: float | None = None
    classes: list[str] | None = None
    val_fraction: float = 0.25
    device: str = "auto"
    resume: bool = False
    tile_classes: str | None = None
    tile_min_fraction: float = 0.5
    exhaustive_labels: bool = False
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedRun:
    """A method bound to its bags, ready for ``engine.train``; ``info`` is what run.json holds."""

    spec: MILRunSpec
    method: Any
    classes: list[str]
    bags: dict[str, Path]
    info: dict[str, Any]


def _check(spec: MILRunSpec) -> None:
    if spec.epochs < 1:
        raise WsimilError(f"--epochs must be at least 1, got {spec.epochs}")
    if spec.patch < 1 or spec.mpp <= 0:
        raise WsimilError("--patch and --mpp must be positive")
    if not 0 <= spec.val_fraction < 1:
        raise WsimilError(f"--val-fraction must be in [0, 1), got {spec.val_fraction}")
    if not 0 < spec.tile_min_fraction <= 1:
        raise WsimilError(f"--tile-min-fraction must be in (0, 1], got {spec.tile_min_fraction}")
    if (Path(spec.out) / "last.json").exists() and not spec.resume:
        raise WsimilError(f"{spec.out} already holds a training run; add --resume to continue it or choose "
                          "another --out")


def labelled_slides(spec: MILRunSpec) -> tuple[Any, list[Any], list[str]]:
    """(cohort, labelled slides outside the test split, class names); a label outside the classes is one
    error naming the slide."""
    from .cohort import class_names, label_indices, load_cohort

    cohort = load_cohort(spec.source)
    usable = [s for s in cohort.slides if s.label is not None and s.split != "test"]
    if not usable:
        raise WsimilError(f"no labelled slides in {spec.source}")
    classes = list(spec.classes or cohort.classes or class_names([s.label for s in usable]))
    label_indices(usable, classes)
    return cohort, usable, classes


def split_and_check_resume(spec: MILRunSpec, usable: list[Any], classes: list[str], **more: Any
                           ) -> tuple[list[Any], list[Any]]:
    """(train, val) slides; with ``resume``, the run's method, µm/px, patch, classes (and ``more``) must match
    what it was trained with."""
    from .cohort import assign_splits

    slides = assign_splits(usable, classes, spec.seed, spec.val_fraction)
    run = Path(spec.out)
    if spec.resume and (run / "run.json").is_file():
        old = json.loads((run / "run.json").read_text())
        for key, new in (("method", spec.method), ("mpp", spec.mpp), ("patch", spec.patch), ("classes", classes),
                         *more.items()):
            if old.get(key) != new:
                raise WsimilError(f"cannot resume {run}: it was trained with {key} {old.get(key)!r}, not {new!r}")
    return [s for s in slides if s.split == "train"], [s for s in slides if s.split == "val"]


def prepare_mil_run(spec: MILRunSpec, report: Callable[[str], None] | None = None) -> PreparedRun:
    """Validate, split, extract, label and build (see the module doc); errors are ``WsimilError``."""
    from ..io.atomic import write_text
    from .cohort import (
        check_tissue,
        ensure_features,
        features_dir_for,
    )
    from .mil import BagDataset
    from .registry import build, get, make_config

    if get(spec.method).kind == "segmentation":
        from ..seg.pipeline import prepare_seg_run

        return prepare_seg_run(spec, report)
    say = report or (lambda _m: None)
    _check(spec)
    run = Path(spec.out)
    cohort, usable, classes = labelled_slides(spec)
    present = sorted({s.label for s in usable})
    if len(present) < 2:
        raise WsimilError(f"the cohort has only class {present[0]!r}: a classifier needs labelled slides of at "
                          "least two classes")
    if len(classes) < 2:
        raise WsimilError(f"a classifier needs at least two classes, got {classes}")
    tr, va = split_and_check_resume(spec, usable, classes, encoder=spec.encoder)
    slides = tr + va
    run_info_path = run / "run.json"

    feat_dir = features_dir_for(cohort, run, spec.encoder)
    say(f"features: {len(slides)} slides, encoder {spec.encoder}, {spec.patch} px at {spec.mpp:g} µm/px "
        f"-> {feat_dir}")
    bags = ensure_features(slides, feat_dir, spec.encoder, spec.patch, spec.mpp, report=say, device=spec.device,
                           weights=spec.weights, project=cohort.source if cohort.is_project else None)
    check_tissue(bags, spec.mpp, spec.patch)

    index = {c: i for i, c in enumerate(classes)}
    tiles: dict[str, Any] = {}
    if spec.method == "ms-clam":
        from .cohort_labels import cohort_tile_labels

        tiles = cohort_tile_labels(cohort, tr, bags, classes, mapping=spec.tile_classes,
                                   exhaustive=spec.exhaustive_labels, min_fraction=spec.tile_min_fraction,
                                   report=say)
        say(f"ms-clam: {len(tiles)} of {len(tr)} training slides have tile labels"
            + ("" if tiles else "; it learns from slide labels only"))

    def dataset(items: list) -> BagDataset | None:
        if not items:
            return None
        return BagDataset(files=[bags[s.slide_id] for s in items], labels=[index[s.label] for s in items],
                          instance_labels=[tiles.get(s.slide_id) for s in items])

    overrides: dict[str, Any] = {**spec.config, "epochs": spec.epochs, "seed": spec.seed, "device": spec.device,
                                 "n_classes": len(classes)}
    if spec.lr is not None:
        overrides["lr"] = spec.lr
    method = build(spec.method, dataset(tr), dataset(va), make_config(spec.method, **overrides))

    run.mkdir(parents=True, exist_ok=True)
    info = {"format": 1, "cohort": str(Path(spec.source).resolve()), "method": spec.method,
            "encoder": spec.encoder, "weights": spec.weights, "mpp": spec.mpp, "patch": spec.patch,
            "classes": classes, "seed": spec.seed, "features_dir": str(feat_dir),
            "train_slides": [s.slide_id for s in tr], "val_slides": [s.slide_id for s in va],
            "tile_labelled_slides": sorted(tiles)}
    write_text(run_info_path, json.dumps(info, indent=1))
    say(f"training {spec.method}: {len(tr)} train / {len(va)} val slides, classes {', '.join(classes)}, "
        f"{spec.epochs} epochs -> {run}")
    return PreparedRun(spec, method, classes, bags, info)


__all__ = ["MILRunSpec", "PreparedRun", "prepare_mil_run"]
