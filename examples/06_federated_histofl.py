"""Federated HistoFL on one workstation: three "hospitals" as separate Flower processes on loopback, with TLS and
site keys made on the fly; slides and labels never leave a site. Then predict with the global model as with any run.

    python examples/06_federated_histofl.py [--workdir DIR]
"""

import csv

from _workdir import parse

from napari_wsimil.cli import main
from napari_wsimil.slide.synthetic import synthesize_cohort

args = parse(__doc__)
cohort = synthesize_cohort(args.workdir / "cohort", 9, seed=3, size=1024, workers=1)
rows = list(csv.DictReader(cohort.open()))
sites_csv = cohort.parent / "sites.csv"
with sites_csv.open("w", newline="") as fh:  # a "site" column says which hospital holds each slide
    writer = csv.DictWriter(fh, fieldnames=[*rows[0], "site"])
    writer.writeheader()
    writer.writerows({**r, "site": f"hospital{i % 3}"} for i, r in enumerate(rows))

run, pred = args.workdir / "run", args.workdir / "pred"
small = ["--set", 'classes=["0","1"]', "--set", 'mil={"hidden": 16, "attn_hidden": 8}']  # the server holds no data
assert main(["federate", "simulate", str(sites_csv), "--rounds", "2", "--out", str(run), "--round-timeout", "120",
             *small]) == 0
assert main(["predict", str(run), "--cohort", str(cohort), "--out", str(pred), "--device", "cpu"]) == 0
with open(pred / "predictions.csv", newline="") as fh:
    for row in csv.DictReader(fh):
        print(f"{row['slide_id']}: p(malignant) {float(row['prob_1']):.2f} from the federated model")
