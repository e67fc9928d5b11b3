"""OME-Zarr (NGFF 0.4) stores: read back with zarr, and their metadata checked by hand against the 0.4
specification (https://ngff.openmicroscopy.org/0.4/): ome-zarr-py is not installed, so the rules a reader
relies on are spelled out here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from napari_wsimil.io.ngff import level_shapes, read_ngff_levels, write_ngff

SPACE_UNITS = {"angstrom", "attometer", "centimeter", "decimeter", "exameter", "femtometer", "foot", "gigameter",
               "hectometer", "inch", "kilometer", "megameter", "meter", "micrometer", "mile", "millimeter",
               "nanometer", "parsec", "petameter", "picometer", "terameter", "yard", "yoctometer", "yottameter",
               "zeptometer", "zettameter"}


def check_ngff04(path: Path, mpp: float | None) -> dict[str, Any]:
    """Every MUST of NGFF 0.4's multiscales section that applies to a 2-D image; returns the root attrs."""
    assert json.loads((path / ".zgroup").read_text())["zarr_format"] == 2
    attrs = json.loads((path / ".zattrs").read_text())
    ms = attrs["multiscales"]
    assert isinstance(ms, list) and len(ms) == 1
    m = ms[0]
    assert m["version"] == "0.4"
    axes = m["axes"]
    assert 2 <= len(axes) <= 5
    assert [a["name"] for a in axes] == ["y", "x"]  # space axes last, in zyx order
    for a in axes:
        assert a["type"] == "space"
        if mpp is not None:
            assert a["unit"] == "micrometer" and a["unit"] in SPACE_UNITS
        else:
            assert "unit" not in a
    datasets = m["datasets"]
    assert len(datasets) >= 1
    prev = None
    for d in datasets:
        ts = d["coordinateTransformations"]
        assert [t["type"] for t in ts] == ["scale"]  # exactly one scale, optionally then one translation
        scale = ts[0]["scale"]
        assert len(scale) == len(axes) and all(s > 0 for s in scale)
        zarray = json.loads((path / d["path"] / ".zarray").read_text())
        assert zarray["zarr_format"] == 2 and zarray["dimension_separator"] == "/"
        assert len(zarray["shape"]) == len(axes)
        if prev is not None:  # finest first: scales grow, shapes shrink
            assert all(s > p for s, p in zip(scale, prev[0]))
            assert all(n <= p for n, p in zip(zarray["shape"], prev[1]))
        prev = (scale, zarray["shape"])
    if mpp is not None:
        assert datasets[0]["coordinateTransformations"][0]["scale"] == pytest.approx([mpp, mpp])
    return attrs


def test_level_shapes_keep_the_last_row() -> None:
    assert level_shapes((1500, 2101), 512) == [(1500, 2101), (750, 1051), (375, 526), (188, 263)]
    assert level_shapes((100, 100), 512) == [(100, 100)]


def test_mask_store_reads_back_with_scales_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, size=(1300, 1700)).astype(np.uint8)
    calls: list[tuple[int, int]] = []

    def band(y0: int, y1: int) -> np.ndarray:
        calls.append((y0, y1))
        return mask[y0:y1]

    classes = [{"id": 1, "name": "tumour", "color": "#ff0000"}, {"id": 2, "name": "stroma", "color": "#00ff80"}]
    path = write_ngff(tmp_path / "s1.ome.zarr", mask.shape, band, mpp=2.0, name="s1", classes=classes,
                      attrs={"wsimil": {"slide_id": "s1"}})
    assert max(y1 - y0 for y0, y1 in calls) <= 512  # level 0 came in bands, never whole
    attrs = check_ngff04(path, 2.0)
    assert attrs["wsimil"] == {"slide_id": "s1"}
    lab = attrs["image-label"]
    assert lab["version"] == "0.4"
    assert lab["colors"] == [{"label-value": 1, "rgba": [255, 0, 0, 255]}, {"label-value": 2, "rgba": [0, 255, 128, 255]}]
    assert lab["properties"][0] == {"label-value": 1, "class": "tumour"}
    levels, _ = read_ngff_levels(path)
    assert [lv.shape for lv in levels] == [(1300, 1700), (650, 850), (325, 425)]
    np.testing.assert_array_equal(levels[0][:], mask)
    np.testing.assert_array_equal(levels[1][:], mask[::2, ::2])  # labels stay labels
    np.testing.assert_array_equal(levels[2][:], mask[::4, ::4])
    scales = [d["coordinateTransformations"][0]["scale"] for d in attrs["multiscales"][0]["datasets"]]
    assert scales == [[2.0, 2.0], [4.0, 4.0], [8.0, 8.0]]
    # the same physical extent at every level (within a pixel)
    for lv, s in zip(levels, scales):
        assert lv.shape[0] * s[0] == pytest.approx(1300 * 2.0, abs=s[0])
    # plain zarr reads it too
    g = zarr.open_group(str(path), mode="r")
    assert g["1"].dtype == np.uint8 and g["0"].chunks == (512, 512)


def test_probability_map_mean_levels_and_unknown_size(tmp_path: Path) -> None:
    img = np.arange(600 * 1100, dtype=np.float64).reshape(600, 1100) % 251
    img = img.astype(np.uint8)
    path = write_ngff(tmp_path / "m.ome.zarr", img.shape, lambda a, b: img[a:b], mpp=None, name="m",
                      resample="mean")
    check_ngff04(path, None)
    levels, attrs = read_ngff_levels(path)
    assert attrs["multiscales"][0]["type"] == "mean" and "image-label" not in attrs
    expect = np.floor(img.astype(np.float64).reshape(300, 2, 550, 2).mean(axis=(1, 3)) + 0.5)
    np.testing.assert_array_equal(levels[1][:], expect.astype(np.uint8))


def test_rewrite_replaces_whole_and_a_failed_write_keeps_the_old(tmp_path: Path) -> None:
    target = tmp_path / "x.ome.zarr"
    write_ngff(target, (10, 10), lambda a, b: np.full((b - a, 10), 7, np.uint8), mpp=1.0, name="x")

    def broken(a: int, b: int) -> np.ndarray:
        raise OSError("disk gone")

    with pytest.raises(OSError):
        write_ngff(target, (10, 10), broken, mpp=1.0, name="x")
    levels, _ = read_ngff_levels(target)
    assert (levels[0][:] == 7).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ome.zarr"]  # no temporary left
    write_ngff(target, (20, 20), lambda a, b: np.ones((b - a, 20), np.uint8), mpp=1.0, name="x")
    levels, _ = read_ngff_levels(target)
    assert levels[0].shape == (20, 20) and (levels[0][:] == 1).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ome.zarr"]
