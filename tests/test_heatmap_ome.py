"""Heatmaps and probability maps are OME-TIFFs that record their µm/px, and older (plain TIFF) heatmaps still
read: the OME-XML is checked by hand against the OME schema's Pixels attributes."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_wsimil.infer.heatmap import heatmap_meta, write_heatmap
from napari_wsimil.layers import heatmap_layer_data
from napari_wsimil.slide.heatmap_file import heatmap_description, is_heatmap_file
from napari_wsimil.slide.tiff_writer import write_image_pyramid

OME_NS = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"


def ramp(h: int = 1500, w: int = 2100) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x + y) / (h + w)).astype(np.float32)


def test_heatmap_is_an_ome_pyramid_with_physical_size(tmp_path: Path) -> None:
    heat = ramp()
    path = write_heatmap(tmp_path / "s1.tif", heat, 0.25, 16, extra={"slide_id": "s1"})
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        root = ET.fromstring(tf.ome_metadata)
        images = root.findall(f"{OME_NS}Image")
        assert len(images) == 1  # one image whose reduced levels are SubIFDs, not one image per level
        pixels = images[0].find(f"{OME_NS}Pixels")
        assert pixels.get("PhysicalSizeX") is not None
        assert float(pixels.get("PhysicalSizeX")) == pytest.approx(4.0)
        assert float(pixels.get("PhysicalSizeY")) == pytest.approx(4.0)
        assert pixels.get("PhysicalSizeXUnit") == "µm" and pixels.get("Type") == "uint8"
        assert (int(pixels.get("SizeX")), int(pixels.get("SizeY"))) == (2100, 1500)
        assert images[0].get("Name") == "s1"
        series = tf.series[0]
        assert [lv.shape for lv in series.levels] == [(1500, 2100), (750, 1050), (375, 525)]
        level0 = series.levels[0].asarray()
    assert level0[0, 0] == 0 and level0[-1, -1] == 255
    meta = heatmap_description(path)
    assert meta == heatmap_meta(0.25, 16, {"slide_id": "s1"})
    assert meta == json.loads(path.with_suffix(".json").read_text())
    # napari's layer places it over the slide from the same description
    levels, kwargs, kind = heatmap_layer_data(path)
    assert kind == "image" and len(levels) == 3 and kwargs["metadata"]["wsimil"]["slide_id"] == "s1"
    assert kwargs["metadata"]["wsimil"]["mpp"] == pytest.approx(4.0)


def test_heatmap_written_before_ome_still_reads(tmp_path: Path) -> None:
    """A heatmap from an older version: each level a top-level page, the JSON as the first description."""
    meta = heatmap_meta(0.5, 8, {"slide_id": "old"})
    img = np.round(ramp(600, 700) * 255).astype(np.uint8)
    path = tmp_path / "old.tif"
    write_image_pyramid(path, img, mpp=4.0, description=json.dumps(meta), min_size=256)
    with tifffile.TiffFile(path) as tf:
        assert not tf.is_ome and len(tf.pages) > 1
    assert is_heatmap_file(path) and heatmap_description(path) == meta
    levels, kwargs, _ = heatmap_layer_data(path)
    assert len(levels) >= 2 and kwargs["metadata"]["wsimil"]["slide_id"] == "old"


def test_an_ome_tiff_that_is_not_a_heatmap_is_not_taken_for_one(tmp_path: Path) -> None:
    path = tmp_path / "other.ome.tif"
    write_image_pyramid(path, np.zeros((300, 300), np.uint8), mpp=1.0, description="a mask", ome=True)
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome and re.search(r"<Description>a mask</Description>", tf.ome_metadata)
    assert not is_heatmap_file(path)
