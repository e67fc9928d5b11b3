"""Quality of the pixel-segmentation methods on a cohort with ground truth, through the real CLI.

By default the cohort is the real-tissue benchmark (``wsimil synth --textures``: the generator's regions filled
with real PatchCamelyon patches, training and validation slides from PCam's train split, test slides from its
valid split; see bench_quality_mil.py); ``--synthetic`` uses the procedural generator. A procedural cohort of N
slides (half malignant) is split, stratified and seeded, into train / val / test (55 / 15 / 30 %); a textured
one keeps the split its tiles decided. Then, with the same U-Net, patches and seed:

* Pinchaud from slide labels only (β1 = 1, α = 2: the paper's defaults; the painted slides' paint is
  ignored: no pixel cross-entropy, checkpoint by its own validation loss);
* Hybrid Supervision and ConfKD with pixel labels on 10 % of the malignant slides (in train) and on
  ``--val-painted`` malignant validation slides (1: together 4 of 60 slides, under the issue's 10 % of
  slides): the ground truth of those slides painted as "tumour" (1) on tumour and "normal" (2) on the rest
  of the tissue, i.e. what a pathologist's full annotation gives. The painted validation slide picks their
  checkpoint (pixel Dice, ``checkpoint_by=auto``);
* Pinchaud with the same paint ("pinchaud+paint": its optional pixel cross-entropy, checkpoint as above);
* the paper's ablations (``--ablation``, on by default): Pinchaud with β1 = 0 (plain KL on malignant slides
  instead of the noise-robust generalised KL) and with α = 0 (patches uniform over tissue instead of ∝ Q²).

Each is ``wsimil train`` → ``wsimil predict`` (test slides only) → ``wsimil evaluate --split test``; the table
shows pixel Dice and IoU (per malignant test slide, averaged) at the run's operating threshold (set after
training on the benign validation slides: :mod:`napari_wsimil.seg.operating_point`) and Dice at p ≥ 0.5,
pooled Dice, the CAMELYON16 FROC on
local maxima of the map, the slide AUC (slide score: maximum pixel probability) and the share of benign test
slides' pixels called tumour. Targets (issue): weak-only Pinchaud Dice ≥ 0.6; Hybrid or ConfKD with 10 % pixel
labels Dice ≥ 0.75 and above Pinchaud.

python benchmarks/bench_quality_seg.py [--quick] [--slides 60] [--size 4096] [--epochs 40] [--mpp 1]
    [--patch 128] [--width 32] [--depth 4] [--methods pinchaud hybrid confkd pinchaud+paint] [--no-ablation]
    [--val-painted 1] [--eta 50] [--sync-maps] [--set KEY=VALUE ...] [--val] [--seed 1] [--threads N]
    [--textures DIR --tile-mpp M | --synthetic [--tumour-contrast C]] [--workdir DIR]

``--val`` also predicts the validation slides and prints their Dice after each run: settings are chosen on
those numbers, and the test split is looked at only for the final report. ``--set`` passes a setting to every
Pinchaud run (e.g. ``--set context=-1``; with ``--depth 2`` at ``--mpp 4``, the 60-slide runs of
docs/benchmarks.md).

The defaults are the issue's full run (60 slides, the paper's net): many hours on a CPU. --quick is a smoke
run (12 slides of 2048², 4 epochs of a small net at 2 µm/px, no ablation; about a minute) whose numbers say
nothing about quality.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (PCAM, PCAM_MPP, add_texture_options, make_cohort, make_textured_cohort,  # noqa: E402
                     split_cohort, table, wsimil)

METHODS = ("pinchaud", "hybrid", "confkd", "pinchaud+paint")
# Slide labels only: no cross-entropy on the painted slides and no checkpoint choice by painted pixels.
WEAK = {"w_pixel": 0, "checkpoint_by": "loss"}
# name shown -> (method, --set options on top of the common ones)
RUNS = {"pinchaud": ("pinchaud", WEAK), "hybrid": ("hybrid", {}), "confkd": ("confkd", {}),
        "pinchaud+paint": ("pinchaud", {})}
ABLATIONS = (("pinchaud β1=0", "pinchaud", {**WEAK, "beta1": 0}), ("pinchaud α=0", "pinchaud", {**WEAK, "alpha": 0}))


def _tissue_on_grid(slide_path: Path, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """The slide's tissue mask at the centres of a grid of ``shape``, ``downsample`` level-0 px per px."""
    from napari_wsimil.slide import open_slide
    from napari_wsimil.slide.tissue import tissue_mask

    with open_slide(slide_path) as sl:
        return tissue_mask(sl).on_grid(shape, downsample)


