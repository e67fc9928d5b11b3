"""Make a labelling project from a cohort CSV, paint labels and a box from code, export masks and outlines.

    python examples/02_project_paint_export.py [--workdir DIR]

Everything the labelling widgets do is this Python API; the project folder is what they save into.
"""

from _workdir import parse

from napari_wsimil.project import Project
from napari_wsimil.slide.synthetic import synthesize_cohort

args = parse(__doc__)
csv_path = synthesize_cohort(args.workdir / "cohort", 2, seed=1, size=2048)
with Project.create_from_csv(args.workdir / "project", csv_path) as project:
    sid = project.slide_ids[0]
    labels = project.pixel_labels(sid)  # uint8 class ids at the project's label resolution
    tumour, normal = project.class_by_name("tumour").id, project.class_by_name("normal").id
    labels[10:40, 10:40] = tumour
    labels[60:90, 60:90] = normal
    project.save_pixel_labels(sid, labels, dirty=[(10, 40, 10, 40), (60, 90, 60, 90)])
    print(f"{sid}: {int((labels > 0).sum())} labelled pixels at {project.label_mpp} µm/px")
    written = project.export_mask(sid, args.workdir / "masks" / f"{sid}.ome.tif")
    print(f"mask: {written}")
from napari_wsimil.cli import main  # the same from the command line

assert main(["project", "export", str(args.workdir / "project"), "--format", "geojson",
             "--out", str(args.workdir / "outlines")]) == 0
print(f"QuPath GeoJSON: {sorted(p.name for p in (args.workdir / 'outlines').iterdir())}")
