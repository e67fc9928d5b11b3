"""``wsimil train``, ``wsimil predict``, ``wsimil evaluate`` and ``wsimil methods``, for every method family.

The commands never test which family a method belongs to: they ask the registry for the method's (or the
run's) :class:`~napari_wsimil.train.family.MethodFamily` and call it. Registered by the main command line
with :func:`register`; torch and friends are imported inside the commands (the registry loads the
families on first use) so that ``wsimil --help`` stays instant. Problems with the user's input raise
``WsimilError`` (printed by ``wsimil`` as one line, exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from ..settings import add_device_argument

def register(subparsers: Any) -> None:
    """Add ``train``, ``predict``, ``evaluate`` and ``methods`` to ``subparsers`` (an argparse sub-parser action)."""
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
    p.add_argument("--method", required=True, metavar="NAME",
                   help="a registered method ('wsimil methods' lists them): abmil, clam-sb, clam-mb, ms-clam "
                        "(attention MIL), pinchaud, hybrid, confkd (segmentation), zoommil (multi-magnification "
                        "MIL; --mpp is its lowest level, --set levels=8,4,1 all of them), or one a plugin adds")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder to write")
    p.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="maximum epochs (default: the method's, e.g. 200 for MIL, 40 for segmentation)")
    p.add_argument("--encoder", default="handcrafted", metavar="NAME",
                   help="feature encoder (default handcrafted), or imported:NAME for features brought in with "
                        "'wsimil features-import'")
    p.add_argument("--weights", default=None, metavar="FILE", help="weights for the encoder")
    p.add_argument("--mpp", type=float, default=None, metavar="M",
                   help="µm per pixel of the patches (default: the method family's, 0.5 for MIL, 1.0 for "
                        "segmentation; with --encoder imported:NAME, the one the features were imported at)")
    p.add_argument("--patch", type=int, default=None, metavar="PX",
                   help="patch size in pixels (default: the method family's, 256 for MIL, 128 for segmentation; "
                        "with --encoder imported:NAME, the one the features were imported at)")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", dest="options",
                   help="a method setting, e.g. --set beta1=0 --set alpha=0 (see the method's settings in the "
                        "GUI or napari_wsimil.train.registry); repeatable")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of split, weights and sampling")
    p.add_argument("--lr", type=float, default=None, metavar="LR", help="learning rate (default: the method's)")
    p.add_argument("--classes", default=None, metavar="A,B,...",
                   help="class names in index order (default: the project's, or the CSV's labels sorted)")
    p.add_argument("--val-fraction", type=float, default=0.25, metavar="F",
                   help="share of each class held out for validation when there is no split (default 0.25)")
    add_device_argument(p)
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
        description="Write PRED/predictions.csv (slide_id, prob_0 ... by class index, then patches_encoded and "
                    "seconds per slide) for every slide of the cohort, and the run family's maps: for attention "
                    "methods PRED/attention/<slide_id>.npz (coords, attention) and PRED/heatmaps/<slide_id>.tif "
                    "(attention percentiles at the slide's geometry, µm/px = slide µm/px x downsample; ZoomMIL adds "
                    "<slide_id>.level1.tif ... for the patches it zoomed into), extracting missing feature bags "
                    "with the run's encoder, µm/px and patch size (ZoomMIL reads only what it zooms into); for "
                    "segmentation runs PRED/maps/<slide_id>.tif.")
    p.add_argument("run", metavar="RUN", help="a run folder written by 'wsimil train'")
    p.add_argument("--cohort", required=True, metavar="CSV", help="a cohort CSV or a project folder")
    p.add_argument("--out", required=True, metavar="PRED", help="folder to write")
    p.add_argument("--weights", choices=("best", "last"), default="best",
                   help="best (by validation loss, default) or last checkpoint")
    add_device_argument(p)
    p.add_argument("--no-heatmaps", dest="heatmaps", action="store_false",
                   help="skip PRED/heatmaps/<slide_id>.tif (attention percentiles aligned with the slide)")
    p.add_argument("--heatmap-overlap", type=float, default=0.0, metavar="F",
                   help="draw heatmaps from a grid whose patches overlap by F (CLAM uses 0.5: smoother maps, "
                        "about 4x the patches to encode; default 0 reuses the feature bags)")
    p.add_argument("--ome-zarr", dest="ome_zarr", action="store_true",
                   help="also write every heatmap and probability map as OME-Zarr (NGFF 0.4) beside its TIFF: "
                        "PRED/heatmaps/<slide_id>.ome.zarr, PRED/maps/<slide_id>.ome.zarr")
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

    p = subparsers.add_parser("methods", help="list the training methods, their families and settings",
                              description="Every registered method (built in, or added by an installed "
                                          "plugin through the napari_wsimil.methods entry points) with its "
                                          "family, default µm/px and patch size, and its settings.")
    p.add_argument("--settings", action="store_true", help="also list each method's settings and defaults")
    p.set_defaults(func=cmd_methods)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _fmt(v: float | None, spec: str = ".3f") -> str:
    from ..infer.metrics import format_metric

    return format_metric(v, spec)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def parse_options(items: list[str], method: str) -> dict[str, Any]:
    """``--set name=value`` pairs typed by the method's config fields (bool, int, float, str, None)."""
    from dataclasses import fields

    from ..errors import WsimilError
    from ..train.registry import get

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
    from ..train.registry import family_of, make_config
    from ..train.run import RunSpec

    family = family_of(args.method)
    epochs = args.epochs if args.epochs is not None else make_config(args.method).epochs
    if args.encoder.startswith("imported:") and (args.mpp is None or args.patch is None):
        from ..train.cohort import imported_geometry

        found = imported_geometry(args.source, args.out, args.encoder)  # features made elsewhere: their geometry
        if found is not None:
            args.patch = args.patch if args.patch is not None else found[0]
            args.mpp = args.mpp if args.mpp is not None else found[1]
    spec = RunSpec(source=Path(args.source), method=args.method, out=Path(args.out), epochs=epochs,
                   encoder=args.encoder, weights=args.weights,
                   mpp=args.mpp if args.mpp is not None else family.default_mpp,
                   patch=args.patch if args.patch is not None else family.default_patch, seed=args.seed,
                   lr=args.lr, classes=[c.strip() for c in args.classes.split(",") if c.strip()]
                   if args.classes else None, val_fraction=args.val_fraction, device=args.device,
                   resume=args.resume, tile_classes=args.tile_classes,
                   tile_min_fraction=args.tile_min_fraction, exhaustive_labels=args.exhaustive_labels,
                   config=parse_options(args.options, args.method))
    prepared = family.prepare(spec, report=_say)
    run = spec.out

    epoch_line: dict[str, Any] = {}
    t0 = time.perf_counter()
    for ev in family.train(prepared):
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
    from ..train.family import PredictRequest
    from ..train.registry import run_family

    family, _info = run_family(args.run)
    options = {k: getattr(args, k) for k in ("heatmaps", "heatmap_overlap", "slide_score", "top_k", "masks",
                                             "ome_zarr")
               if hasattr(args, k)}
    family.predict(PredictRequest(Path(args.run), Path(args.cohort), Path(args.out), args.weights, args.device,
                                  options), report=_say)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from dataclasses import MISSING, fields

    from ..train.registry import methods

    for name, info in methods().items():
        fam = info.family
        what = " ".join(info.description.split()).split(": ")[0]  # the method and its paper
        _say(f"{name:12s} {fam.name:14s} {fam.default_mpp:g} µm/px, {fam.default_patch} px"
             f"{', an encoder' if fam.uses_encoder else ''}  {what}")
        if args.settings:
            for f in fields(info.config_cls):
                default = f.default if f.default is not MISSING else None
                _say(f"    {f.name} = {default!r}  {f.metadata.get('doc', '')}")
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


