"""The segmentation family's own commands: ``wsimil pretrain`` and ``wsimil calibrate``.

``wsimil train``, ``predict`` and ``evaluate`` are the same for every family
(:mod:`napari_wsimil.workflow.cli`); they reach this family through :mod:`.family`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..settings import add_device_argument


def _say(msg: str) -> None:
    print(msg, flush=True)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pre-train the segmentation U-Net as an auto-encoder on a cohort's tissue",
        description="Pinchaud's pre-training: the U-Net without lateral skips learns to reconstruct tissue patches "
                    "(L2). Writes RUN/autoencoder.safetensors; start a segmentation run from it with "
                    "--set init_weights=RUN/autoencoder.safetensors (same width and depth).")
    p.add_argument("source", metavar="COHORT_OR_PROJECT")
    p.add_argument("--out", required=True, metavar="RUN")
    p.add_argument("--epochs", type=int, default=20, metavar="N")
    p.add_argument("--mpp", type=float, default=1.0, metavar="M", help="µm/px (default 1.0)")
    p.add_argument("--patch", type=int, default=128, metavar="PX", help="patch side (default 128)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--patches-per-epoch", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    add_device_argument(p)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_pretrain)

    p = subparsers.add_parser(
        "calibrate", help="set a segmentation run's operating threshold on its benign slides again",
        description="Training ends by setting the threshold that turns the run's maps into tumour masks: the lowest "
                    "(never below 0.5) at which at most OPERATING_FPR of the benign validation slides' tissue (else "
                    "the benign training slides') is called tumour, or, when validation slides are painted, the one "
                    "(never below 0.5) with the best pooled Dice on their painted pixels (--rule). This sets it "
                    "again, e.g. for another rate or rule; it "
                    "writes RUN/operating_point.json, which 'wsimil predict' records and 'wsimil evaluate' uses.")
    p.add_argument("run", metavar="RUN", help="a segmentation run folder")
    p.add_argument("--operating-fpr", type=float, default=0.001, metavar="F",
                   help="share of benign tissue the model may call tumour (default 0.001)")
    p.add_argument("--rule", default=None, choices=("auto", "benign-fpr", "val-dice"),
                   help="how to set it (default: the run's operating_rule): 'val-dice' the threshold (≥ 0.5) with "
                        "the best pooled Dice on the painted validation pixels, 'benign-fpr' the OPERATING_FPR "
                        "rule, 'auto' val-dice when a validation slide is painted with some tumour, else benign-fpr")
    p.add_argument("--cohort", default=None, metavar="CSV",
                   help="the cohort or project the run was trained on (default: the one run.json names)")
    add_device_argument(p)
    p.set_defaults(func=cmd_calibrate)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ..errors import WsimilError
    from ..train.cohort import load_cohort
    from ..train.engine import train
    from .data import open_seg_slides
    from .pretrain import AutoencoderConfig, AutoencoderMethod, export_autoencoder

    out = Path(args.out)
    if (out / "last.json").exists() and not args.resume:
        raise WsimilError(f"{out} already holds a run; add --resume or choose another --out")
    cohort = load_cohort(args.source)
    slides = open_seg_slides(cohort, cohort.slides, ["benign", "malignant"], with_labels=False)
    cfg = AutoencoderConfig(epochs=args.epochs, width=args.width, depth=args.depth, seed=args.seed,
                            device=args.device, patches_per_epoch=args.patches_per_epoch)
    method = AutoencoderMethod(cfg, slides, args.mpp, args.patch)
    for ev in train(method, out, resume=args.resume):
        if ev.kind == "epoch":
            _say(f"epoch {ev.epoch}/{ev.total_epochs}  L2 {ev.losses.get('l2', float('nan')):.5f}")
    path = export_autoencoder(out, cfg)
    _say(f"auto-encoder weights: {path}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..errors import WsimilError
    from ..train.cohort import load_cohort
    from ..train.registry import saved_config
    from .data import open_seg_slides
    from .methods import make_method
    from .operating_point import calibrate_run, describe
    from .predict import is_segmentation_run

    if not is_segmentation_run(args.run):
        raise WsimilError(f"{args.run} is not a segmentation run (no run.json of kind 'segmentation')")
    if not 0.0 < args.operating_fpr < 1.0:
        raise WsimilError(f"--operating-fpr is a share of benign tissue, above 0 and below 1 (got {args.operating_fpr})")
    info = json.loads((Path(args.run) / "run.json").read_text())
    cohort = load_cohort(args.cohort or info["cohort"])
    by_id = {s.slide_id: s for s in cohort.slides}
    try:
        state = json.loads((Path(args.run) / "last.json").read_text())
    except (OSError, ValueError):
        state = {}
    rule = args.rule or str((state.get("config") or {}).get("operating_rule", "auto"))
    painted, opened = None, []
    try:
        painted_ids = set(info.get("pixel_labelled_val_slides") or [])
        if rule != "benign-fpr" and painted_ids & set(by_id) and not info.get("federated"):
            # the painted validation pixels, exactly as training measured them (the method's own patches)
            items = [by_id[i] for i in info.get("val_slides", []) if i in by_id]
            opened = open_seg_slides(cohort, items, info["classes"])
            cfg = saved_config(info["method"], state)
            method = make_method(info["method"], cfg, [], opened, mpp=info["mpp"], patch=info["patch"])
            painted = lambda net, dev: method.painted_val_levels(net, dev, lambda m, x: m(x))  # noqa: E731
        for split, source in (("val_slides", "validation"), ("train_slides", "training")):
            benign_class = str(info["classes"][0])  # only benign slides are opened (tissue masks cost time)
            items = [by_id[i] for i in info.get(split, []) if i in by_id and str(by_id[i].label) == benign_class]
            slides = open_seg_slides(cohort, items, info["classes"]) if items else []
            benign = [s for s in slides if s.label == 0]
            try:
                point = calibrate_run(args.run, benign, args.operating_fpr, source=source, device=args.device,
                                      rule=rule, painted=painted) if benign or painted else None
            except ValueError as exc:
                raise WsimilError(f"cannot set the threshold by rule {rule!r}: {exc}") from exc
            finally:
                for s in slides:
                    s.close()
            if point:
                _say(describe(point))
                return 0
    finally:
        for s in opened:
            s.close()
    raise WsimilError(f"none of the slides {args.run} was trained or validated on is a benign slide of "
                      f"{args.cohort or info['cohort']} with tissue: nothing to set the threshold on")


__all__ = ["cmd_calibrate", "cmd_pretrain", "register"]
