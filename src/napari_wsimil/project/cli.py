"""``wsimil project …``: create a project from a cohort CSV, export its cohort and labels, describe it.

``register(subparsers)`` adds the ``project`` command to the main ``wsimil`` parser (see
``napari_wsimil/cli.py``): each sub-subcommand sets ``func``, which returns the exit status; a
``WsimilError`` (``ProjectError`` is one) is printed by ``cli.main`` as one line with exit status 2.
Commands that only read (``info``, ``export``, ``export-csv``) open the project read-only, so they
work while the project is open in napari.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``project`` and its subcommands to an ``add_subparsers()`` object; returns its parser."""
    p = subparsers.add_parser(
        "project", help="create, inspect and export project folders (cohort, labels, annotations)",
        description="Project folders hold a cohort of slides with slide-level labels, pixel labels and "
                    "annotations (QuPath GeoJSON).")
    sub = p.add_subparsers(dest="project_command", metavar="SUBCOMMAND")
    p.set_defaults(func=_cmd_help, _parser=p)

    c = sub.add_parser(
        "create", help="create a project from a cohort CSV",
        description="Create a project in DIR from a cohort CSV (columns slide_id,path,label and optionally split, "
                    "mpp, pixel_labels, pixel_labels_downsample, annotations, gt_mask, gt_downsample; paths relative "
                    "to the CSV). Every row is checked first; nothing is written if any is wrong.")
    c.add_argument("dir", metavar="DIR", help="project folder (created if missing)")
    c.add_argument("--from-csv", required=True, metavar="CSV", help="cohort CSV, e.g. from `wsimil synth`")
    c.add_argument("--label-mpp", type=float, default=4.0, metavar="M",
                   help="µm per pixel of pixel labels (default 4)")
    c.add_argument("--name", default=None, help="project name (default: the folder's name)")
    c.add_argument("--slide-classes", default="benign,malignant", metavar="A,B",
                   help="slide-level label names, comma-separated; CSV label k means the k-th "
                        "(default benign,malignant)")
    c.set_defaults(func=_cmd_create)

    e = sub.add_parser("export-csv", help="write the project's cohort as CSV",
                       description="Write the cohort CSV (slide_id,path,label,split,…; paths relative to the CSV).")
    e.add_argument("dir", metavar="DIR", help="project folder")
    e.add_argument("--out", default=None, metavar="CSV", help="output file (default: DIR/cohort.csv)")
    e.add_argument("--masks", action="store_true",
                   help="also export pixel labels as OME-TIFF beside the CSV and list them, for a full round trip")
    e.set_defaults(func=_cmd_export_csv)

    x = sub.add_parser("export", help="export every slide's annotations or pixel labels",
                       description="Export annotations as QuPath GeoJSON, or masks of class ids (pyramidal OME-TIFF, "
                                   "OME-Zarr or PNG, legend in classes.csv): drawn polygons and boxes filled, painted "
                                   "pixels over them; one file per slide.")
    x.add_argument("dir", metavar="DIR", help="project folder")
    x.add_argument("--format", required=True, choices=("geojson", "ome-tiff", "ome-zarr", "png"),
                   help="geojson (QuPath annotations), ome-tiff or png (masks), ome-zarr (masks as OME-NGFF 0.4)")
    x.add_argument("--out", required=True, metavar="OUT", help="output folder")
    x.add_argument("--mpp", type=float, default=None, metavar="M",
                   help="mask resolution in µm/px (default: the label resolution)")
    x.add_argument("--pixels-only", action="store_true",
                   help="masks of painted pixels alone (default: drawn polygons and boxes filled too, painted pixels "
                        "over them, as QuPath's labelled-image export)")
    x.set_defaults(func=_cmd_export)

    k = sub.add_parser(
        "check", help="find (and with --repair, repair) damage in a project folder",
        description="Check project.json, every pixel-label chunk, annotation file and slide file, and look for "
                    "half-written files and stale locks. With --repair, restore damaged files from the previous "
                    "good copy kept at every save (damaged files are moved to removed/damaged-TIME/, never "
                    "deleted). Exit status 0: no damage (left); 1: damage remains; 2: the check could not run.")
    k.add_argument("dir", metavar="DIR", help="project folder")
    k.add_argument("--repair", action="store_true", help="repair what can be repaired (needs the write lock)")
    k.set_defaults(func=_cmd_check)

    i = sub.add_parser("info", help="describe a project", description="Print a project's classes and slides.")
    i.add_argument("dir", metavar="DIR", help="project folder")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_cmd_info)
    return p


