"""Labels out of the project: masks (pyramidal OME-TIFF or PNG) and annotations (QuPath GeoJSON).

Masks are uint8 class ids (the legend, ``classes.csv``, is written beside them by
``export_project``; the OME-TIFF also carries the class table in its Description). Export never
opens the slide and never holds a full-resolution image: output is produced band by band (512 rows)
from the label store, so a 100,000² slide at 4 µm/px exports in a few MB of memory.

OME-TIFF layout: level 0 at the chosen resolution, reduced levels (x2 each, nearest at pixel
centres, until the long side is at most 1024 px) as SubIFDs of level 0, which is what QuPath and
Bio-Formats read as an OME pyramid; 512x512 tiles, zlib; PhysicalSizeX/Y in µm when the slide's
pixel size is known. PNG is streamed row band by row band through zlib (no image library holds it),
with its pixel size in the pHYs chunk and the downsample in a ``wsimil`` text chunk.

At label resolution (``mpp=None``) the export is the label array itself, pixel for pixel, so that
``import_mask`` of an exported mask gives back identical labels.
"""

from __future__ import annotations

import csv
import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .atomic import atomic_path, atomic_write
from .errors import ProjectError
from .pixel_labels import CHUNK, LabelGeometry, LabelStore, label_shape

if TYPE_CHECKING:  # pragma: no cover
    from .project import Project

MaskFormat = Literal["ome-tiff", "png"]
TILE = 512
MIN_LEVEL_SIZE = 1024
SUFFIX = {"ome-tiff": ".ome.tif", "png": ".png", "geojson": ".geojson"}


class LabelSampler:
    """Nearest-neighbour reads of a slide's labels at any downsample; zeros when none were saved."""

    def __init__(self, store: LabelStore | None, geometry: LabelGeometry):
        self.store = store
        self.geometry = geometry

    def index(self, out_ds: float, start: int, stop: int, axis: int) -> np.ndarray:
        """Label indices along ``axis`` (0 rows, 1 columns) of output pixels start..stop at ``out_ds``."""
        i = np.arange(start, stop, dtype=np.int64)
        ratio = out_ds / self.geometry.downsample
        if abs(ratio - 1.0) > 1e-12:
            i = np.floor((i + 0.5) * ratio).astype(np.int64)
        return np.minimum(i, self.geometry.shape[axis] - 1)

    def band(self, out_ds: float, y0: int, y1: int, width: int) -> np.ndarray:
        rows = self.index(out_ds, y0, y1, 0)
        if self.store is None:
            return np.zeros((y1 - y0, width), np.uint8)
        cols = self.index(out_ds, 0, width, 1)
        if abs(out_ds / self.geometry.downsample - 1.0) <= 1e-12 and width == self.geometry.shape[1]:
            return self.store.read_block(int(rows[0]), int(rows[-1]) + 1, 0, width)
        return self.store.read_points(rows, cols)


def _output_downsample(project: Project, slide_id: str, geometry: LabelGeometry, mpp: float | None) -> float:
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


def export_mask(project: Project, slide_id: str, out_path: str | os.PathLike[str],
                format: MaskFormat = "ome-tiff", mpp: float | None = None) -> Path:
    """Write a slide's pixel labels as a mask image (class ids) at label resolution or at ``mpp`` µm/px."""
    if format not in ("ome-tiff", "png"):
        raise ProjectError(f"mask format must be 'ome-tiff' or 'png', got {format!r}")
    rec = project.record(slide_id)
    geometry = project.label_geometry(slide_id)
    out_ds = _output_downsample(project, slide_id, geometry, mpp)
    sampler = LabelSampler(project._label_store(slide_id, create=False), geometry)
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
    else:
        write_ome_tiff(out_path, sampler, dims, out_ds, out_mpp, slide_id, json.dumps(meta))
    return out_path


