"""npe2 reader: slides open as one multiscale RGB layer in µm, attention heatmaps (TIFFs written by
``wsimil predict``) as one colour-mapped layer in the same µm world. Thin on purpose; see layers.py."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import SlideError
from .layers import LayerData, heatmap_layer_data, is_heatmap_file, slide_layer_data

log = logging.getLogger(__name__)


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """Claim a file only if a backend can actually open it, so other plugins still get the rest."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if is_heatmap_file(path):  # before open_slide, which would happily show the scores as grey RGB
        return _heatmap_reader(path)
    from .slide import open_slide

    try:
        slide = open_slide(Path(path))
    except SlideError as exc:
        log.debug("napari-wsimil does not read %s: %s", path, exc)
        return None
    except Exception:  # any surprise means "not ours", never a crash in napari's open dialog
        log.debug("napari-wsimil reader failed on %s", path, exc_info=True)
        return None

    def read(_: Any) -> list[LayerData]:
        return [slide_layer_data(slide)]

    return read


def _heatmap_reader(path: str) -> Callable[[Any], list[LayerData]] | None:
    """Build the layer now, so that a heatmap we cannot read is declined rather than a crash later."""
    try:
        layer = heatmap_layer_data(path)
    except Exception:
        log.debug("napari-wsimil could not read heatmap %s", path, exc_info=True)
        return None

    def read(_: Any) -> list[LayerData]:
        return [layer]

    return read
