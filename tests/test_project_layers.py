"""Project layers without a viewer: labels overlay the slide, annotations <-> shapes round-trip exactly."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest

from conftest import real_slide

shapely = pytest.importorskip("shapely")
project_mod = pytest.importorskip("napari_wsimil.project")

from napari_wsimil.project import Annotation, ClassDef, Project  # noqa: E402
from napari_wsimil.project_layers import (  # noqa: E402
    annotations_layer_data,
    class_colormap,
    labels_layer_data,
    level0_to_world,
    paint_bbox,
    project_slide_layers,
    shapes_to_annotations,
    world_to_level0,
)

CLASSES = [ClassDef(0, "unlabelled", "#000000"), ClassDef(1, "tumour", "#e6194b"),
           ClassDef(2, "normal", "#3cb44b")]


@pytest.fixture
def slide():
    return SimpleNamespace(mpp=0.5, dimensions=(4000, 3000), path=Path("fake.svs"))


def test_colormap_hides_unlabelled():
    cmap = class_colormap(CLASSES)
    assert cmap[0] == "transparent" and cmap[None] == "transparent"
    assert cmap[1] == "#e6194b" and cmap[2] == "#3cb44b"


def test_labels_overlay_transform_puts_label_pixels_over_their_level0_pixels(slide):
    labels = np.zeros((375, 500), np.uint8)
    data, kwargs, kind = labels_layer_data(labels, 8.0, CLASSES, slide)
    assert kind == "labels" and data.dtype == np.uint8 and data.flags.writeable and data is not labels
    assert kwargs["scale"] == (4.0, 4.0)  # 0.5 µm/px × 8
    # label pixel j covers level-0 px 8j … 8j+7, whose centres are at world 0.5·(8j … 8j+7)
    j = 10
    centre = kwargs["translate"][0] + j * kwargs["scale"][0]
    assert centre == pytest.approx(0.5 * (8 * j + 3.5))
    assert kwargs["colormap"][1] == "#e6194b"


def test_world_level0_conversion_uses_pixel_corners(slide):
    # level-0 corner (0, 0) is half a pixel up-left of pixel 0's centre, which napari puts at world 0
    assert np.allclose(level0_to_world(np.array([[0.0, 0.0]]), slide), [[-0.25, -0.25]])
    xy = np.array([[10.0, 20.0], [123.25, 7.5]])
    assert np.allclose(world_to_level0(level0_to_world(xy, slide), slide), xy)
    # (y, x) in the world, (x, y) in level-0 px
    assert np.allclose(level0_to_world(np.array([[100.5, 0.5]]), slide), [[0.0, 50.0]])


def test_boxes_and_polygons_round_trip_exactly(slide):
    anns = [
        Annotation.box(100, 200, 300, 260, "tumour"),
        Annotation.polygon([(1000, 1000), (1200, 1010), (1100, 1300)], "normal", name="gland"),
    ]
    data, kwargs, kind = annotations_layer_data(anns, CLASSES, slide)
    assert kind == "shapes" and kwargs["shape_type"] == ["rectangle", "polygon"]
    assert list(kwargs["features"]["class"]) == ["tumour", "normal"]
    assert kwargs["edge_color"] == ["#e6194b", "#3cb44b"]
    y, x = data[0][:, 0], data[0][:, 1]
    assert (x.min(), x.max(), y.min(), y.max()) == pytest.approx((49.75, 149.75, 99.75, 129.75))
    # unchanged shapes give back the very same annotations (ids, names, exact coordinates)
    out, skipped, ids = shapes_to_annotations(data, kwargs["shape_type"], kwargs["features"]["class"], slide,
                                              ids=kwargs["features"]["id"], originals=anns)
    assert out == anns and not skipped and ids == [a.id for a in anns]
    # without originals: same geometry and classes, the box stays a box
    out, _, _ = shapes_to_annotations(data, kwargs["shape_type"], kwargs["features"]["class"], slide)
    assert [a.kind for a in out] == ["box", "polygon"]
    assert out[0].geometry.equals_exact(anns[0].geometry, 1e-9)
    assert out[1].geometry.equals_exact(anns[1].geometry, 1e-9)


def test_edited_shape_keeps_id_and_name(slide):
    ann = Annotation.polygon([(1000, 1000), (1200, 1010), (1100, 1300)], "normal", name="gland")
    data, kwargs, _ = annotations_layer_data([ann], CLASSES, slide)
    moved = [data[0] + 10.0]
    out, _, _ = shapes_to_annotations(moved, ["polygon"], ["tumour"], slide, ids=[ann.id], originals=[ann])
    assert out[0].id == ann.id and out[0].name == "gland" and out[0].class_name == "tumour"
    assert out[0].geometry.centroid.x == pytest.approx(ann.geometry.centroid.x + 20.0)


def test_multipolygon_and_holes_survive_unless_edited(slide):
    from shapely.geometry import MultiPolygon, Polygon

    holed = Polygon([(0, 0), (100, 0), (100, 100), (0, 100)], [[(40, 40), (60, 40), (60, 60), (40, 60)]])
    multi = MultiPolygon([Polygon([(200, 200), (300, 200), (300, 300)]),
                          Polygon([(500, 500), (600, 500), (600, 600)])])
    anns = [Annotation(holed, "tumour"), Annotation(multi, "normal")]
    data, kwargs, _ = annotations_layer_data(anns, CLASSES, slide)
    assert len(data) == 3  # outline of the holed polygon + two parts
    ids = list(kwargs["features"]["id"])
    out, _, shape_ids = shapes_to_annotations(data, kwargs["shape_type"], kwargs["features"]["class"], slide,
                                              ids=ids, originals=anns)
    assert out == anns and shape_ids == ids
    data[2] = data[2] + 5.0  # edit one part: the annotation stays one MultiPolygon with the same id
    out, _, _ = shapes_to_annotations(data, kwargs["shape_type"], kwargs["features"]["class"], slide,
                                      ids=ids, originals=anns)
    assert out[1].id == anns[1].id and out[1].geometry.geom_type == "MultiPolygon"


def test_pasted_copy_gets_its_own_id(slide):
    ann = Annotation.box(10, 10, 50, 50, "tumour")
    data, kwargs, _ = annotations_layer_data([ann], CLASSES, slide)
    out, _, ids = shapes_to_annotations([data[0], data[0] + 100], ["rectangle"] * 2, ["tumour"] * 2, slide,
                                        ids=[ann.id, ann.id], originals=[ann])
    assert out[0] == ann and out[1].id != ann.id and len(set(ids)) == 2


def test_awkward_shapes(slide):
    rect = np.array([[0.0, 10.0], [10.0, 20.0], [20.0, 10.0], [10.0, 0.0]]) + 100  # a rotated rectangle
    ellipse = np.array([[100.0, 100.0], [100.0, 140.0], [120.0, 140.0], [120.0, 100.0]])
    bowtie = np.array([[300.0, 300.0], [340.0, 340.0], [300.0, 340.0], [340.0, 300.0]])
    line = np.array([[0.0, 0.0], [50.0, 50.0]])
    outside = np.array([[-100.0, -100.0], [-100.0, 100.0], [100.0, 100.0], [100.0, -100.0]])
    out, skipped, ids = shapes_to_annotations(
        [rect, ellipse, bowtie, line, outside], ["rectangle", "ellipse", "polygon", "line", "rectangle"],
        ["tumour"] * 5, slide)
    kinds = [a.kind for a in out]
    assert kinds == ["polygon", "polygon", "polygon", "box"]
    area_um2 = out[1].geometry.area * 0.25
    assert area_um2 == pytest.approx(np.pi * 10 * 20, rel=0.01)
    assert out[2].geometry.is_valid
    assert ids[3] is None and any("line" in m for m in skipped)
    # clipped to the slide: the box starts at the slide's corner
    assert out[3].geometry.bounds[:2] == (0.0, 0.0)


def test_paint_bbox():
    atoms = [((np.array([5, 7]), np.array([10, 3])), None, 1), ((np.array([2]), np.array([8])), None, 1)]
    assert paint_bbox(atoms) == (2, 8, 3, 11)
    assert paint_bbox([]) is None


class _MaskedAtom(NamedTuple):  # the fields of napari >= 0.8's Labels history atoms (paint, fill, polygon)
    slice_key: tuple
    mask: np.ndarray | None
    old_values: np.ndarray
    new_value: int


def test_paint_bbox_masked_atoms():
    mask = np.zeros((6, 8), bool)
    mask[2, 3] = mask[4, 6] = True
    masked = _MaskedAtom((slice(10, 16), slice(20, 28)), mask, np.zeros(2, np.uint8), 1)
    assert paint_bbox([masked]) == (12, 15, 23, 27)  # the changed pixels, not the whole box
    whole = _MaskedAtom((slice(0, 1), slice(5, 9), slice(1, 4)), None, np.zeros((1, 4, 3)), 2)
    assert paint_bbox([whole]) == (5, 9, 1, 4)  # no mask: every pixel of the box; leading axes ignored
    assert paint_bbox([_MaskedAtom((slice(0, 4), slice(0, 4)), np.zeros((4, 4), bool), np.zeros(0), 1)]) is None
    # a plain 4-tuple of the same shape, and both kinds in one history item
    assert paint_bbox([tuple(masked), ((np.array([30]), np.array([1])), None, 1)]) == (12, 31, 1, 27)


def test_paint_bbox_of_real_napari_paint_events():
    labels_cls = pytest.importorskip("napari.layers").Labels
    layer = labels_cls(np.zeros((64, 64), np.uint8))
    items = []
    layer.events.paint.connect(lambda e: items.append(e.value))
    layer.brush_size = 5
    layer.paint((20, 30), 1)
    layer.paint_polygon([[40, 5], [40, 15], [50, 15], [50, 5]], 2)
    layer.fill((0, 0), 3)
    assert len(items) == 3
    before = np.zeros((64, 64), np.uint8)
    after = np.asarray(layer.data)
    changed = np.zeros((64, 64), bool)
    for item in items:
        box = paint_bbox(item)
        assert box is not None
        y0, y1, x0, x1 = box
        changed[y0:y1, x0:x1] = True
    assert changed[after != before].all()  # every changed pixel lies in a reported box
    y0, y1, x0, x1 = paint_bbox(items[0])
    assert (y0, x0) >= (17, 27) and (y1, x1) <= (24, 34)  # a 5 px brush at (20, 30)


def test_project_slide_layers_line_up(tmp_path):
    p = Project.create(tmp_path / "proj")
    try:
        rec = p.add_slide(real_slide("CMU-1-Small-Region.svs"))
        slide = p.open_slide(rec.slide_id)
        g = p.label_geometry(rec.slide_id)
        image, labels, shapes = project_slide_layers(p, rec.slide_id, slide)
        assert image[2] == "image" and labels[2] == "labels" and shapes[2] == "shapes"
        assert labels[0].shape == tuple(g.shape)
        assert labels[1]["scale"][0] == pytest.approx(g.mpp)
        # labels cover the slide: same physical size to within one label pixel
        w, h = slide.dimensions
        assert labels[0].shape[0] * g.mpp == pytest.approx(h * slide.mpp, abs=g.mpp)
        assert labels[0].shape[1] * g.mpp == pytest.approx(w * slide.mpp, abs=g.mpp)
        for _, kw, _ in (image, labels, shapes):
            assert kw["metadata"]["wsimil"]["project_slide"] == rec.slide_id
        slide.close()
    finally:
        p.close()


def test_project_layers_import_no_qt():
    import subprocess
    import sys

    code = ("import sys, napari_wsimil.project_layers, napari_wsimil.project;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('qtpy','PyQt6','napari','vispy')];"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
