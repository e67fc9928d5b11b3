"""Exports: OME-TIFF and PNG masks (exact round trips, tile-wise), GeoJSON for every slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.project import Annotation, Project, ProjectError, export_mask, export_project, read_geojson


def _paint(project: Project, sid: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = project.label_geometry(sid).shape
    lab = np.zeros((h, w), np.uint8)
    for _ in range(30):
        y, x = rng.integers(0, h), rng.integers(0, w)
        lab[y:y + rng.integers(1, h // 4), x:x + rng.integers(1, w // 4)] = rng.integers(1, 3)
    project.save_pixel_labels(sid, lab)
    return lab


def test_ome_tiff_round_trip_and_metadata(project: Project, tmp_path: Path) -> None:
    import tifffile

    lab = _paint(project, "slide_001")
    out = export_mask(project, "slide_001", tmp_path / "m.ome.tif")
    with tifffile.TiffFile(out) as tf:
        assert tf.is_ome and tf.series[0].dtype == np.uint8 and tf.series[0].shape == lab.shape
        assert 'PhysicalSizeX="4.0"' in tf.ome_metadata and 'PhysicalSizeXUnit="µm"' in tf.ome_metadata
        assert tf.pages[0].is_tiled and tf.pages[0].compression == 8  # zlib
        assert np.array_equal(tf.series[0].asarray(), lab)
    project.import_mask("slide_002", out)
    assert np.array_equal(project.pixel_labels("slide_002"), lab)


def test_ome_tiff_pyramid_with_odd_downsample(cohort: Path, tmp_path: Path) -> None:
    import tifffile

    # 0.5 µm/px slide, labels at 0.6 µm/px: downsample 1.2, labels 1707 x 1707 -> a 2-level pyramid
    with Project.create(tmp_path / "fine", label_mpp=0.6) as p:
        sid = p.add_slide(cohort.parent / "slide_000.tiff").slide_id
        g = p.label_geometry(sid)
        assert g.shape == (1707, 1707) and abs(g.downsample - 1.2) < 1e-12
        lab = _paint(p, sid, seed=3)
        out = p.export_mask(sid, tmp_path / "f.ome.tif")
        with tifffile.TiffFile(out) as tf:
            levels = tf.series[0].levels
            assert [lv.shape for lv in levels] == [(1707, 1707), (854, 854)]
            assert len(tf.pages) == 1 and tf.pages[0].subifds  # reduced level is a SubIFD
            centres = np.minimum(np.arange(854) * 2 + 1, 1706)  # nearest at pixel centres, clipped at the edge
            assert np.array_equal(levels[1].asarray(), lab[np.ix_(centres, centres)])
        p.save_pixel_labels(sid, np.zeros_like(lab))
        p.import_mask(sid, out)
        assert np.array_equal(p.pixel_labels(sid), lab)


def test_png_round_trips(project: Project, tmp_path: Path) -> None:
    from PIL import Image

    lab = _paint(project, "slide_000", seed=1)
    png = export_mask(project, "slide_000", tmp_path / "m.png", format="png")
    im = Image.open(png)
    assert im.mode == "L" and np.array_equal(np.asarray(im), lab)
    assert abs(25400 / im.info["dpi"][0] - 4.0) < 1e-9
    fine = export_mask(project, "slide_000", tmp_path / "fine.png", format="png", mpp=1.0)
    arr = np.asarray(Image.open(fine))
    assert arr.shape == (1024, 1024) and np.array_equal(arr, np.repeat(np.repeat(lab, 4, 0), 4, 1))
    coarse = export_mask(project, "slide_000", tmp_path / "coarse.png", format="png", mpp=16.0)
    assert np.array_equal(np.asarray(Image.open(coarse)), lab[2::4, 2::4])
    for f in (png, fine):
        project.import_mask("slide_002", f)
        assert np.array_equal(project.pixel_labels("slide_002"), lab)
    with pytest.raises(ProjectError, match="positive"):
        export_mask(project, "slide_000", tmp_path / "x.png", format="png", mpp=-1)


def test_export_is_tile_wise(project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_wsimil.io.raster_store import LabelStore

    lab = _paint(project, "slide_001")
    monkeypatch.setattr(LabelStore, "read", lambda self: pytest.fail("whole label array read"))
    import napari_wsimil.slide as slide_mod

    monkeypatch.setattr(slide_mod, "open_slide", lambda *a, **k: pytest.fail("slide opened"))
    for fmt in ("ome-tiff", "png"):
        export_mask(project, "slide_001", tmp_path / f"m.{fmt}", format=fmt)
    monkeypatch.undo()
    project.import_mask("slide_000", tmp_path / "m.ome-tiff")
    assert np.array_equal(project.pixel_labels("slide_000"), lab)


def test_export_project(project: Project, tmp_path: Path) -> None:
    anns = [Annotation.box(1.5, 2.25, 100, 200, "tumour"), Annotation.polygon([(5, 5), (50, 7), (20, 40)], "normal")]
    project.save_annotations("slide_002", anns)
    lab = _paint(project, "slide_002")
    paths = export_project(project, tmp_path / "gj", format="geojson")
    assert [p.name for p in paths] == ["slide_000.geojson", "slide_001.geojson", "slide_002.geojson"]
    assert read_geojson(paths[2]) == anns and read_geojson(paths[0]) == []
    paths = export_project(project, tmp_path / "ome", format="ome-tiff", pixels_only=True)
    assert [p.name for p in paths] == [f"slide_00{i}.ome.tif" for i in range(3)]
    assert (tmp_path / "ome" / "classes.csv").read_text().splitlines()[1] == "0,unlabelled,#000000"
    project.import_mask("slide_000", paths[2])
    assert np.array_equal(project.pixel_labels("slide_000"), lab)  # painted pixels alone: an exact round trip
    import tifffile

    drawn = tifffile.imread(export_project(project, tmp_path / "all", format="ome-tiff")[2])
    assert np.array_equal(drawn[lab > 0], lab[lab > 0])  # the paint wins; the box and triangle fill the rest
    assert (drawn[lab == 0] > 0).any() and not (drawn[20:, 20:][lab[20:, 20:] == 0] > 0).any()
    assert len(export_project(project, tmp_path / "png", format="png", mpp=8.0)) == 3
    with pytest.raises(ProjectError, match="format"):
        export_project(project, tmp_path / "x", format="jpeg")  # type: ignore[arg-type]


def test_masks_fill_drawn_shapes_under_the_paint(project: Project, tmp_path: Path) -> None:
    """A slide labelled only with QuPath polygons and boxes exports them filled (as QuPath's labelled-image
    export does); painted pixels win where both are; holes stay open; --pixels-only keeps the paint alone."""
    import tifffile
    from shapely.geometry import Polygon, box

    from napari_wsimil.cli import main

    sid = "slide_002"
    d = project.label_geometry(sid).downsample
    tumour, normal = project.class_by_name("tumour").id, project.class_by_name("normal").id
    ring = Polygon([(0, 0), (80 * d, 0), (80 * d, 80 * d), (0, 80 * d)],
                   holes=[[(30 * d, 30 * d), (50 * d, 30 * d), (50 * d, 50 * d), (30 * d, 50 * d)]])
    project.save_annotations(sid, [Annotation(ring, "tumour"), Annotation(box(100 * d, 0, 140 * d, 20 * d),
                                                                            "normal", kind="box")])
    lab = np.zeros(project.label_geometry(sid).shape, np.uint8)
    lab[0:10, 0:10] = normal  # paint over the polygon's corner
    project.save_pixel_labels(sid, lab)

    mask = tifffile.imread(export_mask(project, sid, tmp_path / "m.ome.tif"))
    assert (mask[0:10, 0:10] == normal).all()  # the paint wins
    assert (mask[12:28, 12:78] == tumour).all() and (mask[32:48, 32:48] == 0).all()  # filled, hole open
    assert (mask[2:18, 102:138] == normal).all() and (mask[85:, :] == 0).all()
    assert abs(int((mask == tumour).sum()) - (80 * 80 - 20 * 20 - 100)) <= 2 * 80  # area, up to the edge pixels
    alone = tifffile.imread(export_mask(project, sid, tmp_path / "p.ome.tif", pixels_only=True))
    assert np.array_equal(alone, lab)

    project.close()
    out = tmp_path / "cli"
    assert main(["project", "export", str(project.root), "--format", "png", "--out", str(out)]) == 0
    assert main(["project", "export", str(project.root), "--format", "png", "--out", str(out / "px"),
                 "--pixels-only"]) == 0
    from PIL import Image

    assert (np.asarray(Image.open(out / f"{sid}.png"))[12:28, 12:78] == tumour).all()
    assert np.array_equal(np.asarray(Image.open(out / "px" / f"{sid}.png")), lab)
