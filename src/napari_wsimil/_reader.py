"""npe2 reader: slides open as one multiscale RGB layer in µm, attention heatmaps (TIFFs written by
``wsimil predict``) as one colour-mapped layer in the same µm world. Thin on purpose; see layers.py."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._plugin_settings import sync_from_napari
from .errors import SlideError
from .layers import LayerData, heatmap_layer_data, is_heatmap_file, slide_layer_data

log = logging.getLogger(__name__)


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """Claim a file only if a backend can actually open it, so other plugins still get the rest.

    A list (napari passes one when several files are dropped or opened as a stack) gives one layer per
    slide, in order: whole slides cannot be stacked, and a pathologist dropping three slides wants three.
    The list is claimed only when every file in it can be read, so napari's message about a file nobody
    reads is not lost in a half-opened batch.
    """
    sync_from_napari()  # the tile-cache size from Preferences, before any tile is decoded
    if isinstance(path, (list, tuple)):
        readers = [_one_reader(str(p)) for p in path]
        if not readers or any(r is None for r in readers):
            return None

        def read_all(_: Any) -> list[LayerData]:
            return [layer for r in readers for layer in r(_)]  # type: ignore[misc]

        return read_all
    return _one_reader(str(path))


def _one_reader(path: str) -> Callable[[Any], list[LayerData]] | None:
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
