"""OME-TIFF pyramids (levels as SubIFDs, pixel size in the OME-XML) read with their µm/px."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_wsimil import open_slide


def _write_ome_pyramid(path, image, mpp):
    levels = [image, image[::2, ::2], image[::4, ::4]]
    with tifffile.TiffWriter(path, ome=True, bigtiff=True) as tif:
        tif.write(
            levels[0], subifds=len(levels) - 1, tile=(128, 128), photometric="rgb", compression="zlib",
            metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
                      "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"},
        )
        for level in levels[1:]:
            tif.write(level, subfiletype=1, tile=(128, 128), photometric="rgb", compression="zlib")
    return levels


def test_ome_pyramid_levels_pixels_and_mpp(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (700, 900, 3), dtype=np.uint8)
    path = tmp_path / "slide.ome.tif"
    levels = _write_ome_pyramid(path, image, 0.25)
    with open_slide(path) as slide:
        assert slide.vendor == "ome" and slide.backend == "tifffile"
        assert slide.mpp == pytest.approx(0.25)
        assert slide.file_level_count == 3
        for i, level in enumerate(levels):
            np.testing.assert_array_equal(slide.levels[i].compute(), level)
        np.testing.assert_array_equal(slide.read_region((128, 64), (50, 40), level=0), image[64:104, 128:178])
        assert slide.best_level_for_mpp(1.0) == 2
