"""``wsimil train``, ``wsimil predict`` and ``wsimil evaluate`` for the attention-MIL methods.

Registered by the main command line with :func:`register`; torch and friends are imported inside the
commands so that ``wsimil --help`` stays instant. Problems with the user's input raise ``WsimilError``
(printed by ``wsimil`` as one line, exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

MIL_METHODS = ("abmil", "clam-sb", "clam-mb", "ms-clam")
SEG_METHODS = ("pinchaud", "hybrid", "confkd")
METHODS = MIL_METHODS + SEG_METHODS


def register(subparsers: Any) -> None:
    """Add ``train``, ``predict`` and ``evaluate`` to ``subparsers`` (an argparse sub-parser action)."""
    p = subparsers.add_parser(
        "train", help="train an attention-MIL slide classifier or a pixel segmentation model",
        description="Attention MIL (abmil, clam-sb, clam-mb, ms-clam): extract the feature bags that are missing, "
                    "then train on the labelled slides. Pixel segmentation (pinchaud: slide labels only; hybrid, "
                    "confkd: slide labels plus painted pixels): train a U-Net on patches at --mpp (default 1 "
                    "µm/px, --patch 128). Both write RUN/ (checkpoints, best.safetensors, run.json). Without a "
                    "split column the slides are split train/val, stratified by label and fixed by --seed.")
    p.add_argument("source", metavar="COHORT_OR_PROJECT",
                   help="a cohort CSV (slide_id,path,label and optionally split, mpp: µm/px for files that "
                        "lack it, ...; see the README) or a project folder")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--out", required=True, metavar="RUN", help="run folder to write")
    p.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="maximum epochs (default: the method's, 200 for MIL, 40 for segmentation)")
    p.add_argument("--encoder", default="handcrafted", metavar="NAME", help="feature encoder (default handcrafted)")
    p.add_argument("--weights", default=None, metavar="FILE", help="weights for the encoder")
    p.add_argument("--mpp", type=float, default=None, metavar="M",
                   help="µm per pixel of the patches (default 0.5 for MIL, 1.0 for segmentation)")
    p.add_argument("--patch", type=int, default=None, metavar="PX",
                   help="patch size in pixels (default 256 for MIL, 128 for segmentation)")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", dest="options",
                   help="a method setting, e.g. --set beta1=0 --set alpha=0 (see the method's settings in the "
                        "GUI or napari_wsimil.train.registry); repeatable")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of split, weights and sampling")
    p.add_argument("--lr", type=float, default=None, metavar="LR", help="learning rate (default: the method's)")
    p.add_argument("--classes", default=None, metavar="A,B,...",
                   help="class names in index order (default: the project's, or the CSV's labels sorted)")
    p.add_argument("--val-fraction", type=float, default=0.25, metavar="F",
                   help="share of each class held out for validation when there is no split (default 0.25)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps ...")
    p.add_argument("--resume", action="store_true", help="continue RUN from its last checkpoint")
    g = p.add_argument_group(
        "tile labels (ms-clam)",
        "MS-CLAM learns from tile labels where a slide has drawings: a project's painted pixels, boxes and "
        "polygons, or a CSV's pixel_labels mask (1 tumour, 2 normal) and annotations GeoJSON. A patch takes "
        "the class covering at least --tile-min-fraction of it; other patches stay unknown.")
    g.add_argument("--tile-classes", default=None, metavar="CLASS=SLIDE_CLASS,...",
                   help="which drawn class means which slide class, e.g. 'tumour=malignant,normal=benign' "
                        "(default: by name; tumour-like names -> class 1, normal-like -> class 0)")
    g.add_argument("--tile-min-fraction", type=float, default=0.5, metavar="F",
                   help="share of a patch a class must cover to label it (default 0.5)")
    g.add_argument("--exhaustive-labels", action="store_true",
                   help="annotated slides are fully annotated: unpainted tissue there is normal (class 0)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "predict", help="slide probabilities and patch attention from a trained run",
        description="Write PRED/predictions.csv (slide_id, prob_0 ... by class index) and "
                    "PRED/attention/<slide_id>.npz (coords, attention) and PRED/heatmaps/<slide_id>.tif (attention "
                    "percentiles at the slide's geometry, µm/px = slide µm/px x downsample) for every slide of the cohort, "
                    "extracting missing feature bags with the run's encoder, µm/px and patch size.")
    p.add_argument("run", metavar="RUN", help="a run folder written by 'wsimil train'")
    p.add_argument("--cohort", required=True, metavar="CSV", help="a cohort CSV or a project folder")
    p.add_argument("--out", required=True, metavar="PRED", help="folder to write")
    p.add_argument("--weights", choices=("best", "last"), default="best",
                   help="best (by validation loss, default) or last checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps ...")
    p.add_argument("--no-heatmaps", dest="heatmaps", action="store_false",
                   help="skip PRED/heatmaps/<slide_id>.tif (attention percentiles aligned with the slide)")
    p.add_argument("--heatmap-overlap", type=float, default=0.0, metavar="F",
                   help="draw heatmaps from a grid whose patches overlap by F (CLAM uses 0.5: smoother maps, "
                        "about 4x the patches to encode; default 0 reuses the feature bags)")
    g = p.add_argument_group("segmentation runs", "PRED/maps/<slide_id>.tif: malignant probability at the run's "
                             "µm/px, opened by napari-wsimil as an overlay")
    g.add_argument("--slide-score", choices=("max", "topk"), default="max",
                   help="prob_1 of predictions.csv: the maximum pixel probability (Pinchaud) or the mean of the "
                        "top-K patch maxima (Hybrid Supervision's stage 2)")
    g.add_argument("--top-k", type=int, default=8, metavar="K", help="K of --slide-score topk (default 8)")
    g.add_argument("--masks", action="store_true",
                   help="also PRED/masks/<slide_id>.ome.tif (1 = tumour) and <slide_id>.geojson (QuPath outlines), "
                        "cut at the run's operating threshold ('wsimil calibrate' sets it), else 0.5")
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser(
        "evaluate", help="slide AUC, accuracy, balanced accuracy and F1; attention AUC and FROC with ground truth",
        description="Compare PRED/predictions.csv with the cohort's labels on the slides present in both; "
                    "where the cohort has gt_mask (+ gt_downsample) columns, also the patch-level attention AUC "
                    "against the ground truth and the CAMELYON16 FROC. Prints the metrics and writes "
                    "PRED/metrics.json.")
    p.add_argument("pred", metavar="PRED", help="a folder written by 'wsimil predict'")
    p.add_argument("--cohort", required=True, metavar="CSV", help="a cohort CSV or a project folder")
    p.add_argument("--split", choices=("train", "val", "test"), default=None,
                   help="only the slides of this split (default: every labelled slide predicted)")
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="segmentation: tumour where p ≥ P (default: the run's operating threshold recorded by "
                        "'wsimil predict', else 0.5)")
    p.add_argument("--no-localisation", dest="localisation", action="store_false",
                   help="skip the attention AUC and FROC against the cohort's gt_mask columns")
    p.set_defaults(func=cmd_evaluate)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def parse_options(items: list[str], method: str) -> dict[str, Any]:
    """``--set name=value`` pairs typed by the method's config fields (bool, int, float, str, None)."""
    from dataclasses import fields

    from ..errors import WsimilError
    from .registry import get

    types = {f.name: f.type for f in fields(get(method).config_cls)}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in types:
            raise WsimilError(f"--set {item!r}: {method} settings are {', '.join(sorted(types))} (as NAME=VALUE)")
        kind = str(types[name])
        text = text.strip()
        try:
            if text.lower() in ("none", "null") and "None" in kind:
                out[name] = None
            elif kind.startswith("bool"):
                if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(text)
                out[name] = text.lower() in ("1", "true", "yes", "on")
            elif kind.startswith("int"):
                out[name] = int(text)
            elif kind.startswith("float"):
                out[name] = float(text)
            else:
                out[name] = text
        except ValueError:
            raise WsimilError(f"--set {item!r}: {text!r} is not a valid {kind} for {name}") from None
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from .engine import train
    from .pipeline import MILRunSpec, prepare_mil_run
    from .registry import make_config

    seg = args.method in SEG_METHODS
    epochs = args.epochs if args.epochs is not None else make_config(args.method).epochs
    mpp = args.mpp if args.mpp is not None else (1.0 if seg else 0.5)
    patch = args.patch if args.patch is not None else (128 if seg else 256)
    spec = MILRunSpec(source=Path(args.source), method=args.method, out=Path(args.out), epochs=epochs,
                      encoder=args.encoder, weights=args.weights, mpp=mpp, patch=patch, seed=args.seed,
                      lr=args.lr, classes=[c.strip() for c in args.classes.split(",") if c.strip()]
                      if args.classes else None, val_fraction=args.val_fraction, device=args.device,
                      resume=args.resume, tile_classes=args.tile_classes,
                      tile_min_fraction=args.tile_min_fraction, exhaustive_labels=args.exhaustive_labels,
                      config=parse_options(args.options, args.method))
    prepared = prepare_mil_run(spec, report=_say)
    method, run = prepared.method, spec.out

    epoch_line: dict[str, Any] = {}
    t0 = time.perf_counter()
    for ev in train(method, run, resume=spec.resume):
        if ev.kind == "epoch":
            epoch_line = {"epoch": ev.epoch, "losses": ev.losses, "metrics": ev.metrics, "eta": ev.eta}
        elif ev.kind == "validation":
            epoch_line.update(val_losses=ev.losses, val_metrics=ev.metrics, eta=ev.eta)
        elif ev.kind == "checkpoint":
            _say(_epoch_text(epoch_line, ev.total_epochs))
            epoch_line = {}
        elif ev.kind == "done":
            if epoch_line:
                _say(_epoch_text(epoch_line, ev.total_epochs))
            _say(f"done after epoch {ev.epoch} ({ev.message}) in {time.perf_counter() - t0:.1f} s; "
                 f"model: {run / 'best.safetensors'}")
    return 0