def write_ome_tiff(path: Path, sampler: LabelSampler, dims: tuple[int, int], out_ds: float, out_mpp: float | None,
                   name: str, description: str) -> None:
    import tifffile

    levels = []
    ds = out_ds
    while True:
        shape = label_shape(dims, ds)
        levels.append((ds, shape))
        if max(shape) <= MIN_LEVEL_SIZE or min(shape) < 2:
            break
        ds *= 2
    h0, w0 = levels[0][1]
    bigtiff = h0 * w0 > 2**31
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=True) as tw:
        for k, (ds, shape) in enumerate(levels):
            kwargs: dict = {
                "shape": shape, "dtype": np.uint8, "tile": (TILE, TILE), "compression": "zlib",
                "photometric": "minisblack",
            }
            if out_mpp is not None:
                lmpp = out_mpp * ds / out_ds
                kwargs["resolution"] = (1e4 / lmpp, 1e4 / lmpp)
                kwargs["resolutionunit"] = "CENTIMETER"
            if k == 0:
                metadata: dict = {"axes": "YX", "Name": name, "Description": description}
                if out_mpp is not None:
                    metadata.update(PhysicalSizeX=out_mpp, PhysicalSizeY=out_mpp,
                                    PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
                tw.write(_tiles(sampler, ds, shape), subifds=len(levels) - 1, metadata=metadata, **kwargs)
            else:
                tw.write(_tiles(sampler, ds, shape), subfiletype=1, **kwargs)


def _tiles(sampler: LabelSampler, ds: float, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    h, w = shape
    for y0 in range(0, h, TILE):
        strip = sampler.band(ds, y0, min(h, y0 + TILE), w)
        if strip.shape[0] < TILE:
            strip = np.pad(strip, ((0, TILE - strip.shape[0]), (0, 0)))
        for x0 in range(0, w, TILE):
            tile = strip[:, x0:x0 + TILE]
            if tile.shape[1] < TILE:
                tile = np.pad(tile, ((0, 0), (0, TILE - tile.shape[1])))
            yield np.ascontiguousarray(tile)


def write_png(path: Path, shape: tuple[int, int], bands: Iterator[np.ndarray], mpp: float | None,
              text: str | None = None) -> None:
    """A greyscale 8-bit PNG from row bands, streamed through zlib, written atomically."""
    h, w = shape

    def chunk(fh, kind: bytes, data: bytes) -> None:
        fh.write(struct.pack(">I", len(data)) + kind + data)
        fh.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    with atomic_write(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        chunk(fh, b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        if mpp:
            ppm = max(1, round(1e6 / mpp))
            chunk(fh, b"pHYs", struct.pack(">IIB", ppm, ppm, 1))
        if text:
            chunk(fh, b"tEXt", b"wsimil\x00" + text.encode("latin-1", "replace"))
        comp = zlib.compressobj(6)
        pending = bytearray()
        rows = 0
        for band in bands:
            band = np.asarray(band, np.uint8)
            if band.shape[1] != w:
                raise ValueError(f"band width {band.shape[1]} != {w}")
            rows += band.shape[0]
            filtered = np.zeros((band.shape[0], w + 1), np.uint8)  # filter type 0 (None) per row
            filtered[:, 1:] = band
            pending += comp.compress(filtered.tobytes())
            if len(pending) >= 1 << 20:
                chunk(fh, b"IDAT", bytes(pending))
                pending.clear()
        if rows != h:
            raise ValueError(f"PNG got {rows} rows, expected {h}")
        pending += comp.flush()
        chunk(fh, b"IDAT", bytes(pending))
        chunk(fh, b"IEND", b"")


def export_project(project: Project, out_dir: str | os.PathLike[str],
                   format: Literal["geojson", "ome-tiff", "png"] = "geojson", mpp: float | None = None) -> list[Path]:
    """Export every slide's annotations (``geojson``) or pixel labels (``ome-tiff``/``png``) into ``out_dir``.

    Files are ``<slide_id>.geojson`` / ``.ome.tif`` / ``.png``; slides without labels give an empty
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
            export_mask(project, rec.slide_id, target, format=format, mpp=mpp)  # type: ignore[arg-type]
        written.append(target)
    if format != "geojson":
        with atomic_write(out / "classes.csv", "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["id", "name", "color"])
            for c in project.classes:
                wr.writerow([c.id, c.name, c.color])
    return written
