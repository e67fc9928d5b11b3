"""Three FedMix sites cut from one synthetic cohort: one with a painted slide, one with tumour boxes drawn
from the ground truth, one with slide labels only (what the tests and the benchmark need)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as fh:
        out = list(csv.DictReader(fh))
    for r in out:
        for k in ("path", "gt_mask"):
            if r.get(k):
                r[k] = str((csv_path.parent / r[k]).resolve())
    return out


def write(rows_: list[dict], path: Path) -> Path:
    cols = list(dict.fromkeys(k for r in rows_ for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        w.writerows(rows_)
    return path


def paint(row: dict, out: Path) -> None:
    """The slide's ground truth painted: 1 tumour, 2 everything else."""
    import tifffile

    gt = tifffile.imread(row["gt_mask"])
    tifffile.imwrite(out, np.where(gt > 0, 1, 2).astype(np.uint8))
    row["pixel_labels"], row["pixel_labels_downsample"] = str(out), row["gt_downsample"]


def boxes(row: dict, out: Path) -> int:
    """A tumour box around each lesion of the ground truth (QuPath GeoJSON); the number of boxes."""
    import shapely
    import tifffile
    from scipy import ndimage

    from napari_wsimil.project.annotations import Annotation, write_geojson

    gt = tifffile.imread(row["gt_mask"]) > 0
    d = float(row["gt_downsample"])
    lab, _ = ndimage.label(gt)
    anns = [Annotation(shapely.box(sx.start * d, sy.start * d, sx.stop * d, sy.stop * d), "tumour", kind="box")
            for sy, sx in ndimage.find_objects(lab)]
    write_geojson(out, anns, {"tumour": "#ff0000"})
    row["annotations"] = str(out)
    return len(anns)


def make_sites(csv_path: Path, out: Path, n_sites: int = 3) -> list[Path]:
    """Slides dealt round-robin by class to ``n_sites`` site CSVs (test rows left out); site 0 gets its
    malignant training slides painted, site 1 boxed, site 2 nothing."""
    out.mkdir(parents=True, exist_ok=True)
    all_rows = [r for r in rows(csv_path) if r.get("split") != "test"]
    sites: list[list[dict]] = [[] for _ in range(n_sites)]
    for label in sorted({r["label"] for r in all_rows}):
        group = [r for r in all_rows if r["label"] == label]
        for i, r in enumerate(group):
            sites[i % n_sites].append(dict(r))
    paths = []
    for k, site in enumerate(sites):
        for r in site:
            r.setdefault("pixel_labels", "")
            r.setdefault("pixel_labels_downsample", "")
            r.setdefault("annotations", "")
            if r["label"] == "1" and r.get("split", "train") != "val":
                if k == 0:
                    paint(r, out / f"paint_{r['slide_id']}.tif")
                elif k == 1:
                    boxes(r, out / f"boxes_{r['slide_id']}.geojson")
        paths.append(write(site, out / f"site{k}.csv"))
    return paths
