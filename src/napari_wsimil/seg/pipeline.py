"""From "train pinchaud/hybrid/confkd on this cohort" to a method the engine can run: the segmentation
family's ``prepare`` (:mod:`.family`).

The same request object as every family (:class:`~napari_wsimil.train.run.RunSpec`) and the same
``RUN/run.json``. ``spec.mpp`` is the working µm/px of the U-Net and ``spec.patch`` its training patch
side; maps are written to ``RUN/maps/<slide_id>.zarr``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import WsimilError

def prepare_seg_run(spec: Any, report: Callable[[str], None] | None = None) -> Any:
    from ..io.atomic import write_text
    from ..train.registry import make_config
    from ..train.run import PreparedRun, check_spec, labelled_slides, split_and_check_resume
    from .data import open_seg_slides
    from .methods import make_method

    say = report or (lambda _m: None)
    check_spec(spec)
    run = Path(spec.out)
    cohort, usable, classes = labelled_slides(spec)
    if len(classes) != 2:
        raise WsimilError(f"{spec.method} segments tumour: it needs two slide classes (benign first, then "
                          f"malignant), got {', '.join(classes)}; give --classes BENIGN,MALIGNANT")
    present = {s.label for s in usable}
    if classes[1] not in present:
        raise WsimilError(f"no slide labelled {classes[1]!r} (malignant): weak segmentation learns tumour from "
                          "malignant slides")
    if classes[0] not in present:
        raise WsimilError(f"no slide labelled {classes[0]!r} (benign): the model needs benign slides to learn what "
                          "is not tumour")
    tr, va = split_and_check_resume(spec, usable, classes)
    run_info_path = run / "run.json"
    say(f"{spec.method}: tissue masks and pixel labels of {len(tr) + len(va)} slides")
    train_slides = open_seg_slides(cohort, tr, classes, mapping=spec.tile_classes, exhaustive=spec.exhaustive_labels,
                                   report=say)
    # Validation slides keep their paint too: painted ones choose the checkpoint by pixel Dice (checkpoint_by).
    val_slides = open_seg_slides(cohort, va, classes, mapping=spec.tile_classes, exhaustive=spec.exhaustive_labels,
                                 report=say) if va else []
    overrides: dict[str, Any] = {**spec.config, "epochs": spec.epochs, "seed": spec.seed, "device": spec.device}
    if spec.lr is not None:
        overrides["lr"] = spec.lr
    cfg = make_config(spec.method, **overrides)
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    method = make_method(spec.method, cfg, train_slides, val_slides, mpp=spec.mpp, patch=spec.patch,
                         maps_dir=run / "maps")
    from ..train.engine import TrainingError

    try:
        method.check()
    except TrainingError as exc:
        method.close()
        if created:
            _remove_empty(run)
        raise WsimilError(str(exc)) from exc
    if cohort.is_project and hasattr(method, "on_pseudo_labels"):
        method.on_pseudo_labels = _project_writer(cohort.source, run, say)
    painted = sorted(s.slide_id for s in train_slides if s.annotated)
    info = {"format": 1, "family": "segmentation", "kind": "segmentation", "cohort": str(Path(spec.source).resolve()), "method": spec.method,
            "encoder": None, "weights": None, "mpp": spec.mpp, "patch": spec.patch, "classes": classes,
            "seed": spec.seed, "width": cfg.width, "depth": cfg.depth,
            "predict_with": getattr(cfg, "predict_with", None),
            "train_slides": [s.slide_id for s in tr], "val_slides": [s.slide_id for s in va],
            "pixel_labelled_slides": painted,
            "pixel_labelled_val_slides": sorted(s.slide_id for s in val_slides if s.annotated)}
    write_text(run_info_path, json.dumps(info, indent=1))
    n_val_painted = len(info["pixel_labelled_val_slides"])
    say(f"training {spec.method}: {len(tr)} train / {len(va)} val slides ({len(painted)} + {n_val_painted} with "
        "painted pixels), "
        f"{spec.patch} px patches at {spec.mpp:g} µm/px, {spec.epochs} epochs -> {run}")
    return PreparedRun(spec, method, classes, {}, info)


def _remove_empty(folder: Path) -> None:
    """Remove a run folder made for a run that was refused, if nothing was written into it."""
    if any(p.is_file() for p in folder.rglob("*")):
        return
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        d.rmdir()
    folder.rmdir()


def _project_writer(root: Path, run: Path, say: Callable[[str], None]) -> Callable[[str], None]:
    """Write each E-step's pseudo-labels to ``PROJECT/pseudo_labels/<run>/`` (the project is opened read-only:
    the label set is the run's own folder, so the lock of a GUI that has the project open is respected)."""

    def write(slide_id: str) -> None:
        from ..project.project import Project
        from ..train.tile_labels import pseudo_label_class_ids
        from .pseudo import write_pseudo_labels

        with Project.open(root, readonly=True) as project:
            try:
                tumour, normal = pseudo_label_class_ids({c.id: c.name for c in project.classes})
            except WsimilError:
                return  # the project has no tumour/normal classes to write them with
            path, _ = write_pseudo_labels(project, run, slide_id, tumour, normal)
        say(f"pseudo-labels of {slide_id} -> {path}")

    return write


__all__ = ["prepare_seg_run"]
