"""``wsimil project export --format ome-zarr``: masks as OME-NGFF 0.4, the same pixels as the OME-TIFF export,
drawn shapes filled under the paint, the class table as ``image-label``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from napari_wsimil.cli import main
from napari_wsimil.io.ngff import read_ngff_levels
from napari_wsimil.project import Annotation, Project

from test_ngff import check_ngff04


def test_project_export_ome_zarr_matches_ome_tiff(project: Project, tmp_path: Path) -> None:
    sid = "slide_001"
    d = project.label_geometry(sid).downsample
    tumour = project.class_by_name("tumour")
    project.save_annotations(sid, [Annotation.box(0, 0, 60 * d, 40 * d, "tumour")])
    lab = np.zeros(project.label_geometry(sid).shape, np.uint8)
    lab[5:15, 5:25] = project.class_by_name("normal").id
    project.save_pixel_labels(sid, lab)
    root = project.root
    project.close()
    assert main(["project", "export", str(root), "--format", "ome-zarr", "--out", str(tmp_path / "z")]) == 0
    assert main(["project", "export", str(root), "--format", "ome-tiff", "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "z" / "classes.csv").is_file()
    store = tmp_path / "z" / f"{sid}.ome.zarr"
    with Project.open(root, readonly=True) as p:
        mpp = p.label_geometry(sid).mpp
        classes = p.classes
    attrs = check_ngff04(store, mpp)
    levels, _ = read_ngff_levels(store)
    tif = tifffile.imread(tmp_path / "t" / f"{sid}.ome.tif")
    np.testing.assert_array_equal(levels[0][:], tif)
    assert (levels[0][5:15, 5:25] == lab[5:15, 5:25]).all()  # paint wins
    assert (levels[0][30:40, 30:60] == tumour.id).all()  # the box is filled where not painted
    assert attrs["wsimil"]["slide_id"] == sid and attrs["multiscales"][0]["type"] == "nearest"
    assert {c["label-value"]: c["class"] for c in attrs["image-label"]["properties"]} == \
        {c.id: c.name for c in classes}
    # a slide without labels is an all-zero store, so the folder matches the cohort one to one
    assert sorted(x.name for x in (tmp_path / "z").glob("*.ome.zarr")) == [f"slide_00{i}.ome.zarr" for i in range(3)]
    empty, _ = read_ngff_levels(tmp_path / "z" / "slide_000.ome.zarr")
    assert not empty[0][:].any()
