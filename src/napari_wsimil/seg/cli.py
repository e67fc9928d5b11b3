"""The segmentation side of ``wsimil predict`` and ``wsimil evaluate``; ``wsimil pretrain`` and ``wsimil calibrate``.

``wsimil train --method pinchaud|hybrid|confkd`` goes through the shared ``train`` command
(:mod:`napari_wsimil.train.cli`); ``predict`` and ``evaluate`` notice a segmentation run or prediction and
come here.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _say(msg: str) -> None:
    print(msg, flush=True)


def _fmt(v: Any) -> str:
    import math

    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


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
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_pretrain)

    p = subparsers.add_parser(
        "calibrate", help="set a segmentation run's operating threshold on its benign slides again",
        description="Training ends by setting the threshold that turns the run's maps into tumour masks: the lowest "
                    "(never below 0.5) at which at most OPERATING_FPR of the benign validation slides' tissue (else "
                    "the benign training slides') is called tumour. This sets it again, e.g. for another rate; it "
                    "writes RUN/operating_point.json, which 'wsimil predict' records and 'wsimil evaluate' uses.")
    p.add_argument("run", metavar="RUN", help="a segmentation run folder")
    p.add_argument("--operating-fpr", type=float, default=0.001, metavar="F",
                   help="share of benign tissue the model may call tumour (default 0.001)")
    p.add_argument("--cohort", default=None, metavar="CSV",
                   help="the cohort or project the run was trained on (default: the one run.json names)")
    p.add_argument("--device", default="auto")
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
    from .data import open_seg_slides
    from .operating_point import calibrate_run, describe
    from .predict import is_segmentation_run

    if not is_segmentation_run(args.run):
        raise WsimilError(f"{args.run} is not a segmentation run (no run.json of kind 'segmentation')")
    if not 0.0 < args.operating_fpr < 1.0:
        raise WsimilError(f"--operating-fpr is a share of benign tissue, above 0 and below 1 (got {args.operating_fpr})")
    info = json.loads((Path(args.run) / "run.json").read_text())
    cohort = load_cohort(args.cohort or info["cohort"])
    by_id = {s.slide_id: s for s in cohort.slides}
    for split, source in (("val_slides", "validation"), ("train_slides", "training")):
        benign_class = str(info["classes"][0])  # only benign slides are opened (tissue masks cost time)
        items = [by_id[i] for i in info.get(split, []) if i in by_id and str(by_id[i].label) == benign_class]
        slides = open_seg_slides(cohort, items, info["classes"]) if items else []
        benign = [s for s in slides if s.label == 0]
        try:
            point = calibrate_run(args.run, benign, args.operating_fpr, source=source,
                                  device=args.device) if benign else None
        finally:
            for s in slides:
                s.close()
        if point:
            _say(describe(point))
            return 0
    raise WsimilError(f"none of the slides {args.run} was trained or validated on is a benign slide of "
                      f"{args.cohort or info['cohort']} with tissue: nothing to set the threshold on")


def cmd_predict_seg(args: argparse.Namespace) -> int:
    from ..infer.predict import SlidePrediction, write_predictions
    from ..io.atomic import write_text
    from ..train.cohort import load_cohort
    from .data import open_seg_slides
    from .operating_point import describe, read_operating_point
    from .predict import load_seg_run, map_slide, remove_zarr

    run = load_seg_run(args.run, device=args.device, weights=args.weights)
    point = read_operating_point(args.run) if args.weights == "best" else None
    threshold = float(point["threshold"]) if point else 0.5
    cohort = load_cohort(args.cohort)
    classes = run.info.get("classes") or ["0", "1"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _say(f"{run.method}: mapping {len(cohort.slides)} slides at {run.mpp:g} µm/px -> {out / 'maps'}")
    _say(describe(point) if point else "tumour masks at p ≥ 0.5: the run has no operating threshold for its best "
         "weights ('wsimil calibrate' sets one)")
    preds = []
    for i, item in enumerate(cohort.slides, 1):
        slide, = open_seg_slides(cohort, [item], classes, with_labels=False)
        try:
            m = map_slide(run, slide, out, top_k=args.top_k, extra={"threshold": threshold})
        finally:
            slide.close()
        masks = ""
        if getattr(args, "masks", False):
            from .masks import write_tumour_mask, write_tumour_outlines

            write_tumour_mask(m.zarr_path, out / "masks" / f"{item.slide_id}.ome.tif", slide, run.mpp, threshold,
                              {"method": run.method, "run": str(Path(args.run).resolve())})
            _, n = write_tumour_outlines(m.zarr_path, out / "masks" / f"{item.slide_id}.geojson", slide, run.mpp,
                                         threshold)
            masks = f"; {n} tumour region{'s' if n != 1 else ''} at p ≥ {threshold:.3f}"
        remove_zarr(m.zarr_path)  # the TIFF is the artefact; the zarr was the scratch space
        score = m.score_max if args.slide_score == "max" else m.score_topk
        preds.append(SlidePrediction(item.slide_id, [1.0 - score, score], None, None, None))
        _say(f"[{i}/{len(cohort.slides)}] {item.slide_id}: p(malignant) {score:.3f} "
             f"(max pixel {m.score_max:.3f}, top-{args.top_k} {m.score_topk:.3f}){masks}")
    write_predictions(preds, 2, out / "predictions.csv")
    write_text(out / "prediction.json", json.dumps(
        {"run": str(Path(args.run).resolve()), "cohort": str(Path(args.cohort).resolve()), "method": run.method,
         "kind": "segmentation", "classes": classes, "weights": args.weights, "slide_score": args.slide_score,
         "top_k": args.top_k, "mpp": run.mpp, "threshold": threshold, "operating_point": point}, indent=1))
    _say(f"predictions: {out / 'predictions.csv'}")
    return 0


def report_segmentation(seg: dict[str, Any], say: Callable[[str], None]) -> None:
    if not seg:
        return
    say(f"segmentation on {seg['n_slides_with_truth']} slides with ground truth "
        f"({seg['n_malignant_with_truth']} with tumour, {seg['n_lesions']} lesions): "
        f"Dice {_fmt(seg['dice'])} (pooled {_fmt(seg['dice_pooled'])}: precision "
        f"{_fmt(seg.get('precision_pooled'))}, recall {_fmt(seg.get('recall_pooled'))})  IoU {_fmt(seg['iou'])}  "
        f"FROC {_fmt(seg['froc'])}  benign pixels called tumour {_fmt(seg['benign_positive_fraction'])}  "
        f"(tumour at p ≥ {seg['threshold']:.3f}" + (f"; Dice at 0.5: {_fmt(seg['dice_at_0.5'])})"
                                                     if "dice_at_0.5" in seg else ")"))


__all__ = ["cmd_calibrate", "cmd_predict_seg", "cmd_pretrain", "register", "report_segmentation"]
