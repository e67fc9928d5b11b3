"""Layer-data tuples: how slides, masks and grids appear in napari, without importing napari.

napari's world coordinates are µm whenever the slide's pixel size is known, so the scale bar reads
µm and every overlay (tissue masks, heatmaps, labels at other resolutions) lines up by giving it its
own µm/px as ``scale``. A layer at downsample d over a slide at mpp m gets scale m·d and a
translate of (d − 1)/2 · m so pixel centres coincide with the slide's.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from .slide import Slide
from .slide.heatmap_file import HEATMAP_KIND, heatmap_description, is_heatmap_file  # noqa: F401 (re-exported)

LayerData = tuple[Any, dict[str, Any], str]


def world_mpp(slide: Slide) -> float:
    """µm per level-0 pixel in napari's world; 1.0 (pixels) when the slide's pixel size is unknown."""
    return slide.mpp if slide.mpp is not None else 1.0


def overlay_transform(slide: Slide, downsample: float) -> dict[str, tuple[float, float]]:
    """scale/translate for a 2-D array that covers the slide at ``downsample`` level-0 px per pixel."""
    return overlay_transform_for(world_mpp(slide), downsample)


def overlay_transform_for(slide_world_mpp: float, downsample: float) -> dict[str, tuple[float, float]]:
    """:func:`overlay_transform` from the slide's world µm/px alone, for overlays read without the slide."""
    m = float(slide_world_mpp)
    offset = (downsample - 1.0) / 2.0 * m
    return {"scale": (m * downsample, m * downsample), "translate": (offset, offset)}


def world_units(slide: Slide) -> dict[str, tuple[str, str]]:
    """``units`` for a layer over the slide: µm when its pixel size is known (the scale bar's unit is the
    layers' own: napari shows µm only when every layer has them), none otherwise (world px)."""
    return {"units": ("µm", "µm")} if slide.mpp is not None else {}


def slide_layer_data(slide: Slide, name: str | None = None) -> LayerData:
    m = world_mpp(slide)
    meta = {
        "wsimil": {"kind": "slide", "path": str(slide.path), "mpp": slide.mpp},
        "slide": slide,  # keeps the file open as long as the layer lives
    }
    kwargs: dict[str, Any] = {
        "name": name or slide.path.stem,
        "multiscale": True,
        "rgb": True,
        "scale": (m, m),
        "contrast_limits": (0, 255),
        "metadata": meta,
    }
    if slide.mpp is not None:
        kwargs["units"] = ("µm", "µm")
    return (slide.levels, kwargs, "image")


def mask_layer_data(
    slide: Slide, mask: np.ndarray, downsample: float, name: str, color: str = "#33cc66",
    opacity: float = 0.9,
) -> LayerData:
    """A low-resolution boolean/integer mask as a Labels layer overlaying the slide.

    napari takes no ``contour`` at construction: callers that want an outline set ``layer.contour``.
    """
    kwargs = {
        "name": name,
        "opacity": opacity,
        "colormap": {None: "transparent", 1: color},
        "metadata": {"wsimil": {"kind": "mask", "path": str(slide.path), "downsample": float(downsample)}},
        **overlay_transform(slide, downsample),
        **world_units(slide),
    }
    return (np.asarray(mask).astype(np.uint8), kwargs, "labels")


def patch_grid_layer_data(slide: Slide, coords: np.ndarray, size_level0: float, name: str = "patches") -> LayerData:
    """Patch outlines as rectangles in world units (µm)."""
    m = world_mpp(slide)
    # napari centres pixel i on i·m; level-0 coordinates put pixel i's corner at i: shift by half a pixel.
    xy = np.asarray(coords, dtype=float) - 0.5
    y0, x0 = xy[:, 1] * m, xy[:, 0] * m
    s = size_level0 * m
    rects = np.stack(
        [np.stack([y0, x0], 1), np.stack([y0, x0 + s], 1), np.stack([y0 + s, x0 + s], 1), np.stack([y0 + s, x0], 1)],
        axis=1,
    )
    kwargs = {
        "name": name,
        "shape_type": "rectangle",
        "edge_color": "#ffcc00",
        "face_color": "transparent",
        "edge_width": max(s * 0.03, 1e-3),
        "metadata": {"wsimil": {"kind": "patch_grid", "path": str(slide.path)}},
        **world_units(slide),
    }
    return (list(rects), kwargs, "shapes")


# --- attention heatmaps ---------------------------------------------------------------------------
# Which files are heatmaps (HEATMAP_KIND, heatmap_description, is_heatmap_file): slide.heatmap_file.


