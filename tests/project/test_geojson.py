"""QuPath GeoJSON: exact round trips, QuPath's variants, and validation before saving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shapely.geometry import MultiPolygon, Polygon

from napari_wsimil.project import UNCLASSIFIED, Annotation, Project, ProjectError, read_geojson, write_geojson

CLASSES = {"tumour": "#e6194b", "normal": "#3cb44b"}


def _shapes() -> list[Annotation]:
    holed = Polygon([(100.5, 100.25), (900, 100), (900, 800), (100, 800)],
                    [[(300, 300), (400, 300), (400, 400.125), (300, 400)]])
    multi = MultiPolygon([Polygon([(0, 0), (10, 0), (10, 10)]), Polygon([(20, 20), (30, 20), (30, 1 / 3)])])
    return [Annotation.box(10, 20, 30.5, 40, "tumour", name="box A"), Annotation(holed, "normal"),
            Annotation(multi, "tumour")]


def test_round_trip_exact(tmp_path: Path) -> None:
    anns = _shapes()
    path = write_geojson(tmp_path / "a.geojson", anns, CLASSES)
    back = read_geojson(path)
    assert back == anns  # dataclass equality: geometry (exact coordinates), class, kind, id, name
    for a, b in zip(anns, back):
        assert a.geometry.equals_exact(b.geometry, 0) and a.geometry.wkb == b.geometry.wkb
    doc = json.loads(path.read_text())
    props = doc["features"][0]["properties"]
    assert doc["type"] == "FeatureCollection" and doc["features"][0]["id"] == anns[0].id
    assert props["objectType"] == "annotation" and props["isLocked"] is False
    assert props["classification"] == {"name": "tumour", "color": [230, 25, 75]} and props["wsimil_kind"] == "box"
    assert doc["features"][1]["geometry"]["type"] == "Polygon" and len(doc["features"][1]["geometry"]["coordinates"]) == 2


def test_qupath_variants(tmp_path: Path) -> None:
    square = {"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [5, 5], [0, 5], [0, 0]]]}
    feats = [
        {"type": "Feature", "geometry": square, "properties": {"classification": {"name": "Tumor", "colorRGB": -3670016}}},
        {"type": "Feature", "geometry": square, "properties": {"objectType": "annotation"}},
        {"type": "Feature", "geometry": {"type": "GeometryCollection", "geometries": [square]},
         "properties": {"classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}}},
    ]
    (tmp_path / "list.json").write_text(json.dumps(feats))
    anns = read_geojson(tmp_path / "list.json")
    assert [a.class_name for a in anns] == ["Tumor", UNCLASSIFIED, "Tumor: Positive"]
    assert anns[0].color == "#c80000" and anns[2].color == "#010203"
    assert all(a.kind == "polygon" and a.geometry.area == 25 for a in anns)
    (tmp_path / "one.json").write_text(json.dumps(feats[0]))
    assert len(read_geojson(tmp_path / "one.json")) == 1


def test_unreadable_features_are_listed(tmp_path: Path) -> None:
    feats = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [0, 0]}, "properties": {}},
        {"type": "Feature", "geometry": None, "properties": {}},
    ]}
    (tmp_path / "bad.geojson").write_text(json.dumps(feats))
    with pytest.raises(ProjectError) as err:
        read_geojson(tmp_path / "bad.geojson")
    msg = str(err.value)
    assert "3 problems" in msg and "feature 1: a LineString" in msg and "feature 2: a Point" in msg and "feature 3" in msg
    (tmp_path / "x.geojson").write_text("{not json")
    with pytest.raises(ProjectError, match="not valid JSON"):
        read_geojson(tmp_path / "x.geojson")


def test_save_validates_everything_first(project: Project) -> None:
    good = [Annotation.box(10, 10, 50, 50, "tumour")]
    path = project.save_annotations("slide_000", good)
    before = path.read_bytes()
    bowtie = Polygon([(0, 0), (100, 100), (100, 0), (0, 100)])
    bad = [
        Annotation(bowtie, "tumour"),
        Annotation.box(0, 0, 10, 10, "stroma"),
        Annotation.box(3000, 3000, 3100, 3100, "normal"),
        Annotation.box(2000, 10, 2100, 20, "normal"),
        Annotation(Polygon([(0, 0), (10, 0), (0, 10)]), "normal", kind="box"),
        Annotation.box(10, 10, 20, 20, "unlabelled"),
    ]
    with pytest.raises(ProjectError) as err:
        project.save_annotations("slide_000", good + bad)
    msg = str(err.value)
    assert "6 problems" in msg
    assert "annotation 2: invalid outline (Self-intersection" in msg
    assert "annotation 3: class 'stroma' is not one of the project's classes (normal, tumour)" in msg
    assert "annotation 4: lies outside the slide" in msg and "annotation 5: extends beyond the slide" in msg
    assert "annotation 6: marked as a box" in msg and "annotation 7: class 'unlabelled' means no label" in msg
    assert path.read_bytes() == before  # nothing written
    assert project.annotations("slide_000") == good


def test_import_classes(project: Project, tmp_path: Path) -> None:
    anns = [Annotation.box(0, 0, 10, 10, "Tumor"), Annotation.box(5, 5, 20, 20, "tumour")]
    write_geojson(tmp_path / "q.geojson", anns, {"Tumor": "#c80000", "tumour": "#e6194b"})
    with pytest.raises(ProjectError, match=r"classes the project does not have: Tumor \(project classes: tumour, normal\)"):
        project.import_annotations("slide_001", tmp_path / "q.geojson")
    assert project.annotations("slide_001") == []
    got = project.import_annotations("slide_001", tmp_path / "q.geojson", add_missing_classes=True)
    assert project.class_by_name("Tumor").color == "#c80000"
    assert project.annotations("slide_001") == got == anns
    project.import_annotations("slide_001", tmp_path / "q.geojson", replace_existing=False)
    assert len(project.annotations("slide_001")) == 4
