"""Layer-data tuples: how slides, masks and grids appear in napari, without importing napari.

napari's world coordinates are µm whenever the slide's pixel size is known, so the scale bar reads
µm and every overlay (tissue masks, heatmaps, labels at other resolutions) lines up by giving it its
own µm/px as ``scale``. A layer at downsample d over a slide at mpp m gets scale m·d and a
translate of (d − 1)/2 · m so pixel centres coincide with the slide's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .slide import Slide

LayerData = tuple[Any, dict[str, Any], str]


def world_mpp(slide: Slide) -> float:
    """µm per level-0 pixel in napari's world; 1.0 (pixels) when the slide's pixel size is unknown."""
    return slide.mpp if slide.mpp is not None else 1.0


def overlay_transform(slide: Slide, downsample: float) -> dict[str, tuple[float, float]]:
    """scale/translate for a 2-D array that covers the slide at ``downsample`` level-0 px per pixel."""
    m = world_mpp(slide)
    offset = (downsample - 1.0) / 2.0 * m
    return {"scale": (m * downsample, m * downsample), "translate": (offset, offset)}


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
    }
    return (list(rects), kwargs, "shapes")
