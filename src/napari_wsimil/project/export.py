"""Labels out of the project: masks (pyramidal OME-TIFF, OME-Zarr or PNG) and annotations (QuPath GeoJSON).

Masks are uint8 class ids (the legend, ``classes.csv``, is written beside them by
``export_project``; the OME-TIFF also carries the class table in its Description). Export never
opens the slide and never holds a full-resolution image: output is produced band by band (512 rows)
from the label store, so a 100,000² slide at 4 µm/px exports in a few MB of memory.

OME-TIFF layout: level 0 at the chosen resolution, reduced levels (x2 each, nearest at pixel
centres, until the long side is at most 1024 px) as SubIFDs of level 0, which is what QuPath and
Bio-Formats read as an OME pyramid; 512x512 tiles, zlib; PhysicalSizeX/Y in µm when the slide's
pixel size is known. PNG is streamed row band by row band through zlib (no image library holds it),
with its pixel size in the pHYs chunk and the downsample in a ``wsimil`` text chunk. OME-Zarr is NGFF 0.4
(:mod:`napari_wsimil.io.ngff`): the same levels and µm/px, the class table as ``image-label`` (so
napari-ome-zarr opens it as labels) and our description under ``wsimil``.

A mask holds what QuPath's labelled-image export holds: the drawn polygons and boxes filled with their
class, and the painted pixels over them (painted pixels win where both are). With ``pixels_only`` and at
label resolution (``mpp=None``) the export is the label array itself, pixel for pixel, so that
``import_mask`` of an exported mask gives back identical labels (the cohort CSV's round trip).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np


from ..io.atomic import atomic_write
from ..io.mask_writers import LabelSampler, write_ome_tiff, write_png
from ..io.raster_store import CHUNK
from .errors import ProjectError
from .pixel_labels import LabelGeometry, label_shape

if TYPE_CHECKING:  # pragma: no cover
    from .folder import ProjectFolder

MaskFormat = Literal["ome-tiff", "ome-zarr", "png"]
SUFFIX = {"ome-tiff": ".ome.tif", "ome-zarr": ".ome.zarr", "png": ".png", "geojson": ".geojson"}


def _output_downsample(project: ProjectFolder, slide_id: str, geometry: LabelGeometry, mpp: float | None) -> float:
    if mpp is None:
        return geometry.downsample
    try:
        mpp = float(mpp)
    except (TypeError, ValueError):
        raise ProjectError(f"--mpp must be a number of µm per pixel, got {mpp!r}") from None
    if not mpp > 0:
        raise ProjectError(f"the export resolution must be a positive µm/px, got {mpp:g}")
    slide_mpp = project.slide_mpp(slide_id)
    if slide_mpp is None:
        raise ProjectError(f"slide '{slide_id}' has no known pixel size, so it cannot be exported at {mpp:g} µm/px; "
                           "export at label resolution (no mpp) or set the slide's µm/px")
    return mpp / slide_mpp


class AnnotatedSampler:
    """Row bands of a slide's mask as QuPath's labelled-image export draws it: the drawn polygons and boxes
    filled with their class id (holes left open; later annotations over earlier ones), then the painted
    pixels on top, which win where they overlap. Bands are rasterised one at a time from the annotations
    that cross them, so memory stays that of a band."""

    def __init__(self, pixels: LabelSampler, shapes: list[tuple[np.ndarray, list[np.ndarray], int]]):
        self.pixels = pixels
        self.geometry = pixels.geometry
        self.shapes = shapes  # (exterior (M, 2) level-0 x, y; interiors; class id)
        self.bounds = [(float(e[:, 1].min()), float(e[:, 1].max())) for e, _, _ in shapes]

    def band(self, out_ds: float, y0: int, y1: int, width: int) -> np.ndarray:
        from skimage.draw import polygon

        painted = self.pixels.band(out_ds, y0, y1, width)
        top, bottom = y0 * out_ds, y1 * out_ds
        drawn = np.zeros_like(painted)
        for (ext, holes, cid), (lo, hi) in zip(self.shapes, self.bounds):
            if hi < top or lo > bottom:
                continue
            # pixel (i, j) covers [j·d, (j+1)·d): its centre is inside when the polygon scaled by 1/d, shifted
            # by half a pixel, contains (j, i)
            for ring, value in [(ext, cid)] + [(h, -1) for h in holes]:
                rr, cc = polygon(ring[:, 1] / out_ds - 0.5 - y0, ring[:, 0] / out_ds - 0.5, shape=drawn.shape)
                if value < 0:
                    drawn[rr, cc] = 0
                else:
                    drawn[rr, cc] = value
        return np.where(painted > 0, painted, drawn).astype(np.uint8)


def _shapes(project: ProjectFolder, slide_id: str) -> list[tuple[np.ndarray, list[np.ndarray], int]]:
    """Every drawn polygon of a slide with its class id (MultiPolygons split)."""
    out = []
    for ann in project.annotations(slide_id):
        try:
            cid = project.class_by_name(ann.class_name).id
        except ProjectError:
            continue  # a class that is not the project's (an unclassified import): not drawn
        geoms = getattr(ann.geometry, "geoms", [ann.geometry])
        for g in geoms:
            if g.is_empty or g.geom_type != "Polygon":
                continue
            out.append((np.asarray(g.exterior.coords, float), [np.asarray(r.coords, float) for r in g.interiors],
                        int(cid)))
    return out


def export_mask(project: ProjectFolder, slide_id: str, out_path: str | os.PathLike[str],
                format: MaskFormat = "ome-tiff", mpp: float | None = None, pixels_only: bool = False) -> Path:
    """Write a slide's labels as a mask image (class ids) at label resolution or at ``mpp`` µm/px: the drawn
    polygons and boxes filled, and the painted pixels over them (``pixels_only``: painted pixels alone, what
    the cohort CSV's round trip needs, since its annotations travel as GeoJSON)."""
    if format not in ("ome-tiff", "ome-zarr", "png"):
        raise ProjectError(f"mask format must be 'ome-tiff', 'ome-zarr' or 'png', got {format!r}")
    rec = project.record(slide_id)
    geometry = project.label_geometry(slide_id)
    out_ds = _output_downsample(project, slide_id, geometry, mpp)
    sampler = LabelSampler(project._label_store(slide_id, create=False), geometry)
    shapes = [] if pixels_only else _shapes(project, slide_id)
    if shapes:
        sampler = AnnotatedSampler(sampler, shapes)
    dims = rec.dimensions
    out_mpp = float(mpp) if mpp is not None else geometry.mpp  # as asked, not slide_mpp * out_ds (float noise)
    meta = {"wsimil": {
        "slide_id": slide_id, "downsample": out_ds, "mpp": out_mpp,
        "slide_dimensions": list(dims), "classes": [c.to_json() for c in project.classes],
    }}
    out_path = Path(out_path)
    if format == "png":
        h, w = label_shape(dims, out_ds)
        bands = (sampler.band(out_ds, y0, min(h, y0 + CHUNK), w) for y0 in range(0, h, CHUNK))
        write_png(out_path, (h, w), bands, out_mpp, json.dumps(meta))
    elif format == "ome-zarr":
        from ..io.ngff import write_ngff

        h, w = label_shape(dims, out_ds)
        write_ngff(out_path, (h, w), lambda y0, y1: sampler.band(out_ds, y0, y1, w), mpp=out_mpp, name=slide_id,
                   resample="nearest", classes=project.classes, attrs=meta)
    else:
        write_ome_tiff(out_path, sampler, dims, out_ds, out_mpp, slide_id, json.dumps(meta))
    return out_path


def export_project(project: ProjectFolder, out_dir: str | os.PathLike[str],
                   format: Literal["geojson", "ome-tiff", "ome-zarr", "png"] = "geojson", mpp: float | None = None,
                   pixels_only: bool = False) -> list[Path]:
    """Export every slide's annotations (``geojson``) or masks (``ome-tiff``/``png``: drawn shapes and painted
    pixels, or painted pixels alone with ``pixels_only``) into ``out_dir``.

    Files are ``<slide_id>.geojson`` / ``.ome.tif`` / ``.ome.zarr`` (a folder) / ``.png``; slides without labels give an empty
    FeatureCollection or an all-zero mask, so the folder always matches the cohort one to one. Mask
    exports also write ``classes.csv`` (id,name,color), the legend of the pixel values.
    """
    from .annotations import write_geojson

    if format not in SUFFIX:
        raise ProjectError(f"export format must be one of {', '.join(SUFFIX)}, got {format!r}")
    if format == "geojson" and mpp is not None:
        raise ProjectError("--mpp applies to mask exports; GeoJSON is always in level-0 pixels")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for rec in project.slides:
        target = out / f"{rec.slide_id}{SUFFIX[format]}"
        if format == "geojson":
            write_geojson(target, project.annotations(rec.slide_id), project.classes)
        else:
            export_mask(project, rec.slide_id, target, format=format, mpp=mpp,  # type: ignore[arg-type]
                        pixels_only=pixels_only)
        written.append(target)
    if format != "geojson":
        with atomic_write(out / "classes.csv", "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["id", "name", "color"])
            for c in project.classes:
                wr.writerow([c.id, c.name, c.color])
    return written
