"""FedMix (three sites: painted pixels, tumour boxes, slide labels only) against centralised Hybrid
Supervision on the same slides. Issue 18's goal: FedMix's test Dice ≥ 0.9 × centralised Hybrid's.

By default the cohort is the real-tissue benchmark (``wsimil synth --textures``: regions filled with real
PatchCamelyon tissue, the split its tiles decided; see bench_quality_mil.py); ``--synthetic`` uses the
procedural generator (split stratified and seeded here: 30 % test, 15 % val per class).

* **Sites** (:func:`napari_wsimil.federated.fedmix_sites.make_sites`): training and validation slides dealt
  round-robin by class to three site CSVs. Site 0's malignant training slides are painted from the ground
  truth (1 tumour, 2 the rest), site 1's get a tumour box around each lesion, site 2 keeps slide labels.
* **FedMix**: ``run_local`` (every site in this process, the same protocol the Flower apps run), ``--rounds``
  rounds of ``--patches-per-round`` patches per site. The sites measure each round's global net A on their
  own validation slides and send counts; the server keeps the best round (pooled pixel Dice where a site has
  painted validation slides, ``--paint-val`` paints the pixel site's malignant ones; else the validation loss)
  and sets its operating threshold by the segmentation family's ``operating_rule`` on the sites' summed counts
  (:mod:`napari_wsimil.federated.fedmix_validation`): best pooled Dice on the painted validation pixels when
  there are some, else the summed benign-tissue histograms. Without ``--paint-val`` no FedMix site has painted
  validation pixels while Hybrid has one painted validation slide, so only ``--paint-val`` compares the two
  with the same rule (its Dice-loss maps are saturated: the benign rule sets 0.99 or more). Its last round is
  scored too.
* **Centralised Hybrid**: ``wsimil train --method hybrid`` on all the sites' slides together, with site 0's
  paint (Hybrid cannot use boxes: site 1's slides count as slide-labelled), the paper's checkpoint choice
  (pixel Dice on one painted malignant validation slide, as in bench_quality_seg; its stage-2 slide loss
  alone kept an empty early model on the synthetic cohort), then its operating threshold as usual. Its last
  epoch is scored too.

Both are scored by ``wsimil predict`` (test slides) → ``wsimil evaluate --split test``: Dice per malignant
test slide, averaged, at the run's threshold (FedMix's: set from the sites' numbers) and at 0.5. Same U-Net, patch, µm/px and seed. Training patches: Hybrid ``--epochs`` ×
``--patches-per-epoch``; FedMix rounds × sites × patches per round (each trains two nets).

``--val`` also predicts the validation slides with every run and prints their Dice: settings are chosen on
those numbers, never on the test slides. ``--tumour-share LO HI`` is ``wsimil synth --tumour-share`` (the
range of the malignant slides' tumour share of their tissue; with ``--textures ../shared/data/crc_val_he_7k
--tile-mpp 0.5 --tumour-share 0.05 0.3`` the colorectal cohorts that MIL learns, docs/benchmarks.md).

python benchmarks/bench_fedmix.py [--synthetic] [--slides 24] [--size 3072] [--rounds 12] [--epochs 12]
    [--mpp 2] [--patch 64] [--width 16] [--depth 3] [--patches-per-round 128] [--patches-per-epoch 256]
    [--batch-size 16] [--lam 10] [--beta 1.5] [--seed 1] [--threads 1] [--alone] [--val | --val-only] [--skip-fedmix]
    [--textures DIR --tile-mpp M [--tumour-share LO HI]] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PCAM, PCAM_MPP, add_texture_options, make_cohort, make_textured_cohort, table, wsimil  # noqa: E402


def _split(csv_path: Path, out: Path, seed: int) -> Path:
    """A stratified, seeded train / val / test split (kept when the cohort has one), absolute paths."""
    from napari_wsimil.federated.fedmix_sites import rows, write

    rs = rows(csv_path)
    if not all(r.get("split") in ("train", "val", "test") for r in rs):
        rng = np.random.default_rng(seed)
        for label in ("0", "1"):
            group = [r for r in rs if r["label"] == label]
            n_test, n_val = round(0.30 * len(group)), round(0.15 * len(group))
            for rank, i in enumerate(rng.permutation(len(group))):
                group[i]["split"] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return write(rs, out)


def _union(base: Path, sites: list[Path], out: Path) -> Path:
    """Every slide of the cohort (test rows too, for evaluation), with the pixel site's paint only, plus one
    painted malignant validation slide, as bench_quality_seg gives the mixed methods: it picks Hybrid's
    checkpoint by pixel Dice (by its stage-2 slide loss alone, Hybrid kept an early, empty model here)."""
    from napari_wsimil.federated.fedmix_sites import paint as paint_row
    from napari_wsimil.federated.fedmix_sites import rows, write

    paint = {}
    for s in sites:
        for r in rows(s):
            if r.get("pixel_labels"):
                paint[r["slide_id"]] = (r["pixel_labels"], r["pixel_labels_downsample"])
    rs = rows(base)
    for r in rs:
        r["pixel_labels"], r["pixel_labels_downsample"] = paint.get(r["slide_id"], ("", ""))
        r["annotations"] = ""
    val = sorted((r for r in rs if r["split"] == "val" and r["label"] == "1"), key=lambda r: r["slide_id"])
    if val:
        paint_row(val[0], out.parent / f"paint_val_{val[0]['slide_id']}.tif")
    return write(rs, out)


def _test_rows(base: Path, out: Path, split: str = "test") -> Path:
    from napari_wsimil.federated.fedmix_sites import rows, write

    return write([r for r in rows(base) if r["split"] == split], out)


def _score(run: Path, test_csv: Path, cohort_csv: Path, pred: Path, weights: str = "best",
           split: str = "test") -> dict:
    if not (pred / "prediction.json").is_file():  # a rerun with other runs added scores only what is new
        wsimil("predict", run, "--cohort", test_csv, "--out", pred, "--device", "cpu", "--weights", weights)
    if not (pred / "metrics.json").is_file():
        wsimil("evaluate", pred, "--cohort", cohort_csv, "--split", split)
    return json.loads((pred / "metrics.json").read_text()).get("segmentation") or {}


def _f(v: object) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.3f}"  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=24)
    ap.add_argument("--size", type=int, default=3072, help="slide side, level-0 px at 0.5 µm/px")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=12, help="centralised Hybrid's epochs")
    ap.add_argument("--mpp", type=float, default=2.0)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--patches-per-round", type=int, default=128)
    ap.add_argument("--patches-per-epoch", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lam", type=float, default=10.0)
    ap.add_argument("--beta", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tumour-contrast", type=float, default=1.0, help="--synthetic only")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--skip-hybrid", action="store_true", help="FedMix only (e.g. to try settings)")
    ap.add_argument("--skip-fedmix", action="store_true",
                    help="centralised Hybrid only (e.g. to check that it learns the cohort at all)")
    ap.add_argument("--val", action="store_true",
                    help="also predict the validation slides and print their Dice: the numbers to choose "
                         "settings on (never the test slides)")
    ap.add_argument("--val-only", action="store_true",
                    help="score the validation slides only (while choosing settings, the test slides stay unseen)")
    ap.add_argument("--tumour-share", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                    help="textured cohorts: range of the malignant slides' tumour share of their tissue "
                         "(wsimil synth --tumour-share; default: the generator's)")
    ap.add_argument("--alone", action="store_true", help="also the pixel site trained by itself")
    ap.add_argument("--paint-val", action="store_true",
                    help="paint the pixel site's malignant validation slides (FedMix then picks its round by "
                         "pooled pixel Dice; Hybrid gets the same painted slides)")
    ap.add_argument("--workdir", type=Path, default=None, help="keeps the cohort between runs")
    ap.add_argument("--verbose", action="store_true")
    add_texture_options(ap)
    args = ap.parse_args(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    from napari_wsimil.federated.fedmix import run_local
    from napari_wsimil.federated.fedmix_config import FedMixConfig
    from napari_wsimil.federated.fedmix_sites import make_sites

    work = args.workdir or Path(tempfile.gettempdir()) / "wsimil-bench" / "fedmix"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.synthetic:
        raw = make_cohort(work, args.slides, args.size, args.seed, args.tumour_contrast)
        look = "synthetic"
    else:
        tile_mpp = args.tile_mpp or (PCAM_MPP if args.textures.resolve() == PCAM.resolve() else None)
        share = tuple(args.tumour_share) if args.tumour_share else None
        raw = make_textured_cohort(work, args.slides, args.size, args.seed, args.textures, tile_mpp, share)
        look = f"real tissue ({args.textures.name})"
    tag = (f"{look.split()[0]}_{args.slides}x{args.size}_s{args.seed}_{args.mpp:g}mpp_{args.patch}_{args.width}x"
           f"{args.depth}")
    if not args.synthetic:
        tag = tag.replace("real_", f"{args.textures.name}_", 1)
        if args.tumour_share:
            tag += f"_t{args.tumour_share[0]:g}-{args.tumour_share[1]:g}"
    out = work / (f"fedmix_{tag}_r{args.rounds}x{args.patches_per_round}_l{args.lam:g}_b{args.beta:g}"
                  + ("_pv" if args.paint_val else ""))
    out.mkdir(parents=True, exist_ok=True)
    base = _split(raw, out / "cohort.csv", args.seed)
    test_csv = _test_rows(base, out / "test.csv")
    val_csv = _test_rows(base, out / "val.csv", "val")
    sites = make_sites(base, out / ("sites_paint_val" if args.paint_val else "sites"), paint_val=args.paint_val)
    union = _union(base, sites, out / "union.csv")
    with open(base, newline="") as fh:
        allrows = list(csv.DictReader(fh))
    counts = {sp: sum(r["split"] == sp for r in allrows) for sp in ("train", "val", "test")}
    print(f"cohort: {look}, {args.slides} slides of {args.size}² ({counts}); sites: "
          + ", ".join(f"{p.name}" for p in sites) + f" -> {out}", flush=True)

    results: dict[str, dict] = {}
    times: dict[str, float] = {}
    sink = io.StringIO()
    cfg = FedMixConfig(mpp=args.mpp, patch=args.patch, width=args.width, depth=args.depth,
                       batch_size=args.batch_size, patches_per_round=args.patches_per_round, lam=args.lam,
                       beta=args.beta, seed=args.seed, device="cpu", read_workers=2)
    run_fed = out / "run_fedmix"
    t = time.perf_counter()
    if args.skip_fedmix:
        res = None
    elif not (run_fed / "last.json").is_file() or json.loads((run_fed / "last.json").read_text())["round"] < args.rounds:
        res = run_local(sites, cfg, args.rounds, run_fed, resume=(run_fed / "last.json").is_file(),
                        report=lambda m: print(m, flush=True))
    else:
        res = {"history": json.loads((run_fed / "last.json").read_text())["history"]}
    val: dict[str, dict] = {}

    def score(name: str, run: Path, tag: str, weights: str = "best") -> None:
        """Test slides into ``results``; with --val, the validation slides into ``val`` (best weights only)."""
        with contextlib.redirect_stdout(sink) if not args.verbose else contextlib.nullcontext():
            if not args.val_only:
                results[name] = _score(run, test_csv, base, out / f"pred_{tag}", weights)
            if (args.val or args.val_only) and weights == "best":
                val[name] = _score(run, val_csv, base, out / f"pred_{tag}_val", weights, "val")

    fed_info: dict = {}
    if not args.skip_fedmix:
        times["fedmix train"] = time.perf_counter() - t
        t = time.perf_counter()
        score("FedMix (pixel + box + slide sites)", run_fed, "fedmix")
        score("FedMix, last round at 0.5", run_fed, "fedmix_last", "last")
        times["fedmix predict"] = time.perf_counter() - t
        fed_info = json.loads((run_fed / "run.json").read_text())
        point = fed_info.get("operating_point") or {}
        print(f"FedMix checkpoint: {fed_info.get('best')}; operating point: "
              + (", ".join(f"{k} {point.get(k)}" for k in ("threshold", "benign_fpr", "benign_pixels", "n_slides",
                                                            "sites")) if point else "none (masks at 0.5)"))
        for r in fed_info.get("rounds", []):
            v = r.get("validation") or {}
            print(f"  round {r['round']}: val loss {_f(v.get('val_loss'))}, pooled val pixel Dice "
                  f"{_f(v.get('val_pixel_dice'))}" + (f", threshold {v['threshold']:.3f}" if "threshold" in v else ""))
    if args.alone:  # the pixel site by itself: what the other two sites add
        run_a = out / "run_pixel_site_alone"
        t = time.perf_counter()
        if not (run_a / "last.json").is_file():
            run_local(sites[:1], cfg, args.rounds, run_a, evaluate=False)
        times["pixel site alone train"] = time.perf_counter() - t
        score("pixel site alone (FedMix, 1 site)", run_a, "alone")
    if not args.skip_hybrid:
        run_h = out / f"run_hybrid_e{args.epochs}x{args.patches_per_epoch}"
        sets = {"width": args.width, "depth": args.depth, "patches_per_epoch": args.patches_per_epoch,
                "batch_size": args.batch_size, "read_workers": 2}
        set_args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
        t = time.perf_counter()
        with contextlib.redirect_stdout(sink) if not args.verbose else contextlib.nullcontext():
            if not (run_h / "best.safetensors").is_file():
                wsimil("train", union, "--method", "hybrid", "--out", run_h, "--epochs", args.epochs, "--patch",
                       args.patch, "--mpp", args.mpp, "--seed", args.seed, "--device", "cpu", *set_args)
        times["hybrid train"] = time.perf_counter() - t
        t = time.perf_counter()
        score("centralised Hybrid (pixel site's paint)", run_h, run_h.name[4:])
        score("centralised Hybrid, last epoch", run_h, run_h.name[4:] + "_last", "last")
        times["hybrid predict"] = time.perf_counter() - t

    rows_ = []
    for name, m in results.items():
        rows_.append([name, _f(m.get("dice")), _f(m.get("dice_at_0.5", m.get("dice"))), _f(m.get("iou")),
                      _f(m.get("dice_pooled")), _f(m.get("benign_positive_fraction")), _f(m.get("threshold"))])
    print(table(rows_, ["method", "Dice", "Dice at 0.5", "IoU", "Dice pooled", "benign px", "threshold"]))
    if val:
        print("VALIDATION slides (choose settings on these):")
        print(table([[name, _f(m.get("dice")), _f(m.get("dice_at_0.5", m.get("dice"))), _f(m.get("iou")),
                      _f(m.get("benign_positive_fraction")), _f(m.get("threshold"))] for name, m in val.items()],
                    ["method", "val Dice", "val Dice at 0.5", "IoU", "benign px", "threshold"]))
    last = res["history"][-1]["sites"] if res else []
    if last:
        print("last round: " + "; ".join(f"{s['site']} ({s['supervision']}) kept {s['num_examples']}/"
                                         f"{int(s['offered'])} loss {s['loss']:.3f} weight {s['weight']:.2f}"
                                         for s in last))
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"; total {time.perf_counter() - t0:.0f} s")
    summary = {"results": results, "val": val, "times": times, "sites_last_round": last, "best": fed_info.get("best"),
               "operating_point": fed_info.get("operating_point"), "args": {
        k: str(v) for k, v in vars(args).items()}}
    if not args.skip_hybrid and not args.skip_fedmix and not args.val_only:
        fed = results["FedMix (pixel + box + slide sites)"].get("dice")
        fed05 = results["FedMix (pixel + box + slide sites)"].get("dice_at_0.5", fed)
        hyb = results["centralised Hybrid (pixel site's paint)"].get("dice")
        hyb05 = results["centralised Hybrid (pixel site's paint)"].get("dice_at_0.5", hyb)
        if fed is not None and hyb:
            ratio = float(fed) / float(hyb)
            summary["ratio"] = ratio
            if fed05 is not None and hyb05:
                summary["ratio_at_0.5"] = float(fed05) / float(hyb05)
            print(f"FedMix / centralised Hybrid Dice: {ratio:.2f} (goal ≥ 0.90: {'met' if ratio >= 0.9 else 'NOT met'})"
                  + (f"; both at 0.5: {summary['ratio_at_0.5']:.2f}" if "ratio_at_0.5" in summary else ""))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
