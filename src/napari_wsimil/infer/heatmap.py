"""Attention heatmaps aligned with the slide (the recipe of CLAM's ``create_heatmaps``).

Scores become percentiles against the slide's own scores, each patch paints its square on a
low-resolution canvas (sum and count, so overlapping patches average per pixel), pixels no patch
covers stay 0, optionally blurred and clipped to the tissue mask. The result is written as a
pyramidal grey OME-TIFF whose µm/px is the slide's times the downsample, so it overlays the slide.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..slide.heatmap_file import HEATMAP_KIND

COLORMAP = "inferno"


def percentile_scores(scores: np.ndarray) -> np.ndarray:
    """``scipy.stats.percentileofscore(scores, s, kind='rank') / 100`` for every s, vectorised."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        return s.astype(np.float32)
    # percentileofscore 'rank' = (left + right + (right > left)) * 50 / n, i.e. the average rank / n
    return (rankdata(s, method="average") / s.size).astype(np.float32)


def default_downsample(size_level0: float, slide_shape_hw: tuple[int, int], *, min_patch_px: int = 4,
                       max_side: int = 4096) -> float:
    """Coarsest downsample at which a patch still spans ``min_patch_px`` heatmap px, then coarsened
    until the long side is at most ``max_side``."""
    ds = max(1.0, float(size_level0) / min_patch_px)
    long_side = max(slide_shape_hw)
    return max(ds, long_side / max_side)


def attention_heatmap(coords: np.ndarray, scores: np.ndarray, size_level0: float,
                      slide_shape_hw: tuple[int, int], downsample: float | None = None, *,
                      percentile: bool = True, blur_sigma_px: float = 0.0, tissue: Any = None) -> np.ndarray:
    """A float32 (ceil(H/ds), ceil(W/ds)) heatmap in [0, 1]; ``coords`` are level-0 (x, y) corners.

    ``tissue`` is a :class:`~napari_wsimil.slide.tissue.TissueMask` (or a boolean array over the
    slide with the same aspect); pixels outside it are set to 0.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if len(coords) != len(scores):
        raise ValueError(f"{len(coords)} coords but {len(scores)} scores")
    if downsample is None:
        downsample = default_downsample(size_level0, slide_shape_hw)
    ds = float(downsample)
    if not ds > 0:
        raise ValueError(f"downsample must be positive, got {downsample}")
    h0, w0 = int(slide_shape_hw[0]), int(slide_shape_hw[1])
    H, W = max(1, int(np.ceil(h0 / ds))), max(1, int(np.ceil(w0 / ds)))
    if percentile:
        vals = percentile_scores(scores).astype(np.float64)
    else:
        vals = np.nan_to_num(scores, nan=0.0)
    total = np.zeros((H, W), np.float64)
    count = np.zeros((H, W), np.float64)
    for (x, y), v in zip(coords, vals):
        c0, r0 = int(round(x / ds)), int(round(y / ds))
        c1, r1 = int(round((x + size_level0) / ds)), int(round((y + size_level0) / ds))
        c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(max(c1, c0 + 1), W), min(max(r1, r0 + 1), H)
        if c1 <= c0 or r1 <= r0:
            continue
        total[r0:r1, c0:c1] += v
        count[r0:r1, c0:c1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        heat = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    heat = np.nan_to_num(heat, nan=0.0)
    if blur_sigma_px > 0:
        from scipy.ndimage import gaussian_filter

        heat = gaussian_filter(heat, blur_sigma_px)
    if tissue is not None:
        heat = heat * _tissue_on_grid(tissue, (H, W), ds)
    return np.clip(heat, 0.0, 1.0).astype(np.float32)


def _tissue_on_grid(tissue: Any, shape: tuple[int, int], ds: float) -> np.ndarray:
    """The tissue mask resampled (nearest) onto the heatmap grid."""
    mask = np.asarray(getattr(tissue, "mask", tissue), dtype=bool)
    mds = getattr(tissue, "downsample", None)
    H, W = shape
    if mds is None:  # a plain array spanning the slide
        rows = np.minimum((np.arange(H) + 0.5) / H * mask.shape[0], mask.shape[0] - 1).astype(int)
        cols = np.minimum((np.arange(W) + 0.5) / W * mask.shape[1], mask.shape[1] - 1).astype(int)
    else:
        rows = np.minimum(((np.arange(H) + 0.5) * ds / float(mds)).astype(int), mask.shape[0] - 1)
        cols = np.minimum(((np.arange(W) + 0.5) * ds / float(mds)).astype(int), mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def heatmap_meta(slide_mpp: float | None, downsample: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TIFF description (and JSON sidecar) that makes napari-wsimil's reader overlay a score map on its
    slide: attention heatmaps and segmentation probability maps alike."""
    mpp = None if slide_mpp is None else float(slide_mpp) * float(downsample)
    return {"kind": HEATMAP_KIND, "downsample": float(downsample), "mpp": mpp,
            "slide_mpp": None if slide_mpp is None else float(slide_mpp), "colormap": COLORMAP,
            "value": "uint8 = score * 255", **(extra or {})}


