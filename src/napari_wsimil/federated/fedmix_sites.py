"""FedMix sites with mixed supervision cut from one cohort whose slides have ground truth (``gt_mask``): for
experiments, the benchmark and the tests, where the real thing would be hospitals with their own labels.

The slides (test rows left out) are dealt round-robin by class to the sites; the malignant training slides
of a ``pixel`` site get their ground truth painted (1 tumour, 2 everything else, as a pathologist's full
painting), those of a ``box`` site a tumour box around each lesion (QuPath GeoJSON), a ``slide`` site keeps
its slide labels only. Validation rows stay unlabelled below the slide level, unless ``paint_val`` paints
a pixel site's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..project.cohort_csv import read_rows as rows  # noqa: F401  (the site tools' names)
from ..project.cohort_csv import write_rows as write


def paint(row: dict, out: Path) -> None:
    """The slide's ground truth painted as a pathologist paints: 1 tumour, 2 the rest of the tissue, glass left
    unlabelled (0). Painting glass "normal" too made 95 % of a CRC slide's painted pixels normal, and a net
    trained on patches centred on painted pixels then hardly ever saw tumour."""
    import tifffile

    from ..slide import open_slide
    from ..slide.tissue import tissue_mask

    gt = tifffile.imread(row["gt_mask"])
    with open_slide(row["path"]) as sl:
        tissue = tissue_mask(sl).on_grid(gt.shape[:2], float(row["gt_downsample"]))
    tifffile.imwrite(out, np.where(gt > 0, 1, np.where(tissue, 2, 0)).astype(np.uint8))
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


def make_sites(csv_path: Path, out: Path, kinds: Sequence[str] = ("pixel", "box", "slide"), *,
               paint_val: bool = False) -> list[Path]:
    """One site CSV per entry of ``kinds`` (see the module doc), written to ``out/site<k>.csv``. ``paint_val``:
    a pixel site's malignant validation slides are painted too, so that the federation can choose its
    checkpoint by pooled pixel Dice (:mod:`.fedmix_validation`), as a centralised run with a painted
    validation slide does."""
    bad = set(kinds) - {"pixel", "box", "slide"}
    if bad:
        raise ValueError(f"site kinds are pixel, box or slide, not {sorted(bad)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_sites = len(kinds)
    all_rows = [r for r in rows(Path(csv_path)) if r.get("split") != "test"]
    sites: list[list[dict]] = [[] for _ in range(n_sites)]
    for split in ("train", "val"):  # dealt apart, so that every site gets training slides of each class
        for label in sorted({r["label"] for r in all_rows}):
            group = [r for r in all_rows if r["label"] == label and (r.get("split") or "train") == split]
            for i, r in enumerate(group):
                sites[i % n_sites].append(dict(r))
    paths = []
    for k, site in enumerate(sites):
        for r in site:
            r.update(pixel_labels="", pixel_labels_downsample="", annotations="")  # only what the kind gives
            if r["label"] == "1" and paint_val and kinds[k] == "pixel" and r.get("split") == "val":
                paint(r, out / f"paint_{r['slide_id']}.tif")
            elif r["label"] == "1" and (r.get("split") or "train") == "train":
                if kinds[k] == "pixel":
                    paint(r, out / f"paint_{r['slide_id']}.tif")
                elif kinds[k] == "box":
                    boxes(r, out / f"boxes_{r['slide_id']}.geojson")
        paths.append(write(site, out / f"site{k}.csv"))
    return paths


__all__ = ["boxes", "make_sites", "paint", "rows", "write"]
