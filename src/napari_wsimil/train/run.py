"""What every training run shares, whatever its method family: the request, the prepared run, the checks
made before hours are spent, the train/val split and run.json.

A family (:mod:`.family`) turns a :class:`RunSpec` into a :class:`PreparedRun`; the CLI, the interactive
session and the child-process runner only ever hold these two objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WsimilError

RUN_FILE = "run.json"


@dataclass
class RunSpec:
    """What to train: the CLI's options; ``config`` holds further method settings (the GUI's form).

    ``mpp`` and ``patch`` are the family's working resolution and patch side (a MIL family encodes
    patches of ``patch`` px at ``mpp`` µm/px; a segmentation family trains its network on them)."""

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
    """A method bound to its data, ready for the engine; ``info`` is what run.json holds (``family``,
    ``method``, ``classes``, slides ...) and ``bags`` the feature bags of a family that has them."""

    spec: RunSpec
    method: Any
    classes: list[str]
    bags: dict[str, Path]
    info: dict[str, Any]


def check_spec(spec: RunSpec) -> None:
    """The checks every family makes before a run starts: numbers in range, and a run folder that is
    not overwritten by accident."""
    if spec.epochs < 1:
        raise WsimilError(f"--epochs must be at least 1, got {spec.epochs}")
    if spec.patch < 1 or spec.mpp <= 0:
        raise WsimilError("--patch and --mpp must be positive")
    if not 0 <= spec.val_fraction < 1:
        raise WsimilError(f"--val-fraction must be in [0, 1), got {spec.val_fraction}")
    if not 0 < spec.tile_min_fraction <= 1:
        raise WsimilError(f"--tile-min-fraction must be in (0, 1], got {spec.tile_min_fraction}")
    refuse_busy_run_folder(Path(spec.out))
    if (Path(spec.out) / "last.json").exists() and not spec.resume:
        raise WsimilError(f"{spec.out} already holds a training run; add --resume to continue it or choose "
                          "another --out")


def _busy_message(out: Path, owner: object) -> str:
    return (f"another training is writing into {out} ({owner}); wait for it to finish or stop it, or choose "
            "another --out")


def refuse_busy_run_folder(out: Path) -> None:
    """Refuse early (before features are extracted) a run folder that a running training holds."""
    from ..project.lock import ProjectLock

    lock = ProjectLock(out)
    if out.is_dir() and lock.held_elsewhere():
        raise WsimilError(_busy_message(out, lock.owner()))


def claim_run_folder(out: Path) -> Any:
    """The run folder's write lock (``RUN/.lock``, the project lock's flock), held while a training writes
    checkpoints there. Why: two trainings into one folder would interleave their ``last.json`` and
    checkpoints, and a resume would then mix two runs. The kernel drops the lock when the process dies, so
    a killed training never blocks the next one."""
    from ..project.lock import ProjectLock

    out.mkdir(parents=True, exist_ok=True)
    lock = ProjectLock(out)
    if not lock.acquire():
        raise WsimilError(_busy_message(out, lock.owner()))
    return lock


def labelled_slides(spec: RunSpec) -> tuple[Any, list[Any], list[str]]:
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


def split_and_check_resume(spec: RunSpec, usable: list[Any], classes: list[str], **more: Any
                           ) -> tuple[list[Any], list[Any]]:
    """(train, val) slides; with ``resume``, the run's method, µm/px, patch, classes (and ``more``) must match
    what it was trained with."""
    from .cohort import assign_splits

    slides = assign_splits(usable, classes, spec.seed, spec.val_fraction)
    run = Path(spec.out)
    if spec.resume and (run / RUN_FILE).is_file():
        old = json.loads((run / RUN_FILE).read_text())
        for key, new in (("method", spec.method), ("mpp", spec.mpp), ("patch", spec.patch), ("classes", classes),
                         *more.items()):
            if old.get(key) != new:
                raise WsimilError(f"cannot resume {run}: it was trained with {key} {old.get(key)!r}, not {new!r}")
    return [s for s in slides if s.split == "train"], [s for s in slides if s.split == "val"]


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """``RUN/run.json``, or a :class:`WsimilError` naming the file when it is missing or unreadable."""
    path = Path(run_dir) / RUN_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise WsimilError(f"{run_dir} is not a training run (no {RUN_FILE}); train one with 'wsimil train'") from None
    except (OSError, ValueError) as exc:
        raise WsimilError(f"{path} cannot be read ({exc})") from exc
    if not isinstance(info, dict) or "method" not in info:
        raise WsimilError(f"{path} does not name the run's method: was it written by 'wsimil train'?")
    return info


__all__ = ["RUN_FILE", "PreparedRun", "RunSpec", "check_spec", "claim_run_folder", "refuse_busy_run_folder", "labelled_slides", "read_run_info",
           "split_and_check_resume"]