def ngff_path(tif_path: str | os.PathLike[str]) -> Path:
    """Where the OME-Zarr twin of a map TIFF goes: ``x.tif`` / ``x.ome.tif`` → ``x.ome.zarr`` beside it."""
    p = Path(tif_path)
    stem = p.name[:-len(".ome.tif")] if p.name.endswith(".ome.tif") else p.stem
    return p.with_name(f"{stem}.ome.zarr")


def write_heatmap_ngff(path: str | os.PathLike[str], img: np.ndarray, meta: dict[str, Any]) -> Path:
    """The uint8 map ``img`` as an OME-Zarr (NGFF 0.4) image at ``meta['mpp']`` µm/px, our description under
    ``wsimil`` (see :mod:`napari_wsimil.io.ngff`)."""
    from ..io.ngff import write_ngff

    return write_ngff(path, img.shape, lambda y0, y1: img[y0:y1], mpp=meta.get("mpp"),
                      name=str(meta.get("slide_id") or Path(path).name), resample="mean",
                      attrs={"wsimil": meta})


def write_heatmap(path: str | os.PathLike[str], heatmap: np.ndarray, slide_mpp: float | None,
                  downsample: float, *, extra: dict[str, Any] | None = None, ome_zarr: bool = False) -> Path:
    """A pyramidal grey OME-TIFF (uint8 = value·255) at ``slide_mpp · downsample`` µm/px (PhysicalSizeX/Y, so
    QuPath and Fiji place it too), plus a ``<path>.json`` sidecar (downsample, mpp, colormap hint). The same
    JSON is the OME Image's Description (see :mod:`napari_wsimil.slide.heatmap_file`)."""
    from ..slide.tiff_writer import write_image_pyramid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.round(np.clip(np.nan_to_num(np.asarray(heatmap, np.float64)), 0, 1) * 255).astype(np.uint8)
    meta = heatmap_meta(slide_mpp, downsample, extra)
    write_image_pyramid(path, img, mpp=meta["mpp"], description=json.dumps(meta), ome=True,
                        name=str(meta.get("slide_id") or path.stem))
    from ..io.atomic import write_text

    write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))
    if ome_zarr:
        write_heatmap_ngff(ngff_path(path), img, meta)
    return path


def top_k_patches(coords: np.ndarray, scores: np.ndarray, k: int = 8) -> list[tuple[int, int, float]]:
    """The ``k`` highest-scoring patches as (x, y, score), best first (ties: the earlier patch)."""
    coords = np.asarray(coords).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-scores, kind="stable")[:max(0, int(k))]
    return [(int(coords[i, 0]), int(coords[i, 1]), float(scores[i])) for i in order]


def write_top_k(path: str | os.PathLike[str], top: list[tuple[int, int, float]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "x", "y", "score"])
        for r, (x, y, s) in enumerate(top, 1):
            w.writerow([r, x, y, repr(s)])
    return path