def _positive(value: Any) -> float | None:
    """A positive finite float, or None: descriptions are JSON written by us but read from disk."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def _heatmap_levels(path: Path) -> list[Any]:
    """The TIFF's pyramid levels as lazy 2-D dask arrays (uint8), finest first.

    Read through tifffile's zarr store rather than ``open_slide``, whose levels are always RGB: a
    heatmap is one channel of scores and napari must colour-map it. The store reopens the file on
    demand, so nothing is read here but the page headers. Dask names carry the file's size and mtime
    so that a rewritten heatmap never shows tiles cached from the old one.
    """
    import dask.array as da
    import tifffile
    import zarr

    stat = os.stat(path)
    token = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        stores = [series.aszarr(level=i) for i in range(len(series.levels))]
    levels = [da.from_zarr(zarr.open(store, mode="r"), name=f"wsimil-heatmap-{token}-{i}")
              for i, store in enumerate(stores)]
    for i, level in enumerate(levels):
        if level.ndim != 2:
            raise ValueError(f"{path}: heatmap level {i} has shape {level.shape}, expected one channel")
    return levels


def heatmap_layer_data(
    path: str | os.PathLike[str], name: str | None = None, opacity: float = 0.5,
) -> LayerData:
    """An attention heatmap TIFF as a lazy multiscale image layer that overlays its slide.

    World units are the slide's: the heatmap's pixels are ``downsample`` slide pixels, placed by
    :func:`overlay_transform_for` so that pixel centres coincide with the slide layer's. Translucent
    blending (not additive) because H&E is bright: adding inferno to near-white saturates to white,
    while translucent keeps hot spots yellow and cold tissue visibly darker.
    """
    path = Path(path)
    meta = heatmap_description(path)
    if meta is None:
        raise ValueError(f"{path} is not a wsimil attention heatmap (no '{HEATMAP_KIND}' description)")
    downsample = _positive(meta.get("downsample")) or 1.0
    mpp = _positive(meta.get("mpp"))
    slide_mpp = _positive(meta.get("slide_mpp")) or (mpp / downsample if mpp else None)
    slide_id = meta.get("slide_id")
    kwargs: dict[str, Any] = {
        "name": name or f"{slide_id or path.stem} heatmap",
        "multiscale": True,
        "rgb": False,
        "colormap": meta.get("colormap") or "inferno",
        "contrast_limits": (0, 255),
        "blending": "translucent",
        "opacity": float(opacity),
        "metadata": {"wsimil": {"kind": "heatmap", "path": str(path), "downsample": downsample,
                                "mpp": mpp, "slide_mpp": slide_mpp, "slide_id": slide_id}},
        # unknown pixel size: the slide layer's world is level-0 pixels, so use 1 µm/px as it does
        **overlay_transform_for(slide_mpp if slide_mpp is not None else 1.0, downsample),
    }
    if slide_mpp is not None:
        kwargs["units"] = ("µm", "µm")
    return (_heatmap_levels(path), kwargs, "image")


def attention_layer_data(
    slide: Slide, heatmap: np.ndarray, downsample: float, name: str, opacity: float = 0.5,
    threshold: float = 0.0,
) -> LayerData:
    """A live attention map (float scores in [0, 1] at ``downsample`` level-0 px per pixel) over its slide.

    The in-memory twin of :func:`heatmap_layer_data`: same inferno colormap and translucent blending
    (see there why), one scale only since a training map is small. Contrast limits ``(threshold, 1)``
    make scores below the threshold look dark, so the map shows where the model looks.
    """
    lo = min(max(float(threshold), 0.0), 0.999)
    kwargs: dict[str, Any] = {
        "name": name,
        "rgb": False,
        "colormap": "inferno",
        "contrast_limits": (lo, 1.0),
        "blending": "translucent",
        "opacity": float(opacity),
        "metadata": {"wsimil": {"kind": "attention", "path": str(slide.path), "downsample": float(downsample),
                                "slide_mpp": slide.mpp}},
        **overlay_transform(slide, downsample),
    }
    if slide.mpp is not None:
        kwargs["units"] = ("µm", "µm")
    return (np.asarray(heatmap, dtype=np.float32), kwargs, "image")


#: colours of the zoom path by level (low magnification first)
ZOOM_LEVEL_COLOURS = ("#00e5ff", "#ffcc00", "#ff3df5", "#7cff4f")


def zoom_path_layer_data(slide: Slide, regions: np.ndarray, name: str) -> LayerData:
    """ZoomMIL's zoom path as rectangles in world units: the patches chosen at each level outlined in that
    level's colour, and the patches read at the next level filled with the same colour, as opaque as their
    attention (``regions``: :attr:`~napari_wsimil.train.events.MapEvent.regions`)."""
    m = world_mpp(slide)
    reg = np.asarray(regions, float).reshape(-1, 7)
    x0, y0, x1, y1 = (reg[:, i] - 0.5 for i in range(4))
    rects = np.stack([np.stack([y0 * m, x0 * m], 1), np.stack([y0 * m, x1 * m], 1),
                      np.stack([y1 * m, x1 * m], 1), np.stack([y1 * m, x0 * m], 1)], axis=1)
    edge, face = [], []
    for level, value, role in zip(reg[:, 4].astype(int), reg[:, 5], reg[:, 6].astype(int)):
        hex_ = ZOOM_LEVEL_COLOURS[level % len(ZOOM_LEVEL_COLOURS)]
        rgb = [int(hex_[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        edge.append([*rgb, 1.0 if role == 0 else 0.0])
        face.append([*rgb, 0.0 if role == 0 else 0.15 + 0.6 * float(np.clip(value, 0, 1))])
    side = float(np.min(x1 - x0)) * m if len(reg) else 1.0
    kwargs = {
        "name": name,
        "shape_type": "rectangle",
        "edge_color": np.asarray(edge).reshape(-1, 4),
        "face_color": np.asarray(face).reshape(-1, 4),
        "edge_width": max(side * 0.08, 1e-3),
        "metadata": {"wsimil": {"kind": "zoom_path", "path": str(slide.path), "n_regions": int(len(reg))}},
        **world_units(slide),
    }
    return (list(rects), kwargs, "shapes")