def split_cohort_seg(csv_path: Path, out_csv: Path, test_csv: Path, seed: int, annotated_fraction: float,
                     val_annotated: int = 0) -> dict[str, int]:
    """The shared split; painted slides get tumour 1, other tissue 2 and glass 0 (what a pathologist paints)."""

    def paint(row: dict, truth: np.ndarray) -> np.ndarray:
        tissue = _tissue_on_grid(Path(row["path"]), truth.shape, float(row["gt_downsample"]))
        return np.where(truth, 1, np.where(tissue, 2, 0)).astype(np.uint8)

    return split_cohort(csv_path, out_csv, seed, annotated_fraction, paint=paint, test_csv=test_csv,
                        val_annotated=val_annotated)


def run_one(name: str, method: str, options: dict[str, object], cohort_csv: Path, test_csv: Path, work: Path,
            args: argparse.Namespace) -> tuple[dict, dict[str, float]]:
    """train → predict (test slides) → evaluate --split test; metrics.json and the seconds of each stage."""
    tag = name.replace(" ", "_").replace("β", "beta").replace("α", "alpha").replace("=", "").replace("+", "_")
    run, pred, pred_val = work / f"run_{tag}", work / f"pred_{tag}", work / f"pred_{tag}_val"
    sets = {"width": args.width, "depth": args.depth, "patches_per_epoch": args.patches_per_epoch,
            "batch_size": args.batch_size, **options}
    if method == "pinchaud" and args.eta != 50.0:
        sets["eta"] = args.eta
    if method == "pinchaud" and args.sync_maps:
        sets["sync_maps"] = "true"
    if method == "pinchaud" and args.threads > 0:  # the mapper too: a run's numbers depend on its thread counts
        sets["map_threads"] = args.threads
    if method == "pinchaud":
        sets.update(dict(kv.split("=", 1) for kv in args.pinchaud_set))
    set_args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    times = {}
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if not args.verbose else contextlib.nullcontext():
        t = time.perf_counter()
        if not (run / "best.safetensors").is_file():
            wsimil("train", cohort_csv, "--method", method, "--out", run, "--epochs", args.epochs, "--patch",
                   args.patch, "--mpp", args.mpp, "--seed", args.seed, "--device", "cpu", *set_args)
        times["train"] = time.perf_counter() - t
        t = time.perf_counter()
        wsimil("predict", run, "--cohort", test_csv, "--out", pred, "--device", "cpu")
        times["predict"] = time.perf_counter() - t
        t = time.perf_counter()
        wsimil("evaluate", pred, "--cohort", cohort_csv, "--split", "test")
        times["evaluate"] = time.perf_counter() - t
        val_csv = test_csv.with_name("cohort_val.csv")
        if args.val and val_csv.is_file():  # the development numbers: choices are made on these, never on test
            wsimil("predict", run, "--cohort", val_csv, "--out", pred_val, "--device", "cpu")
            wsimil("evaluate", pred_val, "--cohort", cohort_csv, "--split", "val")
    metrics = json.loads((pred / "metrics.json").read_text())
    if args.val and (pred_val / "metrics.json").is_file():
        metrics["val"] = json.loads((pred_val / "metrics.json").read_text())
    return metrics, times


def _rows_of_split(split_csv: Path, split: str, out: Path) -> None:
    import csv

    with open(split_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split]
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _num(v: object) -> object:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return float(v)  # type: ignore[arg-type]