def write_slide_heatmap(out_dir: str | os.PathLike[str], slide_id: str, coords: np.ndarray,
                        scores: np.ndarray, bag_attrs: dict[str, Any], *, k: int = 8,
                        clip_to_tissue: bool = True, overlap: float = 0.0, ome_zarr: bool = False) -> Path:
    """``out_dir/<slide_id>.tif`` (+ ``.json``) and ``out_dir/<slide_id>_topk.csv`` for one slide,
    geometry taken from its feature bag's attrs (slide path, slide µm/px, patch size and µm/px); with
    ``ome_zarr`` also ``out_dir/<slide_id>.ome.zarr``, the same map as OME-Zarr (NGFF 0.4).

    With ``clip_to_tissue`` the map is zero off the slide's tissue mask, so patch squares that
    straddle the tissue edge do not paint glass (CLAM does the same)."""
    from ..features.bags import patch_size_level0
    from ..slide import open_slide

    slide_mpp = bag_attrs.get("slide_mpp")
    with open_slide(bag_attrs["slide_path"], mpp=slide_mpp) as slide:
        w, h = slide.dimensions
        slide_mpp = slide.mpp
        tissue = None
        if clip_to_tissue:
            from ..slide.tissue import tissue_mask

            tissue = tissue_mask(slide)
    size_level0 = patch_size_level0({**bag_attrs, "slide_mpp": slide_mpp})
    ds = default_downsample(size_level0, (h, w))
    heat = attention_heatmap(coords, scores, size_level0, (h, w), ds, tissue=tissue)
    out = Path(out_dir)
    path = write_heatmap(out / f"{slide_id}.tif", heat, slide_mpp, ds,
                         extra={"slide_id": slide_id, "size_level0": size_level0, "n_patches": int(len(coords)),
                                "overlap": float(overlap), "clipped_to_tissue": bool(clip_to_tissue)},
                         ome_zarr=ome_zarr)
    write_top_k(out / f"{slide_id}_topk.csv", top_k_patches(coords, scores, k))
    return path


def threshold_polygons(heat: np.ndarray, downsample: float, threshold: float,
                       bounds: tuple[float, float] | None = None) -> list[Any]:
    """Regions where ``heat > threshold`` as shapely polygons (holes kept) in level-0 px (x, y).

    One connected region (4-connected, as ``find_contours`` traces the foreground) at a time, on its own
    bounding box: its longest contour is the outline and the others are its holes, and regions lying in a
    hole are regions of their own. Work is then linear in the number of regions (a map of noise can have
    thousands). Heat pixel (r, c) is centred at level-0 ((c + ½)·d, (r + ½)·d). ``bounds`` (width, height)
    clips to the slide, which the last heat pixels overhang.
    """
    from scipy import ndimage as ndi
    from shapely.geometry import Polygon, box
    from skimage.measure import find_contours

    mask = np.asarray(heat) > threshold
    labels, _ = ndi.label(mask)
    clip = box(0, 0, float(bounds[0]), float(bounds[1])) if bounds is not None else None
    out = []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        one = np.pad(labels[sl] == i, 1).astype(np.float32)
        y0, x0 = sl[0].start - 1, sl[1].start - 1  # the crop's origin, padding included
        rings = [np.stack([(c[:, 1] + x0 + 0.5) * downsample, (c[:, 0] + y0 + 0.5) * downsample], 1)
                 for c in find_contours(one, 0.5) if len(c) >= 4]
        if not rings:
            continue
        areas = [Polygon(r).area for r in rings]
        k = int(np.argmax(areas))
        poly = Polygon(rings[k], [r for m, r in enumerate(rings) if m != k])
        if not poly.is_valid:
            poly = poly.buffer(0)
        if clip is not None:
            poly = poly.intersection(clip)
        out.extend(g for g in getattr(poly, "geoms", [poly]) if g.geom_type == "Polygon" and g.area > 0)
    return out


__all__ = ["attention_heatmap", "ngff_path", "write_heatmap_ngff", "threshold_polygons", "default_downsample", "percentile_scores", "top_k_patches",
           "write_heatmap", "write_slide_heatmap", "write_top_k"]