def _prediction_family(meta: dict[str, Any]) -> Any:
    """The family of the run a prediction folder came from (by the method prediction.json records), or
    None for a prediction without one (nothing then measures its maps)."""
    from ..train.engine import TrainingError
    from ..train.registry import family_of

    try:
        return family_of(str(meta["method"])) if meta.get("method") else None
    except TrainingError:
        return None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..errors import WsimilError
    from ..infer.metrics import slide_metrics
    from ..infer.predictions import read_predictions
    from ..io.atomic import write_text
    from ..train.cohort import class_names, label_indices, load_cohort

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
    family = _prediction_family(meta)
    measured = None
    if getattr(args, "localisation", True) and with_truth and family is not None:
        from ..infer.evaluation import TruthItem

        measured = family.evaluate(pred_dir, [TruthItem(s.slide_id, s.gt_mask, s.gt_downsample) for s in with_truth],
                                   meta, threshold=getattr(args, "threshold", None))
        if measured is not None:
            metrics[measured[0]] = measured[1]
    clean = _no_nan(metrics)
    write_text(pred_dir / "metrics.json", json.dumps(clean, indent=1))
    _say(f"{metrics['n_slides']} slides: AUC {_fmt(metrics['auc'])}  accuracy {_fmt(metrics['accuracy'])}  "
         f"balanced accuracy {_fmt(metrics['balanced_accuracy'])}  F1 {_fmt(metrics['f1'])}")
    if measured is not None and family is not None:
        family.report(measured[0], measured[1], _say)
    missing = len(ids) - len(rows)
    if missing:
        why = "no label in the cohort" if args.split is None else f"no label or are not in the {args.split} split"
        print(f"({missing} predicted slides have {why} and were left out)", file=sys.stderr)
    _say(f"metrics: {pred_dir / 'metrics.json'}")
    return 0


__all__ = ["cmd_evaluate", "cmd_methods", "cmd_predict", "cmd_train", "parse_options", "register"]
