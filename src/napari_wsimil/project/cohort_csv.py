"""Cohort CSV: the portable description of a cohort, in and out of a project.

Columns (header names; order free; only ``path`` is required):

``slide_id``  the slide's id (default: the file name's stem); letters, digits, ``.``, ``_``, ``-``
``path``      the slide file
``label``     the slide-level label: a name from the project's slide classes or its integer index
              (``0`` = first, so the synthetic cohort's 0/1 mean benign/malignant); empty = unlabelled
``split``     ``train``, ``val`` or ``test`` (empty: not assigned)
``mpp``       µm/px override for slides whose file lacks or misstates it
``pixel_labels`` + ``pixel_labels_downsample``  a mask image imported as the slide's pixel labels
``annotations`` a GeoJSON file (QuPath export) imported as the slide's annotations
``gt_mask`` + ``gt_downsample``  ground truth for *evaluation only*: recorded in the slide's record,
              never imported as training labels (that would leak the answer into training)

Any other column is kept per slide (``SlideRecord.extra``) and written back on export, so a
patient id or a scanner name survives a round trip. Relative paths are relative to the CSV's folder.

Every row is checked before anything is written — files exist, slides open, labels are known, ids
and paths are unique, masks fit their slide and hold class ids, annotations are valid and inside
their slide — and all problems are reported together, each with its line number.

:func:`parse_rows` is the one reader of the format: project import uses it here, and the command
line's cohorts (``wsimil train``/``predict``/``evaluate``/``calibrate``, ``napari_wsimil.train.cohort``)
read their CSVs with it too, so every column, ``mpp`` included, means the same everywhere.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from ..errors import printable
from ..io.atomic import atomic_write
from .classes import build_classes
from .errors import ProjectError, problems_error
from .export import export_mask
from .schema import (PROJECT_FILE, SlideRecord, check_mpp, check_slide_classes, check_slide_id, id_from_path,
                     normalize_split, safe_file_name)

if TYPE_CHECKING:  # pragma: no cover
    from .annotations import Annotation
    from .folder import ProjectFolder

_P = TypeVar("_P", bound="ProjectFolder")

KNOWN = ("slide_id", "path", "label", "split", "mpp", "pixel_labels", "pixel_labels_downsample", "annotations",
         "gt_mask", "gt_downsample")


@dataclass(frozen=True)
class CohortRow:
    """One slide of a cohort with every column of its CSV row (paths absolute); ``line`` is the row's line
    in the file (0 for a slide that comes from a project, where these fields mirror its record).

    ``mpp`` overrides the file's pixel size (µm/px at level 0): whoever opens the slide passes it to
    ``open_slide(path, mpp=...)``. ``pixel_labels`` is a class-id mask for training, ``annotations`` a
    GeoJSON, ``gt_mask`` ground truth for evaluation only; a downsample of None means "work it out
    from the mask's size". ``extra`` holds the other columns, kept for export."""

    slide_id: str
    path: Path
    label: str | None = None
    split: str | None = None
    mpp: float | None = None
    pixel_labels: Path | None = None
    pixel_labels_downsample: float | None = None
    annotations: Path | None = None
    gt_mask: Path | None = None
    gt_downsample: float | None = None
    extra: dict[str, str] = field(default_factory=dict, hash=False)
    line: int = 0


class _Checked(NamedTuple):
    """What opening a row's slide and reading its annotations found (for create_from_csv)."""

    dimensions: tuple[int, int]
    scan_mpp: float | None
    annotations: list[Annotation] | None