def _cmd_help(args: argparse.Namespace) -> int:
    args._parser.print_help(sys.stderr)
    return 2


def _cmd_create(args: argparse.Namespace) -> int:
    from .project import Project

    slide_classes = [s.strip() for s in args.slide_classes.split(",")]
    print(f"checking {args.from_csv} …", flush=True)
    with Project.create_from_csv(args.dir, args.from_csv, label_mpp=args.label_mpp, name=args.name,
                                 slide_classes=slide_classes) as p:
        n_px = sum(p.has_pixel_labels(s) for s in p.slide_ids)
        n_ann = sum(p.annotation_path(s) is not None for s in p.slide_ids)
        print(f"created project '{p.name}' in {p.root}: {len(p.slides)} slides, pixel labels for {n_px}, "
              f"annotations for {n_ann}")
    return 0


def _cmd_export_csv(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .project import Project

    with Project.open(args.dir, readonly=True) as p:
        _note_writer(p)
        out = Path(args.out) if args.out else p.root / "cohort.csv"
        path = p.export_csv(out, masks=args.masks)
        print(f"wrote {path} ({len(p.slides)} slides)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_project
    from .project import Project

    with Project.open(args.dir, readonly=True) as p:
        _note_writer(p)
        paths = export_project(p, args.out, format=args.format, mpp=args.mpp, pixels_only=args.pixels_only)
        print(f"wrote {len(paths)} {args.format} file{'s' if len(paths) != 1 else ''} into {args.out}")
    return 0


def _note_writer(project: Any) -> None:
    """Say so when the project is being edited elsewhere: the export holds what was saved until now."""
    writer = project.writer()
    if writer:
        print(f"note: the project is open for writing in another window or process ({writer}); this reads it "
              "read-only and exports what is saved now", file=sys.stderr)


def _cmd_check(args: argparse.Namespace) -> int:
    from .check import check_project, repair_project

    report = repair_project(args.dir) if args.repair else check_project(args.dir)
    print(report.text())
    if report.damage and not args.repair and report.repairable:
        print(f"run `wsimil project check {args.dir} --repair` to repair {len(report.repairable)} of them")
    return 0 if report.ok else 1


def _cmd_info(args: argparse.Namespace) -> int:
    from .project import Project

    with Project.open(args.dir, readonly=True) as p:
        info = p.info()
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    print(f"project   {info['name']}  ({info['root']})")
    print(f"schema    {info['schema']}   labels at {info['label_mpp']:g} µm/px")
    if info["writer"]:
        print(f"read-only here: the project is open for writing in another window or process ({info['writer']})")
    for d in info["damage"]:
        print(f"DAMAGED   {d} (see `wsimil project check`)")
    print("classes   " + ", ".join(f"{c['id']} {c['name']} {c['color']}" for c in info["classes"]))
    print("slide classes  " + ", ".join(f"{i} {n}" for i, n in enumerate(info["slide_classes"])))
    slides = info["slides"]
    missing = [s for s in slides if s["missing"]]
    print(f"slides    {len(slides)}  (pixel labels: {sum(s['pixel_labels'] for s in slides)}, annotations: "
          f"{sum(s['annotations'] for s in slides)}, missing files: {len(missing)})")
    width = max([len(s["slide_id"]) for s in slides] + [8])
    for s in slides:
        dims = "x".join(map(str, s["dimensions"])) if s["dimensions"] else "?"
        mpp = f"{s['mpp']:.3g} µm/px" if s["mpp"] else "mpp ?"
        flags = " ".join(f for f, on in (("labels", s["pixel_labels"]), ("annotations", s["annotations"]),
                                         ("MISSING", s["missing"])) if on)
        print(f"  {s['slide_id']:<{width}}  {s['label'] or '-':<10} {s['split'] or '-':<5} {dims:>13} {mpp:>12}"
              f"  {flags}")
    return 0
