"""ZoomMIL: train on multi-magnification bags, then predict reading only the patches it zooms into.

    python examples/05_zoommil.py [--workdir DIR]
"""

import csv

from _workdir import parse

from napari_wsimil.cli import main
from napari_wsimil.slide.synthetic import synthesize_cohort

args = parse(__doc__)
csv_path = synthesize_cohort(args.workdir / "cohort", 6, seed=5, size=2048)
run, pred = args.workdir / "run", args.workdir / "pred"
small = ["--patch", "32", "--set", "levels=4,2,1", "--set", "k=3", "--set", "hidden=32", "--set", "attn_hidden=16",
         "--set", "num_samples=20", "--device", "cpu"]
assert main(["train", str(csv_path), "--method", "zoommil", "--out", str(run), "--epochs", "2", *small]) == 0
assert main(["predict", str(run), "--cohort", str(csv_path), "--out", str(pred), "--device", "cpu"]) == 0
with open(pred / "predictions.csv", newline="") as fh:
    for row in csv.DictReader(fh):
        print(f"{row['slide_id']}: p(malignant) {float(row['prob_1']):.2f}, {row['patches_encoded']} patches "
              f"encoded in {float(row['seconds']):.2f} s")