def _epoch_text(line: dict[str, Any], total: int) -> str:
    losses = line.get("losses") or {}
    parts = [f"epoch {line.get('epoch', '?')}/{total}",
             "loss " + " ".join(f"{k} {_fmt(v, '.4f')}" for k, v in losses.items())]
    m = line.get("metrics") or {}
    if m:
        parts.append("train " + " ".join(f"{k} {_fmt(v)}" for k, v in m.items()))
    if "val_losses" in line:
        vl = line["val_losses"] or {}
        vm = line.get("val_metrics") or {}
        parts.append("val loss " + _fmt(vl.get("bag", vl.get("total")), ".4f") + "".join(
            f" {k} {_fmt(v)}" for k, v in vm.items()))
    parts.append(f"ETA {_eta(line.get('eta'))}")
    return "  ".join(parts)


def cmd_predict(args: argparse.Namespace) -> int:
    from ..errors import WsimilError
    from ..infer.predict import load_run, predict_bag, write_attention, write_predictions
    from ..io.atomic import write_text
    from ..seg.predict import is_segmentation_run
    from .cohort import ensure_features, features_dir_for, load_cohort

    if is_segmentation_run(args.run):
        from ..seg.cli import cmd_predict_seg

        return cmd_predict_seg(args)
    if getattr(args, "masks", False):
        raise WsimilError("--masks cuts the probability maps of segmentation runs; for attention runs use "
                          "the heatmaps (PRED/heatmaps) or the Training widget's outline export")
    if not 0 <= args.heatmap_overlap < 1:
        raise WsimilError(f"--heatmap-overlap must be in [0, 1), got {args.heatmap_overlap}")
    run = load_run(args.run, device=args.device, weights=args.weights)
    for key in ("encoder", "mpp", "patch"):
        if key not in run.info:
            raise WsimilError(f"{Path(args.run) / 'run.json'} is missing or lacks {key!r}: was RUN written by "
                              "'wsimil train'?")
    cohort = load_cohort(args.cohort)
    encoder, mpp, patch = run.info["encoder"], float(run.info["mpp"]), int(run.info["patch"])
    feat_dir = features_dir_for(cohort, args.run, encoder)
    _say(f"features: {len(cohort.slides)} slides, encoder {encoder}, {patch} px at {mpp:g} µm/px -> {feat_dir}")
    bags = ensure_features(cohort.slides, feat_dir, encoder, patch, mpp, report=_say, device=args.device,
                           weights=run.info.get("weights"),
                           project=cohort.source if cohort.is_project else None)
    out = Path(args.out)
    (out / "attention").mkdir(parents=True, exist_ok=True)
    preds = []
    for i, s in enumerate(cohort.slides, 1):
        pred = predict_bag(run, s.slide_id, bags[s.slide_id])
        write_attention(pred, out / "attention" / f"{s.slide_id}.npz")
        if getattr(args, "heatmaps", True):
            from ..features.bags import read_bag_attrs
            from ..infer.heatmap import write_slide_heatmap

            try:
                attrs = read_bag_attrs(bags[s.slide_id])
                coords, scores = pred.coords, pred.attention
                if args.heatmap_overlap > 0:
                    from ..infer.predict import overlap_attention

                    coords, scores = overlap_attention(run, s.slide_id, attrs["slide_path"], args.heatmap_overlap,
                                                       attrs.get("slide_mpp"), k=int(pred.probs.argmax()))
                write_slide_heatmap(out / "heatmaps", s.slide_id, coords, scores, attrs,
                                    overlap=args.heatmap_overlap)
            except (WsimilError, OSError, KeyError, ValueError) as exc:
                print(f"{s.slide_id}: no heatmap ({exc})", file=sys.stderr)
        preds.append(pred)
        probs = " ".join(f"{c} {p:.3f}" for c, p in zip(run.classes, pred.probs))
        _say(f"[{i}/{len(cohort.slides)}] {s.slide_id}: {probs} ({len(pred.coords)} patches)")
    write_predictions(preds, run.n_classes, out / "predictions.csv")
    write_text(out / "prediction.json", json.dumps(
        {"run": str(Path(args.run).resolve()), "cohort": str(Path(args.cohort).resolve()),
         "method": run.method, "classes": run.classes, "weights": args.weights}, indent=1))
    _say(f"predictions: {out / 'predictions.csv'}")
    return 0


