"""The library's settings (tile cache, default device) and the npe2 writers' files, without a viewer.

The writers are fed what napari hands them (a layer's data and ``as_layer_data_tuple`` state), built here
from the plugin's own layer tuples over a real slide; the files are read back by the readers the rest of the
plugin uses (MaskImage, read_geojson) and by tifffile, as QuPath and Bio-Formats would."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import real_slide

CMU = "CMU-1-Small-Region.svs"


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch):
    from napari_wsimil import settings

    monkeypatch.delenv("NAPARI_WSIMIL_TILE_CACHE_MB", raising=False)
    monkeypatch.delenv("NAPARI_WSIMIL_DEVICE", raising=False)
    settings.reset()
    yield
    monkeypatch.undo()
    settings.reset()


def test_settings_defaults_environment_and_one_line_errors(monkeypatch):
    from napari_wsimil import settings

    assert settings.current() == settings.Settings(256, "auto")
    monkeypatch.setenv("NAPARI_WSIMIL_TILE_CACHE_MB", "64")
    monkeypatch.setenv("NAPARI_WSIMIL_DEVICE", "cpu")
    assert settings.reset() == settings.Settings(64, "cpu")
    assert settings.update(default_device="cuda").tile_cache_mb == 64
    for bad, words in (({"tile_cache_mb": 3}, "from 16"), ({"tile_cache_mb": "lots"}, "whole number"),
                       ({"default_device": "tpu"}, "auto, cpu, cuda, mps"),
                       ({"cache": 1}, "unknown setting")):
        with pytest.raises(ValueError, match=words) as info:
            settings.update(**bad)
        assert "\n" not in str(info.value)
    assert settings.current() == settings.Settings(64, "cuda")  # a refused change changes nothing
    monkeypatch.setenv("NAPARI_WSIMIL_TILE_CACHE_MB", "a lot")
    with pytest.raises(ValueError, match="NAPARI_WSIMIL_TILE_CACHE_MB"):
        settings.from_environment()


def test_tile_cache_follows_the_setting():
    """The shared cache evicts down to the new size from the next tile on, without reopening slides."""
    from napari_wsimil import settings
    from napari_wsimil.slide.tile_cache import TileCache

    cache = TileCache()
    tile = np.zeros((1024, 1024), np.uint8)  # 1 MB
    for i in range(20):
        cache.get(("s", i), lambda: tile.copy())
    assert cache.nbytes == 20 * 2**20 and cache.max_bytes == 256 * 2**20
    settings.update(tile_cache_mb=16)
    cache.get(("s", 99), lambda: tile.copy())
    assert cache.max_bytes == 16 * 2**20 and cache.nbytes == 16 * 2**20
    assert TileCache(max_bytes=2**20).max_bytes == 2**20  # an explicit size ignores the setting


def test_sync_without_napari_settings_keeps_the_library_defaults(monkeypatch):
    from napari_wsimil import _plugin_settings, settings

    monkeypatch.setattr(_plugin_settings, "napari_plugin_settings", lambda: None)
    assert _plugin_settings.sync_from_napari() == settings.Settings(256, "auto")


def _slide_and_classes():
    from napari_wsimil.project.classes import ClassDef, default_classes
    from napari_wsimil.slide import open_slide

    return open_slide(real_slide(CMU)), default_classes() + [ClassDef(3, "stroma", "#4363d8")]


def test_labels_writer_round_trip_with_um_and_class_table(tmp_path):
    import tifffile

    from napari_wsimil._writer import write_labels_mask
    from napari_wsimil.project.mask_io import MaskImage
    from napari_wsimil.project_layers import labels_layer_data

    slide, classes = _slide_and_classes()
    ds = 8.0
    w, h = slide.dimensions
    labels = np.zeros((int(np.ceil(h / ds)), int(np.ceil(w / ds))), np.uint8)
    labels[10:60, 20:90] = 1
    labels[100:140, 5:300] = 3
    data, kwargs, kind = labels_layer_data(labels, ds, classes, slide, name="CMU labels")
    assert kind == "labels"
    [out] = write_labels_mask(str(tmp_path / "cmu.ome.tif"), data, kwargs)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome
        assert np.array_equal(tif.series[0].asarray(), labels)
        size = float(tif.ome_metadata.split('PhysicalSizeX="')[1].split('"')[0])
        assert size == pytest.approx(slide.mpp * ds)
    with MaskImage(tmp_path / "cmu.ome.tif") as mask:  # how `wsimil project import-mask` reads it
        assert mask.downsample == pytest.approx(ds) and mask.shape == labels.shape
        assert np.array_equal(mask.points(np.arange(labels.shape[0]), np.arange(labels.shape[1])), labels)
    with tifffile.TiffFile(out) as tif:
        ome = tif.ome_metadata
    text = ome.split("<Description>")[1].split("</Description>")[0].replace("&quot;", '"')
    meta = json.loads(text)["wsimil"]
    assert meta["mpp"] == pytest.approx(slide.mpp * ds)
    assert meta["slide_dimensions"] == [w, h]
    assert [(c["id"], c["name"]) for c in meta["classes"]] == [(c.id, c.name) for c in classes]


def test_labels_writer_refuses_what_is_no_mask(tmp_path):
    from napari_wsimil._writer import write_labels_mask
    from napari_wsimil.errors import ProjectError

    big = np.zeros((20, 20), np.int32)
    big[3, 3] = 300
    with pytest.raises(ProjectError, match="label 300") as info:
        write_labels_mask(str(tmp_path / "big.ome.tif"), big, {"name": "big"})
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ProjectError, match="3 dimensions"):
        write_labels_mask(str(tmp_path / "cube.ome.tif"), np.zeros((2, 4, 4), np.uint8), {"name": "cube"})


def test_shapes_writer_round_trip_as_qupath_geojson(tmp_path):
    napari_layers = pytest.importorskip("napari.layers")
    from shapely.geometry import Polygon

    from napari_wsimil._writer import write_shapes_geojson
    from napari_wsimil.project.annotations import Annotation, read_geojson
    from napari_wsimil.project_layers import annotations_layer_data

    slide, classes = _slide_and_classes()
    anns = [Annotation.box(100, 200, 900, 700, "tumour"),
            Annotation.polygon([(1000, 100), (1500, 150), (1300, 900)], "stroma", name="a stroma patch"),
            Annotation(Polygon([(50, 1000), (600, 1000), (600, 1400), (50, 1400)],
                               [[(200, 1100), (300, 1100), (300, 1200)]]), "normal")]
    data, kwargs, _ = annotations_layer_data(anns, classes, slide, name="CMU boxes")
    layer = napari_layers.Shapes(data, **kwargs)  # the state napari hands a writer, from a real layer
    ldata, state, _ = layer.as_layer_data_tuple()
    [out] = write_shapes_geojson(str(tmp_path / "cmu.geojson"), ldata, state)
    back = read_geojson(out)
    assert [(a.id, a.class_name, a.kind) for a in back] == [(a.id, a.class_name, a.kind) for a in anns]
    for a, b in zip(anns, back):
        assert b.geometry.exterior.equals_exact(a.geometry.exterior, 1e-2)  # float32 in napari
    doc = json.loads(open(out).read())
    assert doc["features"][1]["properties"]["classification"] == {"name": "stroma", "color": [67, 99, 216]}


def test_shapes_writer_plain_layer_in_pixels_and_unclassified(tmp_path):
    napari_layers = pytest.importorskip("napari.layers")
    from napari_wsimil._writer import write_shapes_geojson
    from napari_wsimil.project.annotations import UNCLASSIFIED, read_geojson

    layer = napari_layers.Shapes([np.array([[10, 20], [10, 60], [40, 60], [40, 20]]),
                                  np.array([[0, 0], [5, 5]])], shape_type=["rectangle", "line"],
                                 edge_color="red")
    ldata, state, _ = layer.as_layer_data_tuple()
    [out] = write_shapes_geojson(str(tmp_path / "plain.geojson"), ldata, state)
    [box] = read_geojson(out)  # the line encloses no area and is left out
    assert box.class_name == UNCLASSIFIED and box.kind == "box"
    assert box.geometry.bounds == pytest.approx((20.5, 10.5, 60.5, 40.5))  # pixel centres -> corners
    assert json.loads(open(out).read())["features"][0]["properties"]["classification"]["color"] == [255, 0, 0]