def _read_table(csv_path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ProjectError(f"cohort file {csv_path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectError(f"cannot read cohort file {csv_path}: {exc}") from exc
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ProjectError(f"cohort file {csv_path.name} is empty; expected a header such as slide_id,path,label")
    header_line = lines[0]
    delimiter = ","
    if "," not in header_line:
        delimiter = "\t" if "\t" in header_line else (";" if ";" in header_line else ",")
    reader = csv.reader(lines, delimiter=delimiter)
    header = [h.strip() for h in next(reader)]
    header = [h.lower() if h.lower() in KNOWN else h for h in header]  # Path, MPP... ; other names kept as written
    if "path" not in header:
        raise ProjectError(f"cohort file {csv_path.name} has no 'path' column (columns: {', '.join(header)}); "
                           "expected at least slide_id,path,label")
    rows = []
    for n, values in enumerate(reader, start=2):
        if not any(v.strip() for v in values):
            continue
        rows.append((n, {h: (values[i].strip() if i < len(values) else "") for i, h in enumerate(header) if h}))
    return header, rows


def _float(value: str, what: str, problems: list[str], where: str) -> float | None:
    if not value:
        return None
    try:
        v = float(value)
    except ValueError:
        problems.append(f"{where}: {what} {value!r} is not a number")
        return None
    if not (v > 0 and np.isfinite(v)):
        problems.append(f"{where}: {what} must be positive, got {value!r}")
        return None
    return v


def parse_rows(csv_path: Path, slide_classes: Sequence[str] | None, problems: list[str], *,
               strict: bool = True) -> list[CohortRow]:
    """Rows with paths resolved and every value checked; problems appended (``line N (id): ...``), rows
    without a path skipped. Slide ids must be unique.

    ``slide_classes`` None keeps labels as written (the command line's cohorts, whose classes are the
    labels met); else a label is one of them or its index, and is stored as the name. ``strict`` (project
    import) also wants the files to exist, the ids to be usable as file names and each file listed once;
    training opens the files when it needs them, and a missing one is then an error naming the slide."""
    header, table = _read_table(csv_path)
    base = csv_path.parent
    out = []
    for line, d in table:
        where = f"line {line}"
        raw_path = d.get("path", "")
        if not raw_path:
            problems.append(f"{where}: the path is empty")
            continue
        path = (base / raw_path).resolve()
        slide_id = d.get("slide_id") or id_from_path(path)
        where = f"line {line} ({printable(slide_id)})"
        if strict:
            try:
                check_slide_id(slide_id)
            except ProjectError as exc:
                problems.append(f"{where}: {exc}")
        elif not safe_file_name(slide_id):  # bags and predictions are named after it: never a path
            problems.append(f"{where}: slide id {slide_id!r} would name a file outside the output folder; "
                            "use letters, digits, '.', '_' and '-'")
        if strict:
            if not path.exists():
                problems.append(f"{where}: slide file {raw_path} not found (looked for {path})")
        values: dict[str, Any] = {}
        label = d.get("label", "")
        if label and slide_classes is None:
            values["label"] = label
        elif label:
            if label in slide_classes:
                values["label"] = label
            else:
                try:
                    k = int(label)
                    values["label"] = slide_classes[k] if 0 <= k < len(slide_classes) else None
                except ValueError:
                    pass
                if values.get("label") is None:
                    valid = ", ".join(f"{i} {n}" for i, n in enumerate(slide_classes))
                    problems.append(f"{where}: label {label!r} is not a slide class ({valid})")
        try:
            values["split"] = normalize_split(d.get("split"))
        except ProjectError as exc:
            problems.append(f"{where}: {exc}")
        for col in ("mpp", "pixel_labels_downsample", "gt_downsample"):
            values[col] = _float(d.get(col, ""), col, problems, where)
        for col in ("pixel_labels", "annotations", "gt_mask"):
            value = d.get(col, "")
            if value:
                p = (base / value).resolve()
                if strict and not p.is_file():
                    problems.append(f"{where}: {col} file {value} not found (looked for {p})")
                values[col] = p
        out.append(CohortRow(slide_id, path, extra={k: v for k, v in d.items() if k not in KNOWN}, line=line,
                             **values))
    ids: dict[str, int] = {}
    paths: dict[Path, int] = {}
    for row in out:
        if row.slide_id in ids:
            problems.append(f"line {row.line} ({printable(row.slide_id)}): slide_id {row.slide_id!r} is also used on line "
                            f"{ids[row.slide_id]}")
        else:
            ids[row.slide_id] = row.line
        if strict and row.path in paths:
            problems.append(f"line {row.line} ({printable(row.slide_id)}): {row.path.name} is also listed on line "
                            f"{paths[row.path]}")
        else:
            paths[row.path] = row.line
    if not table:
        problems.append("the file lists no slides")
    return out


def check_rows(rows: list[CohortRow], label_mpp: float, class_names: dict[int, str], add_missing_classes: bool,
               problems: list[str]) -> tuple[dict[str, str | None], dict[str, _Checked]]:
    """Open every slide, fit every mask and parse every annotation file; returns the classes to add and,
    per slide id, what was found."""
    from napari_wsimil.errors import WsimilError
    from napari_wsimil.slide import open_slide

    from .annotations import check_annotations, read_geojson
    from .classes import UNLABELLED
    from .mask_io import MaskImage, choose_downsample, resampled_bands
    from ..io.raster_store import CHUNK
    from .pixel_labels import compute_geometry, count_values

    missing: dict[str, str | None] = {}
    checked: dict[str, _Checked] = {}
    for row in rows:
        where = f"line {row.line} ({printable(row.slide_id)})"
        if not row.path.exists():
            continue
        try:
            with open_slide(row.path, mpp=row.mpp) as slide:
                dimensions, scan_mpp = slide.dimensions, slide.file_mpp
        except WsimilError as exc:
            problems.append(f"{where}: {exc}")
            continue
        checked[row.slide_id] = _Checked(dimensions, scan_mpp, None)
        mpp = row.mpp if row.mpp is not None else scan_mpp
        geometry = compute_geometry(dimensions, mpp, label_mpp)
        if row.pixel_labels is not None and row.pixel_labels.is_file():
            try:
                with MaskImage(row.pixel_labels) as mask:
                    ds = choose_downsample(mask, dimensions, mpp, geometry, row.pixel_labels_downsample)
                    counts = np.zeros(256, np.int64)
                    for _, band in resampled_bands(mask, ds, geometry, CHUNK):
                        count_values(band, counts)
                bad = [int(v) for v in np.flatnonzero(counts) if int(v) not in class_names]
                if bad:
                    problems.append(f"{where}: pixel_labels {row.pixel_labels.name} holds values that are not class "
                                    f"ids: {', '.join(map(str, bad))} (classes: "
                                    f"{', '.join(f'{i} {n}' for i, n in sorted(class_names.items()))})")
            except ProjectError as exc:
                problems.append(f"{where}: {exc}")
        if row.annotations is not None and row.annotations.is_file():
            try:
                anns = read_geojson(row.annotations)
            except ProjectError as exc:
                problems.append(f"{where}: {exc}")
                continue
            known = set(class_names.values())
            for a in anns:
                if a.class_name not in known and a.class_name != UNLABELLED:
                    if add_missing_classes:
                        missing.setdefault(a.class_name, a.color)
                    else:
                        problems.append(f"{where}: {row.annotations.name} uses class {a.class_name!r}, which is not "
                                        f"one of {', '.join(sorted(known - {UNLABELLED}))}")
                        known.add(a.class_name)  # report each unknown class once per file
            for msg in check_annotations(anns, known | set(missing), dimensions):
                problems.append(f"{where}: {row.annotations.name}: {msg}")
            checked[row.slide_id] = _Checked(dimensions, scan_mpp, anns)
    return missing, checked


def create_from_csv(project_cls: type[_P], dir: str | os.PathLike[str], csv_path: str | os.PathLike[str],
                    label_mpp: float = 4.0, name: str | None = None, classes: Any = None,
                    slide_classes: Any = ("benign", "malignant"), add_missing_classes: bool = True) -> _P:
    """Check the whole CSV, then create the project and import everything it lists.

    Annotation classes the project lacks are added (with the file's colours) unless
    ``add_missing_classes`` is False, in which case they are reported as problems.
    """
    csv_path = Path(csv_path).expanduser().resolve()
    root = Path(dir).expanduser().resolve()
    if (root / PROJECT_FILE).exists():
        raise ProjectError(f"{root} already holds a project; open it with Project.open (or pick another folder)")
    label_mpp_v = check_mpp(label_mpp, "the label resolution")
    table = build_classes(classes)
    sc = check_slide_classes(slide_classes)
    problems: list[str] = []
    rows = parse_rows(csv_path, sc, problems)
    missing, checked = check_rows(rows, label_mpp_v, {c.id: c.name for c in table}, add_missing_classes, problems)
    if problems:
        problems.sort(key=_line_of)
        raise problems_error(f"cannot create a project from {csv_path.name}; nothing was written", problems)

    existed = root.exists()
    before = {p for p in ("labels", "annotations", "removed", ".lock") if (root / p).exists()} if existed else set()
    project = project_cls.create(root, name=name, classes=table, slide_classes=sc, label_mpp=label_mpp_v)
    try:
        for cname, color in missing.items():
            used = {c.color for c in project.classes}
            project.add_class(cname, color if color and color not in used else None)
        project._add_records([
            SlideRecord(row.slide_id, project._stored(row.path), row.label, row.split, row.mpp,
                        checked[row.slide_id].dimensions, checked[row.slide_id].scan_mpp,
                        project._stored(row.gt_mask) if row.gt_mask else None, row.gt_downsample, dict(row.extra))
            for row in rows
        ])
        for row in rows:
            if row.pixel_labels is not None:
                project.import_mask(row.slide_id, row.pixel_labels, downsample=row.pixel_labels_downsample)
            if checked[row.slide_id].annotations:
                project.save_annotations(row.slide_id, checked[row.slide_id].annotations)
    except BaseException:
        project.close()
        _discard(root, existed, before)
        raise
    return project


def _line_of(problem: str) -> int:
    m = re.match(r"line (\d+)", problem)
    return int(m.group(1)) if m else 0


def _discard(root: Path, existed: bool, before: set[str]) -> None:
    """Undo a half-made project: what this call created goes, what was there before stays."""
    if not existed:
        shutil.rmtree(root, ignore_errors=True)
        return
    (root / PROJECT_FILE).unlink(missing_ok=True)
    for name in ("labels", "annotations", "removed"):
        if name not in before and (root / name).exists():
            shutil.rmtree(root / name, ignore_errors=True)
    if ".lock" not in before:
        (root / ".lock").unlink(missing_ok=True)


def _rel(path: Path, folder: Path) -> str:
    try:
        return Path(os.path.relpath(path, folder)).as_posix()
    except ValueError:  # another drive (Windows)
        return path.as_posix()


def _num(v: float) -> str:
    """Whole numbers as integers (8, not 8.0); others exactly (repr round-trips)."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def export_csv(project: ProjectFolder, path: str | os.PathLike[str], masks: bool = False) -> Path:
    """Write the project's cohort as CSV; paths relative to the CSV's folder where possible.

    With ``masks``, each slide's saved pixel labels are exported as ``<csv stem>_labels/<id>.ome.tif``
    at label resolution and listed in ``pixel_labels``/``pixel_labels_downsample``.
    """
    path = Path(path).expanduser().resolve()
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    records = project.slides
    columns = ["slide_id", "path", "label", "split"]
    rows: list[dict[str, Any]] = []
    for rec in records:
        row: dict[str, Any] = {
            "slide_id": rec.slide_id, "path": _rel(project.resolve(rec.path), folder), "label": rec.label or "",
            "split": rec.split or "",
        }
        if rec.mpp is not None:
            row["mpp"] = _num(rec.mpp)
        ann = project.annotation_path(rec.slide_id)
        if ann is not None:
            row["annotations"] = _rel(ann, folder)
        if masks and project.has_pixel_labels(rec.slide_id):
            target = folder / f"{path.stem}_labels" / f"{rec.slide_id}.ome.tif"
            export_mask(project, rec.slide_id, target, format="ome-tiff", pixels_only=True)  # shapes: GeoJSON
            row["pixel_labels"] = _rel(target, folder)
            row["pixel_labels_downsample"] = _num(project.label_geometry(rec.slide_id).downsample)
        if rec.gt_mask is not None:
            row["gt_mask"] = _rel(project.resolve(rec.gt_mask), folder)
            row["gt_downsample"] = "" if rec.gt_downsample is None else _num(rec.gt_downsample)
        row.update({k: v for k, v in rec.extra.items() if k not in KNOWN})
        rows.append(row)
    for col in ("mpp", "pixel_labels", "pixel_labels_downsample", "annotations", "gt_mask", "gt_downsample"):
        if any(col in r for r in rows):
            columns.append(col)
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    with atomic_write(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    """A cohort CSV's rows as plain dicts, its ``path`` and ``gt_mask`` made absolute: for tools that deal a
    cohort's rows out to new CSVs elsewhere (federated sites, benchmark splits), where relative paths would
    no longer resolve. No checks: :func:`parse_rows` validates when the rows are used."""
    with open(csv_path, newline="") as fh:
        out = list(csv.DictReader(fh))
    for r in out:
        for k in ("path", "gt_mask"):
            if r.get(k):
                r[k] = str((Path(csv_path).parent / r[k]).resolve())
    return out


def write_rows(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """``rows`` as a CSV with every column any row has (in first-seen order), written atomically."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_write(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, cols, restval="")
        w.writeheader()
        w.writerows(rows)
    return path
