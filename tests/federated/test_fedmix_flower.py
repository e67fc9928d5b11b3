"""FedMix over Flower's real processes: a site with painted pixels, one with tumour boxes and one with slide
labels only, each its own SuperNode (``wsimil federate simulate`` on loopback, free port), one round and the
final evaluation; then ``wsimil predict`` reads the run folder like any segmentation run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from napari_wsimil.cli import main
from napari_wsimil.federated.fedmix_sites import make_sites, rows, write

pytestmark = pytest.mark.slow
TINY = {"mpp": 4.0, "patch": 32, "width": 8, "depth": 2, "batch_size": 8, "patches_per_round": 16,
        "val_patches": 4, "read_workers": 1, "device": "cpu", "seed": 3}


def test_fedmix_with_pixel_box_and_slide_sites_over_flower_then_predict(fed_cohort: Path, tmp_path: Path) -> None:
    sites = make_sites(fed_cohort, tmp_path / "sites")
    names = {"pixel": sites[0], "box": sites[1], "slide": sites[2]}
    cohort = write([{**r, "site": name} for name, path in names.items() for r in rows(path)],
                   tmp_path / "cohort.csv")
    run = tmp_path / "run"
    settings = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    assert main(["federate", "simulate", str(cohort), "--method", "fedmix", "--rounds", "1", "--out", str(run),
                 "--round-timeout", "120", "--insecure", *settings]) == 0

    info = json.loads((run / "run.json").read_text())
    (row,) = info["rounds"]
    assert set(row["sites"]) == {"pixel", "box", "slide"} and not row["rejected"], row
    assert sum(s["weight"] for s in row["sites"].values()) == pytest.approx(1.0)
    # each SuperNode read its own drawings: the supervision it reports, and only a pixel site keeps every patch
    assert {name: s["supervision_code"] for name, s in row["sites"].items()} == {"pixel": 0, "box": 1, "slide": 2}
    pixel = row["sites"]["pixel"]
    assert pixel["num_examples"] == pixel["offered"] == TINY["patches_per_round"]
    assert set(row["final_evaluation"]) == {"pixel", "box", "slide"}
    messages = [json.loads(line) for line in (run / "messages.jsonl").read_text().splitlines()]
    assert len(messages) == 6 and all(m["error"] is None for m in messages)  # 3 train + 3 evaluate replies
    tensors = load_file(str(run / json.loads((run / "last.json").read_text())["tensors"]))
    net_a = {k[len("model."):] for k in tensors if k.startswith("model.")}
    for m in messages:
        assert set(m["records"]) <= {"arrays", "metrics", "site"}
        if m["kind"] == "train":  # both nets, as a.<tensor> and b.<tensor>; nothing else but numbers
            assert {k[2:] for k in m["records"]["arrays"]["keys"] if k.startswith("a.")} == net_a

    pred = tmp_path / "pred"
    test_rows = rows(fed_cohort)[:2]
    assert main(["predict", str(run), "--cohort", str(write(test_rows, tmp_path / "few.csv")), "--out", str(pred),
                 "--device", "cpu"]) == 0
    assert len(list((pred / "maps").glob("*.tif"))) == len(test_rows)
    assert json.loads((pred / "prediction.json").read_text())["method"] == "fedmix"
