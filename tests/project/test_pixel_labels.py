"""Pixel labels: geometry, dirty-chunk saves, and importing mask images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_wsimil.project import LabelGeometry, Project, ProjectError
from napari_wsimil.io import raster_store as pl


def _plain_slide(path: Path, shape: tuple[int, int], mpp: float | None) -> Path:
    from napari_wsimil.slide.tiff_writer import write_image_pyramid

    rgb = np.full((*shape, 3), 230, np.uint8)
    write_image_pyramid(path, rgb, mpp=mpp)
    return path


def test_geometry(project: Project, tmp_path: Path) -> None:
    g = project.label_geometry("slide_000")
    assert g == LabelGeometry(8.0, 4.0, (256, 256))
    project.set_slide_mpp("slide_000", 0.25)
    assert project.label_geometry("slide_000") == LabelGeometry(16.0, 4.0, (128, 128))
    project.set_slide_mpp("slide_000", 10.0)  # coarser than the labels: use the slide's pixels
    g = project.label_geometry("slide_000")
    assert g.downsample == 1.0 and g.mpp == 10.0 and g.shape == (2048, 2048) and "coarser" in g.note
    odd = project.add_slide(_plain_slide(tmp_path / "odd.tiff", (1001, 1500), mpp=None))
    g = project.label_geometry(odd.slide_id)
    assert g.downsample == 8.0 and g.mpp is None and g.shape == (126, 188) and "fixed downsample of 8" in g.note
    assert project.pixel_labels(odd.slide_id).shape == (126, 188)


def test_saved_geometry_survives_mpp_change(project: Project) -> None:
    lab = project.pixel_labels("slide_000")
    lab[3, 4] = 2
    project.save_pixel_labels("slide_000", lab)
    project.set_slide_mpp("slide_000", 0.25)
    g = project.label_geometry("slide_000")
    assert g.downsample == 8.0 and g.shape == (256, 256) and g.mpp == 2.0 and "keep" in g.note
    assert project.pixel_labels("slide_000")[3, 4] == 2


def test_save_full_and_dirty(project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = project.add_slide(_plain_slide(tmp_path / "big.tiff", (3000, 2600), mpp=1.0))  # labels 750 x 650
    sid = big.slide_id
    assert project.label_geometry(sid).shape == (750, 650)
    lab = project.pixel_labels(sid)
    assert lab.dtype == np.uint8 and not lab.any() and not project.has_pixel_labels(sid)
    lab[100:200, 100:200] = 1
    written: list[Path] = []
    real = pl._durable_put
    monkeypatch.setattr(pl, "_durable_put", lambda path, data: (written.append(path), real(path, data)))
    project.save_pixel_labels(sid, lab)
    chunks = sorted(p.relative_to(project.root / "labels" / f"{sid}.zarr").as_posix() for p in written)
    assert chunks == ["c/0/0", "zarr.json"]  # empty chunks are not stored
    written.clear()
    lab[600:610, 600:640] = 2  # in chunk (1, 1)
    assert project.save_pixel_labels(sid, lab, dirty=[(600, 610, 600, 640)]) == 1
    assert [p.name for p in written] == ["1"] and written[0].parent.name == "1"
    written.clear()
    lab[500:520, 500:520] = 1  # straddles 4 chunks
    assert project.save_pixel_labels(sid, lab, dirty=[(500, 520, 500, 520), (-5, 0, 0, 3)]) == 4
    assert len(written) == 4
    # a chunk painted back to 0 disappears
    lab[:512, :512] = 0
    project.save_pixel_labels(sid, lab, dirty=[(0, 512, 0, 512)])
    assert not (project.root / "labels" / f"{sid}.zarr" / "c" / "0" / "0").exists()
    project.close()
    with Project.open(project.root) as p:
        assert np.array_equal(p.pixel_labels(sid), lab)


def test_save_refuses_bad_arrays(project: Project) -> None:
    with pytest.raises(ProjectError, match="must be 256 x 256"):
        project.save_pixel_labels("slide_000", np.zeros((10, 10), np.uint8))
    lab = np.zeros((256, 256), np.uint8)
    lab[0, 0] = 9
    with pytest.raises(ProjectError, match=r"not class ids: 9 \(1 px\)"):
        project.save_pixel_labels("slide_000", lab)
    with pytest.raises(ProjectError, match="not class ids"):
        project.save_pixel_labels("slide_000", lab, dirty=[(0, 1, 0, 1)])
    assert not project.has_pixel_labels("slide_000")
    project.save_pixel_labels("slide_000", np.ones((256, 256), np.int64))  # integer arrays are accepted
    assert project.pixel_labels("slide_000").all()
    with pytest.raises(ProjectError, match="class ids"):
        project.save_pixel_labels("slide_000", np.zeros((256, 256), np.float32))


def test_import_gt_tiff(project: Project, cohort: Path) -> None:
    import tifffile

    for rec in project.slides:
        counts = project.import_mask(rec.slide_id, cohort.parent / f"{rec.slide_id}_gt.tiff")
        gt = tifffile.imread(cohort.parent / f"{rec.slide_id}_gt.tiff")
        assert np.array_equal(project.pixel_labels(rec.slide_id), gt)  # downsample 8 = label resolution
        assert counts.get("tumour", 0) == int(gt.sum())


def test_import_png_other_downsample_and_values(project: Project, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 2, (64, 64)).astype(np.uint8) * 255  # downsample 32, 0/255
    Image.fromarray(coarse).save(tmp_path / "m.png")
    with pytest.raises(ProjectError, match=r"255 .*values=\{mask_value: class_id\}"):
        project.import_mask("slide_000", tmp_path / "m.png")
    assert not project.has_pixel_labels("slide_000")  # nothing written
    project.import_mask("slide_000", tmp_path / "m.png", values={255: 2})
    expected = np.repeat(np.repeat(coarse // 255 * 2, 4, 0), 4, 1)
    assert np.array_equal(project.pixel_labels("slide_000"), expected)
    # a finer mask (downsample 2) given explicitly
    fine = np.zeros((1024, 1024), np.uint8)
    fine[100:300, 40:50] = 1
    tif = tmp_path / "fine.tif"
    import tifffile

    tifffile.imwrite(tif, fine, tile=(256, 256), compression="zlib")
    project.import_mask("slide_000", tif, downsample=2)
    lab = project.pixel_labels("slide_000")
    # label pixel i samples fine pixel floor((i + 0.5) * 4) = 4i + 2
    assert np.array_equal(lab, fine[2::4, 2::4])


def test_import_refuses_wrong_masks(project: Project, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((100, 300), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(ProjectError, match=r"300 x 100 px \(aspect 3.000\) but the slide is 2048 x 2048"):
        project.import_mask("slide_000", tmp_path / "wide.png")
    Image.fromarray(np.zeros((200, 200), np.uint8)).save(tmp_path / "sq.png")
    with pytest.raises(ProjectError, match=r"about 256 x 256 px \(w x h\), but the mask is 200 x 200"):
        project.import_mask("slide_000", tmp_path / "sq.png", downsample=8)
    Image.fromarray(np.zeros((256, 256, 3), np.uint8) + np.array([0, 1, 2], np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ProjectError, match="colour image"):
        project.import_mask("slide_000", tmp_path / "rgb.png")
    with pytest.raises(ProjectError, match="does not exist"):
        project.import_mask("slide_000", tmp_path / "none.tif")
    (tmp_path / "junk.tif").write_bytes(b"nope")
    with pytest.raises(ProjectError, match="cannot read mask junk.tif"):
        project.import_mask("slide_000", tmp_path / "junk.tif")
    # rounding: a 257-px mask of a 2048-px slide at downsample 8 is within a pixel
    Image.fromarray(np.ones((257, 257), np.uint8)).save(tmp_path / "r.png")
    project.import_mask("slide_000", tmp_path / "r.png", downsample=8)
    assert project.pixel_labels("slide_000").all()


def test_import_reads_tiled_masks_band_by_band(project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tifffile

    from napari_wsimil.project import mask_io

    mask = (np.arange(256 * 256).reshape(256, 256) % 3).astype(np.uint8)
    tifffile.imwrite(tmp_path / "t.tif", mask, tile=(64, 64), compression="zlib")
    monkeypatch.setattr(mask_io.MaskImage, "_load_whole", lambda self: pytest.fail("whole mask decoded"))
    project.import_mask("slide_000", tmp_path / "t.tif")
    assert np.array_equal(project.pixel_labels("slide_000"), mask)


def test_dirty_chunks_helper() -> None:
    assert pl.dirty_chunks([(0, 1, 0, 1)], (1000, 1000)) == {(0, 0)}
    assert pl.dirty_chunks([(511, 513, 1023, 1100)], (1000, 1100)) == {(0, 1), (1, 1), (0, 2), (1, 2)}
    assert pl.dirty_chunks([(5, 5, 0, 10), (2000, 3000, 0, 1)], (1000, 1000)) == set()
    with pytest.raises(ProjectError, match="y0, y1, x0, x1"):
        pl.dirty_chunks([(1, 2)], (10, 10))
