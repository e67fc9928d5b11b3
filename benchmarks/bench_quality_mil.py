"""Quality of the attention-MIL methods on a cohort with ground truth, through the real CLI.

By default the cohort is the **real-tissue benchmark**: ``wsimil synth --textures`` fills the generator's tissue
and tumour regions with real PatchCamelyon lymph-node patches (normal / tumour; ../shared/data/pcam), training
and validation slides from PCam's train split, test slides from its valid split (other CAMELYON slides).
``--synthetic`` uses the procedural generator instead (a unit-test look whose tumour a colour statistic finds).

Textured cohorts keep the split their tiles decided; procedural ones are split, stratified and seeded, into
train / val / test (55 / 15 / 30 %). Then, with the same features and seed:

* CLAM-SB from slide labels only;
* MS-CLAM with pixel labels on 10 % of the malignant slides (all in train): the ground truth of those
  slides painted as "tumour" (1) and "normal" (2), i.e. what a pathologist's full annotation gives;
* ABMIL as the attention-MIL baseline.

Each is ``wsimil train`` → ``wsimil predict`` → ``wsimil evaluate --split S``; the table shows slide AUC and
accuracy, patch-level attention AUC against the ground truth (mean over malignant slides, and pooled over
percentile scores), the CAMELYON16 FROC and the wall time. Settings are chosen with ``--split val`` and
reported with ``--split test`` (the default). Targets (issue #15, real tissue): CLAM-SB slide AUC ≥ 0.95 and
attention AUC ≥ 0.90; MS-CLAM attention AUC ≥ 0.95.

python benchmarks/bench_quality_mil.py [--quick] [--slides 60] [--size 6144] [--epochs 200] [--workdir DIR]
    [--textures DIR --tile-mpp M | --synthetic [--tumour-contrast 1.0] [--mucinous-share 0] [--aggregate-share 0]]
    [--encoder handcrafted] [--set OPTION=VALUE ...] [--split val|test] [--seed 1] [--cohort-seed S]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (PCAM, PCAM_MPP, add_texture_options, make_cohort, make_textured_cohort,  # noqa: E402
                     split_cohort, table, wsimil)

METHODS = ("clam-sb", "ms-clam", "abmil")


def run_method(method: str, cohort_csv: Path, work: Path, *, epochs: int, patch: int, mpp: float, seed: int,
               encoder: str = "handcrafted", options: list[str] = (), split: str = "test",
               quiet: bool = True) -> dict:
    """train → predict → evaluate on one split; the metrics.json contents."""
    import contextlib
    import io

    tag = method if encoder == "handcrafted" else f"{method}_{encoder.replace(':', '-')}"
    run, pred = work / f"run_{tag}", work / f"pred_{tag}"
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        if not (run / "best.safetensors").is_file():
            extra: list[object] = [a for o in options for a in ("--set", o)]
            wsimil("train", cohort_csv, "--method", method, "--out", run, "--epochs", epochs, "--patch", patch,
                   "--mpp", mpp, "--seed", seed, "--device", "cpu", "--encoder", encoder, *extra)
        wsimil("predict", run, "--cohort", cohort_csv, "--out", pred, "--device", "cpu")
        if split == "test":  # validation figures too, kept apart: what settings were chosen on
            wsimil("evaluate", pred, "--cohort", cohort_csv, "--split", "val")
            (pred / "metrics_val.json").write_text((pred / "metrics.json").read_text())
        wsimil("evaluate", pred, "--cohort", cohort_csv, "--split", split)
    return json.loads((pred / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="12 slides of 2048², 20 epochs (a few minutes)")
    ap.add_argument("--slides", type=int, default=60)
    ap.add_argument("--size", type=int, default=6144)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--annotated", type=float, default=0.10, help="share of malignant slides with pixel labels")
    add_texture_options(ap)
    ap.add_argument("--tumour-contrast", type=float, default=1.0,
                    help="--synthetic: tumour's contrast to normal tissue, 0-1 (1: the original, easy look)")
    ap.add_argument("--mucinous-share", type=float, default=0.0,
                    help="--synthetic: share of each tumour drawn in the mucinous pattern, 0-1")
    ap.add_argument("--aggregate-share", type=float, default=0.0,
                    help="--synthetic: share of every slide's tissue covered by lymphoid aggregates, 0-0.5")
    ap.add_argument("--cohort-seed", type=int, default=None,
                    help="seed of the cohort (default: --seed); --seed alone then varies split and training")
    ap.add_argument("--encoder", default="handcrafted", help="feature encoder of every method")
    ap.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", dest="options",
                    help="a method setting for every method (repeatable), e.g. --set standardise=false")
    ap.add_argument("--split", choices=("val", "test"), default="test",
                    help="where to measure: val to choose settings, test to report them")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--workdir", type=Path, default=None, help="keeps cohort and features between runs")
    ap.add_argument("--verbose", action="store_true", help="show the CLI's output")
    args = ap.parse_args(argv)
    if args.quick:
        args.slides, args.size, args.epochs, args.patch, args.mpp = 12, 2048, 20, 128, 1.0
    base = args.workdir or Path(tempfile.gettempdir()) / "wsimil-bench" / "quality"
    base.mkdir(parents=True, exist_ok=True)
    cohort_seed = args.seed if args.cohort_seed is None else args.cohort_seed
    if args.synthetic:
        cohort_csv = make_cohort(base, args.slides, args.size, cohort_seed, args.tumour_contrast,
                                 args.mucinous_share, args.aggregate_share)
        look = (f"procedural look: tumour contrast {args.tumour_contrast:g}, mucinous share {args.mucinous_share:g}, "
                f"lymphoid aggregates {args.aggregate_share:g}")
    else:
        tile_mpp = args.tile_mpp or (PCAM_MPP if args.textures.resolve() == PCAM.resolve() else None)
        cohort_csv = make_textured_cohort(base, args.slides, args.size, cohort_seed, args.textures, tile_mpp)
        look = f"real tissue from {args.textures}"
    work = Path(tempfile.mkdtemp(prefix="quality-", dir=base))
    split_csv = work / "cohort_split.csv"
    counts = split_cohort(cohort_csv, split_csv, args.seed, args.annotated)
    print(f"cohort: {args.slides} slides of {args.size}² ({counts['malignant']} malignant), {look}; "
          f"train {counts['train']} / val {counts['val']} / test {counts['test']}; pixel labels on "
          f"{counts['annotated']} malignant training slides; patches {args.patch} px at {args.mpp} µm/px; "
          f"{args.epochs} epochs; encoder {args.encoder}; settings {args.options or 'defaults'}; "
          f"measured on {args.split}", flush=True)
    results: dict[str, dict] = {}
    rows = []
    for method in args.methods:
        t = time.perf_counter()
        m = run_method(method, split_csv, work, epochs=args.epochs, patch=args.patch, mpp=args.mpp,
                       seed=args.seed, encoder=args.encoder, options=args.options, split=args.split,
                       quiet=not args.verbose)
        results[method] = m
        loc = m.get("localisation") or {}
        rows.append([method, m["auc"], m["accuracy"], _num(loc.get("attention_auc")),
                     _num(loc.get("attention_auc_pooled")), _num(loc.get("froc")),
                     f"{time.perf_counter() - t:.0f} s"])
    print(table(rows, ["method", "slide AUC", "accuracy", "attention AUC", "pooled", "FROC", "time"]))
    if "clam-sb" in results and "ms-clam" in results:
        a = (results["clam-sb"].get("localisation") or {}).get("attention_auc")
        b = (results["ms-clam"].get("localisation") or {}).get("attention_auc")
        if a is not None and b is not None:
            print(f"MS-CLAM / CLAM-SB attention AUC: {b / a:.3f}" if a > 0 else
                  f"MS-CLAM attention AUC {b:.3f} against CLAM-SB's {a:.3f}")
    (work / "quality.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                   "counts": counts, "results": results}, indent=1))
    print(f"(details: {work / 'quality.json'})")
    return results


def _num(v: object) -> object:
    return "n/a" if v is None else float(v)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
