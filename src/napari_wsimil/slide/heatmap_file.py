"""Telling a wsimil heatmap TIFF from a slide: both are pyramidal TIFFs, and only the description differs.

Heatmaps (attention heatmaps, segmentation probability maps) are written by
:func:`napari_wsimil.infer.heatmap.write_heatmap` and :func:`napari_wsimil.seg.predict.write_map_tiff` with
a JSON description whose ``kind`` is :data:`HEATMAP_KIND`: today as OME-TIFFs, the JSON being the OME
Image's Description (the OME-XML, with PhysicalSizeX/Y in µm, is the first page's description); files
written before that hold the JSON itself as the first page's description, and both are read. Pure file reading, no napari: napari's reader
(:mod:`napari_wsimil.layers`) and the segmentation evaluation (:mod:`napari_wsimil.seg.evaluation`) both ask
it.
"""

from __future__ import annotations

import json
import os
from typing import Any

#: The ``kind`` that ``infer.heatmap.write_heatmap`` puts in the TIFF description; it is what tells a
#: heatmap (one grey channel of scores) from a slide, since both are pyramidal TIFFs.
HEATMAP_KIND = "wsimil attention heatmap"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def heatmap_description(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The heatmap's JSON description, or None when ``path`` is not a wsimil heatmap TIFF.

    Reads the magic bytes and the first page only, so the reader can ask this of every file it is
    offered (slides included) before deciding how to open it. Never raises: unreadable means "no".
    """
    try:
        with open(path, "rb") as fh:
            if fh.read(4) not in _TIFF_MAGIC:
                return None
        import tifffile

        with tifffile.TiffFile(path) as tf:
            text = tf.pages.first.description
        if HEATMAP_KIND not in text:  # cheap test before parsing a (possibly large) vendor text
            return None
        meta = json.loads(text if text.lstrip().startswith("{") else _ome_description(text))
    except Exception:  # a damaged or foreign file is simply not a heatmap
        return None
    return meta if isinstance(meta, dict) and meta.get("kind") == HEATMAP_KIND else None


def _ome_description(xml: str) -> str:
    """The first Image's Description of an OME-XML text (where OME-TIFF heatmaps keep their JSON)."""
    import xml.etree.ElementTree as ET

    for el in ET.fromstring(xml).iter():
        if el.tag.rsplit("}", 1)[-1] == "Description" and el.text:
            return el.text
    raise ValueError("no Description in the OME-XML")


def is_heatmap_file(path: str | os.PathLike[str]) -> bool:
    """True for a TIFF written by ``write_heatmap`` (judged from its first page's description)."""
    return heatmap_description(path) is not None


__all__ = ["HEATMAP_KIND", "heatmap_description", "is_heatmap_file"]