def _dice(m: dict | None) -> float | None:
    d = ((m or {}).get("segmentation") or {}).get("dice")
    return None if d is None or (isinstance(d, float) and math.isnan(d)) else float(d)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 12 slides of 2048², 4 epochs, 16x3 U-Net, 64 px at 2 µm/px, no ablation")
    ap.add_argument("--slides", type=int, default=60)
    ap.add_argument("--size", type=int, default=4096, help="slide side, level-0 px at 0.5 µm/px")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--mpp", type=float, default=1.0)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--patches-per-epoch", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cohort-seed", type=int, default=None, help="synthetic cohort's seed (default: --seed)")
    ap.add_argument("--annotated", type=float, default=0.10, help="malignant slides' share with pixel labels")
    ap.add_argument("--val-painted", type=int, default=1,
                    help="malignant validation slides with pixel labels (they choose the mixed methods' checkpoint)")
    ap.add_argument("--tumour-contrast", type=float, default=1.0,
                    help="synthetic tumour's contrast to normal tissue, 0-1 (1: the original, easy look)")
    add_texture_options(ap)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=None,
                    help="also Pinchaud with β1 = 0 and with α = 0 (default: on, off with --quick)")
    ap.add_argument("--eta", type=float, default=50.0,
                    help="Pinchaud's η for every Pinchaud run (percent of a patch's pixels in the malignant "
                         "logit; default 50, the paper's)")
    ap.add_argument("--sync-maps", action="store_true",
                    help="Pinchaud waits for every slide's map before each epoch: reproducible from the seed "
                         "(the concurrent mapper's timing otherwise changes the result), slower")
    ap.add_argument("--set", dest="pinchaud_set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting for every Pinchaud run (repeatable), e.g. --set context=-1")
    ap.add_argument("--val", action="store_true",
                    help="also predict the validation slides and report their Dice: the numbers to choose "
                         "settings by (the test split stays untouched)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--workdir", type=Path, default=None, help="keeps the cohort between runs")
    ap.add_argument("--verbose", action="store_true", help="show the CLI's output")
    args = ap.parse_args(argv)
    if any("=" not in kv for kv in args.pinchaud_set):
        ap.error("--set takes KEY=VALUE, e.g. --set context=-1")
    if args.quick:
        args.slides, args.size, args.epochs, args.mpp, args.patch = 12, 2048, 4, 2.0, 64
        args.width, args.depth, args.patches_per_epoch = 16, 3, 256
        if args.ablation is None:
            args.ablation = False
    if args.ablation is None:
        args.ablation = True
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    base = args.workdir or Path(tempfile.gettempdir()) / "wsimil-bench" / "quality-seg"
    base.mkdir(parents=True, exist_ok=True)
    cohort_seed = args.seed if args.cohort_seed is None else args.cohort_seed
    if args.synthetic:
        cohort_csv = make_cohort(base, args.slides, args.size, cohort_seed, args.tumour_contrast)
    else:
        tile_mpp = args.tile_mpp or (PCAM_MPP if args.textures.resolve() == PCAM.resolve() else None)
        cohort_csv = make_textured_cohort(base, args.slides, args.size, cohort_seed, args.textures, tile_mpp)
    work = Path(tempfile.mkdtemp(prefix="seg-quality-", dir=base))
    split_csv, test_csv = work / "cohort_split.csv", work / "cohort_test.csv"
    counts = split_cohort_seg(cohort_csv, split_csv, test_csv, args.seed, args.annotated, args.val_painted)
    if args.val:
        _rows_of_split(split_csv, "val", test_csv.with_name("cohort_val.csv"))
    print(f"cohort: {args.slides} slides of {args.size}² ({counts['malignant']} malignant); train "
          f"{counts['train']} / val {counts['val']} / test {counts['test']} ({counts['malignant_test']} "
          f"malignant); pixel labels on {counts['annotated']} malignant training and {counts['annotated_val']} "
          f"validation slides; U-Net "
          f"{args.width}x{args.depth}, {args.patch} px at {args.mpp:g} µm/px, {args.epochs} epochs of "
          f"{args.patches_per_epoch} patches; Pinchaud η {args.eta:g} %{'' if not args.sync_maps else ', maps synchronous'}; tumour contrast {args.tumour_contrast:g}; torch "
          f"{torch.get_num_threads()} threads", flush=True)
    runs = [(m, *RUNS[m]) for m in args.methods]
    if args.ablation:
        runs += list(ABLATIONS)
    results: dict[str, dict] = {}
    rows = []
    for name, method, options in runs:
        t = time.perf_counter()
        m, times = run_one(name, method, options, split_csv, test_csv, work, args)
        results[name] = {"metrics": m, "seconds": times}
        seg = m.get("segmentation") or {}
        rows.append([name, _num(seg.get("threshold")), _num(seg.get("dice")), _num(seg.get("dice_at_0.5",
                                                                                      seg.get("dice"))),
                     _num(seg.get("iou")), _num(seg.get("dice_pooled")),
                     _num(seg.get("precision_pooled")), _num(seg.get("recall_pooled")),
                     _num(seg.get("froc")), _num(m.get("auc")), _num(seg.get("benign_positive_fraction")),
                     f"{times['train']:.0f} + {times['predict']:.0f} s"])
        val = (m.get("val") or {}).get("segmentation") or {}
        dev = (f"; validation Dice {_fmt(_dice(m['val']))} (precision {_fmt(val.get('precision_pooled'))}, recall "
               f"{_fmt(val.get('recall_pooled'))}; at 0.5: {_fmt(val.get('dice_at_0.5', _dice(m['val'])))})"
               ) if "val" in m else ""
        print(f"  {name}: {time.perf_counter() - t:.0f} s{dev}", flush=True)
    print("\ntest split: Dice / IoU per malignant slide at p ≥ the run's operating threshold ('threshold': the "
          "lowest, never below 0.5, that calls at most 0.1 % of the benign validation slides' tissue tumour), "
          "averaged; 'Dice @0.5' at p ≥ 0.5; slide AUC from the maximum pixel probability; precision / recall pooled "
          "over malignant slides' pixels; 'benign px' = share of benign slides' pixels called tumour")
    print(table(rows, ["method", "threshold", "Dice", "Dice @0.5", "IoU", "Dice pooled", "precision", "recall",
                       "FROC", "slide AUC",
                       "benign px",
                       "train + predict"]))

    dice = {name: _dice(r["metrics"]) for name, r in results.items()}
    print("\ntargets (issue):")
    if "pinchaud" in dice:
        d = dice["pinchaud"]
        ok = d is not None and d >= 0.6
        print(f"  weak-only Pinchaud Dice ≥ 0.60: {_fmt(d)} -> {'met' if ok else 'NOT met'}")
    mixed = {k: dice[k] for k in ("hybrid", "confkd") if k in dice}
    if mixed:
        best = max(mixed, key=lambda k: -1.0 if mixed[k] is None else mixed[k])
        d, p = mixed[best], dice.get("pinchaud")
        ok = d is not None and d >= 0.75 and (p is None or d > p)
        print(f"  Hybrid or ConfKD ({counts['annotated']} + {counts['annotated_val']} painted slides) Dice ≥ 0.75 "
              "and above weak-only Pinchaud: "
              f"best {best} {_fmt(d)} (Pinchaud {_fmt(p)}) -> {'met' if ok else 'NOT met'}")
    if args.ablation and "pinchaud" in dice:
        print("ablation (Pinchaud, Dice): "
              f"β1 = 1 {_fmt(dice['pinchaud'])} vs β1 = 0 {_fmt(dice.get('pinchaud β1=0'))}; "
              f"α = 2 {_fmt(dice['pinchaud'])} vs α = 0 {_fmt(dice.get('pinchaud α=0'))}")
    (work / "quality.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                   "counts": counts, "results": results}, indent=1))
    print(f"(details: {work / 'quality.json'})")
    return results


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