def _no_nan(v: Any) -> Any:
    """JSON has no NaN: metrics that cannot be computed are written as null."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_no_nan(x) for x in v]
    return v


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..errors import WsimilError
    from ..infer.metrics import slide_metrics
    from ..infer.predict import read_predictions
    from ..io.atomic import write_text
    from .cohort import class_names, label_indices, load_cohort

    pred_dir = Path(args.pred)
    ids, probs = read_predictions(pred_dir / "predictions.csv")
    meta_path = pred_dir / "prediction.json"
    classes = None
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        classes = meta.get("classes")
    cohort = load_cohort(args.cohort)
    labelled = {s.slide_id: s for s in cohort.slides if s.label is not None
                and (args.split is None or s.split == args.split)}
    if args.split is not None and not labelled:
        raise WsimilError(f"no labelled slide of {args.cohort} is in the {args.split} split")
    if not classes:
        classes = cohort.classes or class_names([s.label for s in labelled.values()])
    if len(classes) != probs.shape[1]:
        raise WsimilError(f"{len(classes)} classes but {probs.shape[1]} probability columns in the predictions")
    rows = [i for i, sid in enumerate(ids) if sid in labelled]
    if not rows:
        raise WsimilError(f"no slide of {pred_dir / 'predictions.csv'} has a label in {args.cohort}")
    labels = label_indices([labelled[ids[i]] for i in rows], classes)
    metrics: dict[str, Any] = slide_metrics(probs[rows], labels)
    metrics["classes"] = classes
    if args.split is not None:
        metrics["split"] = args.split
    with_truth = [labelled[ids[i]] for i in rows if labelled[ids[i]].gt_mask is not None]
    seg_pred = (pred_dir / "maps").is_dir()
    if getattr(args, "localisation", True) and with_truth and seg_pred:
        from ..infer.evaluation import TruthItem
        from ..seg.evaluation import segmentation_metrics

        threshold = args.threshold if getattr(args, "threshold", None) is not None else meta.get("threshold", 0.5)
        if not 0.0 < threshold <= 1.0:
            raise WsimilError(f"--threshold is a probability in (0, 1], got {threshold}")
        metrics["segmentation"] = segmentation_metrics(
            [TruthItem(s.slide_id, s.gt_mask, s.gt_downsample) for s in with_truth], pred_dir / "maps",
            threshold=float(threshold))
    elif getattr(args, "localisation", True) and with_truth:
        from ..infer.evaluation import TruthItem, localisation_metrics

        loc = localisation_metrics([TruthItem(s.slide_id, s.gt_mask, s.gt_downsample) for s in with_truth],
                                   pred_dir / "attention")
        metrics["localisation"] = loc
    clean = _no_nan(metrics)
    write_text(pred_dir / "metrics.json", json.dumps(clean, indent=1))
    _say(f"{metrics['n_slides']} slides: AUC {_fmt(metrics['auc'])}  accuracy {_fmt(metrics['accuracy'])}  "
         f"balanced accuracy {_fmt(metrics['balanced_accuracy'])}  F1 {_fmt(metrics['f1'])}")
    loc = metrics.get("localisation")
    if loc:
        _say(f"localisation on {loc['n_slides_with_truth']} slides with ground truth "
             f"({loc['n_slides_with_tumour_patches']} with tumour patches, {loc['n_lesions']} lesions): "
             f"attention AUC {_fmt(loc['attention_auc'])} (pooled {_fmt(loc['attention_auc_pooled'])})  "
             f"FROC {_fmt(loc['froc'])}")
    if metrics.get("segmentation"):
        from ..seg.cli import report_segmentation

        report_segmentation(metrics["segmentation"], _say)
    missing = len(ids) - len(rows)
    if missing:
        why = "no label in the cohort" if args.split is None else f"no label or are not in the {args.split} split"
        print(f"({missing} predicted slides have {why} and were left out)", file=sys.stderr)
    _say(f"metrics: {pred_dir / 'metrics.json'}")
    return 0


__all__ = ["cmd_evaluate", "cmd_predict", "cmd_train", "register"]
