"""Feature bags in and out of CLAM / TIAToolbox: ``.h5`` (``features`` + ``coords``) and bare ``.pt`` files.

Why: many pathologists already hold features computed by CLAM (``create_patches_fp.py`` +
``extract_features_fp.py``: ``h5_files/<slide>.h5`` with ``features`` (N, D) and ``coords`` (N, 2, level-0
pixel x, y of each patch's top-left corner), and ``pt_files/<slide>.pt``, the same features as one 2-D
tensor) or by tools that copy that layout. Importing them lets a run start from features computed
elsewhere, without re-encoding the slides; exporting ours lets CLAM's own scripts read our bags.

Imported bags are ordinary bags (:mod:`.bags`) under the encoder name ``imported:NAME`` and its own folder
(``PROJECT/features/imported_NAME``), so they never mix with the bags our encoders make: a run trained with
``--encoder imported:NAME`` reads exactly those. The patch size and µm/px cannot be read from the files
reliably (CLAM records a pyramid level, not a pixel size), so the user states them; the slide's own µm/px
comes from the project, which turns them into the patch side in level-0 pixels for heatmaps and tile labels.

Every file is checked before anything is written (missing keys, lengths that disagree, NaN or infinite
values, non-numeric data, coordinates outside the slide, feature widths that differ between slides): one
bad file is one line naming it, and the feature store is left as it was. ``.pt`` files are read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers (never unpickles
code).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError
from ..io.atomic import atomic_path
from .bags import BAG_SUFFIX, Bag, BagError, read_bag, read_bag_attrs, slide_stamp

#: Encoder names of imported bags start with this; the rest is the name the user gave.
IMPORTED_PREFIX = "imported:"
#: What imported bags record as their encoder version (there is no encoder to version).
IMPORTED_VERSION = "imported"
#: File suffixes this module reads.
FOREIGN_SUFFIXES = (".h5", ".hdf5", ".pt")


class InteropError(WsimilError):
    """A foreign feature file cannot be imported, or a bag cannot be exported, as asked."""


@dataclass
class ForeignFeatures:
    """Features (N, D) and level-0 coords (N, 2: x, y) read from one foreign file, checked to agree."""

    features: np.ndarray
    coords: np.ndarray
    source: Path
    source_format: str
    coords_source: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def is_imported(encoder: str) -> bool:
    """Whether ``encoder`` names imported bags (``imported:NAME``), which no network can recompute."""
    return isinstance(encoder, str) and encoder.startswith(IMPORTED_PREFIX)


def imported_encoder(name: str) -> str:
    """``imported:NAME`` for a user's NAME (``imported:`` itself may be given); NAME is letters, digits,
    ``.``, ``-``, ``_`` so that the folder name and the command line say the same thing."""
    bare = name[len(IMPORTED_PREFIX):] if name.startswith(IMPORTED_PREFIX) else name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", bare or ""):
        raise InteropError(f"--name {name!r} is not usable: give letters, digits, '.', '-' or '_' "
                           "(e.g. clam-resnet50 or uni)")
    return IMPORTED_PREFIX + bare


# ----------------------------------------------------------------------------------------------- reading
def _check_arrays(path: Path, features: Any, coords: Any | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Features as float32 (N, D) and coords as int64 (N, 2), or one InteropError naming ``path``."""
    f = np.asarray(features)
    if f.dtype.kind not in "fiu" or f.dtype == np.bool_:
        raise InteropError(f"{path.name}: features are of type {f.dtype}, not numbers")
    if f.ndim == 3 and f.shape[0] == 1:  # some tools keep a batch axis of one
        f = f[0]
    if f.ndim != 2 or f.shape[0] == 0 or f.shape[1] == 0:
        raise InteropError(f"{path.name}: features must be a patches x dimensions table, got shape {f.shape}")
    f32 = f.astype(np.float32)
    if not np.isfinite(f32).all():
        bad = int((~np.isfinite(f32)).any(axis=1).sum())
        raise InteropError(f"{path.name}: {bad} of {len(f32)} feature rows hold NaN or infinite values "
                           "(the extraction that wrote it went wrong)")
    if coords is None:
        return f32, None
    c = np.asarray(coords)
    if c.dtype.kind not in "fiu" or c.dtype == np.bool_:
        raise InteropError(f"{path.name}: coords are of type {c.dtype}, not numbers")
    if c.ndim != 2 or c.shape[1] != 2:
        raise InteropError(f"{path.name}: coords must be N x 2 (x, y), got shape {c.shape}")
    if len(c) != len(f32):
        raise InteropError(f"{path.name}: {len(f32)} feature rows but {len(c)} coords; they must match one to one")
    if c.dtype.kind == "f":
        if not np.isfinite(c).all():
            raise InteropError(f"{path.name}: coords hold NaN or infinite values")
        if not np.allclose(c, np.round(c)):
            raise InteropError(f"{path.name}: coords are not whole pixels; CLAM writes level-0 pixel x, y")
    c64 = np.round(c).astype(np.int64)
    if (c64 < 0).any():
        raise InteropError(f"{path.name}: coords hold negative pixel positions")
    return f32, c64


def read_h5(path: str | os.PathLike[str]) -> ForeignFeatures:
    """A CLAM-style ``.h5``: datasets ``features`` (N, D) and ``coords`` (N, 2, level-0 x, y)."""
    path = Path(path)
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is in the interop extra
        raise InteropError("reading .h5 feature files needs h5py: pip install 'napari-wsimil[interop]'") from None
    if not path.is_file():
        raise InteropError(f"feature file {path} does not exist")
    try:
        with h5py.File(path, "r") as h5:
            missing = [k for k in ("features", "coords") if k not in h5]
            if missing:
                have = ", ".join(sorted(h5.keys())) or "nothing"
                raise InteropError(f"{path.name}: no {' and no '.join(repr(k) for k in missing)} dataset "
                                   f"(it holds {have}); a CLAM feature file has 'features' and 'coords'")
            for key in ("features", "coords"):
                if not isinstance(h5[key], h5py.Dataset):
                    raise InteropError(f"{path.name}: {key!r} is a group, not a dataset")
            raw_f, raw_c = h5["features"][()], h5["coords"][()]
            meta = {f"coords.{k}": v for k, v in ((k, _plain(v)) for k, v in h5["coords"].attrs.items())
                    if _json_safe(v)}
    except InteropError:
        raise
    except Exception as exc:  # noqa: BLE001 - any HDF5 failure means "not a readable feature file"
        raise InteropError(f"{path.name} ({path}) is not a readable HDF5 feature file: {exc}") from None
    features, coords = _check_arrays(path, raw_f, raw_c)
    assert coords is not None
    return ForeignFeatures(features, coords, path, "h5", path, meta)


def read_h5_coords(path: Path) -> np.ndarray:
    """Only the ``coords`` of a CLAM ``.h5`` (what a ``.pt`` file lacks)."""
    try:
        import h5py

        with h5py.File(path, "r") as h5:
            if "coords" not in h5:
                raise InteropError(f"{path.name}: no 'coords' dataset, so it cannot place the patches of the "
                                   ".pt file beside it")
            return np.asarray(h5["coords"][()])
    except InteropError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InteropError(f"{path.name} ({path}) is not a readable HDF5 file: {exc}") from None


def companion_h5(pt_path: Path, coords_dir: Path | None = None) -> Path | None:
    """Where the coords of ``pt_files/<slide>.pt`` are: ``coords_dir/<slide>.h5`` when given, else beside
    it or in CLAM's sibling ``h5_files`` folder; None when there is none."""
    stem = pt_path.stem
    places = [coords_dir] if coords_dir is not None else [pt_path.parent, pt_path.parent.parent / "h5_files"]
    for folder in places:
        for suffix in (".h5", ".hdf5"):
            cand = folder / f"{stem}{suffix}"
            if cand.is_file():
                return cand
    return None


def read_pt(path: str | os.PathLike[str], coords_dir: str | os.PathLike[str] | None = None) -> ForeignFeatures:
    """A bare ``.pt`` feature file (one 2-D tensor), its coords from the companion ``.h5``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InteropError(f"feature file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickled code, truncated zip...: not a bare tensor file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InteropError(f"{path.name} ({path}) is not a readable .pt feature file (a saved tensor): "
                           f"{first[:200]}") from None
    if isinstance(obj, Mapping) and "features" in obj:  # {'features': T, 'coords': T} as some forks write
        raw_f, raw_c = obj["features"], obj.get("coords")
    else:
        raw_f, raw_c = obj, None
    if not isinstance(raw_f, torch.Tensor):
        raise InteropError(f"{path.name}: holds a {type(raw_f).__name__}, not a features tensor")
    features, _ = _check_arrays(path, raw_f.detach().float().numpy() if raw_f.is_floating_point()
                                else raw_f.numpy(), None)  # a bad table is said before a missing .h5
    h5 = None
    if raw_c is None:
        h5 = companion_h5(path, Path(coords_dir) if coords_dir is not None else None)
        if h5 is None:
            where = f"in {coords_dir}" if coords_dir is not None else "beside it or in ../h5_files"
            raise InteropError(f"{path.name}: a .pt file has features but no patch positions, and no "
                               f"{path.stem}.h5 with coords was found {where}; give --coords DIR")
        raw_c = read_h5_coords(h5)
    coords_np = raw_c.numpy() if isinstance(raw_c, torch.Tensor) else np.asarray(raw_c)
    features, coords = _check_arrays(path, features, coords_np)
    assert coords is not None
    return ForeignFeatures(features, coords, path, "pt", h5 or path)


def read_foreign(path: str | os.PathLike[str], coords_dir: str | os.PathLike[str] | None = None
                 ) -> ForeignFeatures:
    """An ``.h5`` or ``.pt`` feature file, by its suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return read_h5(path)
    if suffix == ".pt":
        return read_pt(path, coords_dir)
    raise InteropError(f"{path.name}: not a feature file this imports (.h5 or .pt)")


def _json_safe(value: Any) -> bool:
    """Whether ``value`` goes into a bag's JSON attrs (an attribute that does not is left out, not fatal)."""
    import json

    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _plain(value: Any) -> Any:
    """An HDF5 attribute as plain Python (text decoded, arrays as lists)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype.kind in "SO" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ------------------------------------------------------------------------------------------------- import
@dataclass
class ImportPlan:
    """One checked file, the slide it belongs to and the bag it becomes."""

    slide_id: str
    foreign: ForeignFeatures
    bag: Bag
    target: Path


def expand_sources(sources: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files given, and the ``.h5``/``.pt`` files of folders given (a CLAM output folder holds ``h5_files``
    and ``pt_files``: the ``.h5`` files are taken, as they hold coords too)."""
    out: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            h5_dir = p / "h5_files" if (p / "h5_files").is_dir() else p
            found = sorted(f for f in h5_dir.iterdir() if f.suffix.lower() in (".h5", ".hdf5"))
            if not found:
                found = sorted(f for f in p.iterdir() if f.suffix.lower() == ".pt")
            if not found:
                raise InteropError(f"{p} holds no .h5 or .pt feature files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise InteropError(f"feature file {p} does not exist")
    return out


def match_slide(path: Path, slide_ids: Sequence[str], slide_stems: Mapping[str, str]) -> str:
    """The slide a file belongs to: its stem is the slide id, or the slide file's name without suffix
    (CLAM names its outputs after the slide file)."""
    stem = path.stem
    if stem in slide_ids:
        return stem
    hits = [sid for sid, s in slide_stems.items() if s == stem]
    if len(hits) == 1:
        return hits[0]
    shown = ", ".join(list(slide_ids)[:8]) + (" ..." if len(slide_ids) > 8 else "")
    raise InteropError(f"{path.name} matches no slide of the project (file names must be the slide id or the "
                       f"slide file's name; slides: {shown}); use --slide ID for a single file")


def plan_import(files: Mapping[str, Path], encoder: str, patch_size: int, mpp: float,
                open_slide: Callable[[str], Any], out_dir: Path,
                coords_dir: str | os.PathLike[str] | None = None) -> list[ImportPlan]:
    """Read and check every file (``files``: slide id → file) and build its bag; raises on the first bad file,
    before anything is written. ``open_slide(slide_id)`` opens the slide (a context manager) to learn its
    µm/px and size: coords outside the slide mean the file belongs to another scan or is not at level 0."""
    if patch_size < 1 or not mpp > 0:
        raise InteropError(f"--patch and --mpp must be positive, got {patch_size} px and {mpp} µm/px")
    plans: list[ImportPlan] = []
    dims: dict[int, str] = {}
    for sid, path in files.items():
        foreign = read_foreign(path, coords_dir)
        with open_slide(sid) as slide:
            w, h = slide.dimensions
            slide_mpp, slide_path = slide.mpp, Path(slide.path)
        x, y = foreign.coords[:, 0], foreign.coords[:, 1]
        if len(foreign.coords) and (x.max() >= w or y.max() >= h):
            raise InteropError(f"{path.name}: patches reach x {int(x.max())}, y {int(y.max())} but slide {sid} is "
                               f"{w} x {h} px: the file is from another scan, or its coords are not level-0 pixels")
        dims.setdefault(foreign.features.shape[1], path.name)
        if len(dims) > 1:
            (d0, f0), (d1, f1) = list(dims.items())[:2]
            raise InteropError(f"{f1} has {d1} features per patch but {f0} has {d0}: one import is one encoder")
        attrs: dict[str, Any] = {
            "encoder": encoder, "encoder_version": IMPORTED_VERSION, "patch_size": int(patch_size),
            "mpp": float(mpp), "slide_mpp": slide_mpp, "source_file": str(path.resolve()),
            "source_format": foreign.source_format, "slide_id": sid, **foreign.meta}
        try:
            attrs.update(slide_stamp(slide_path))
        except OSError:
            pass
        if foreign.coords_source is not None and foreign.coords_source != path:
            attrs["coords_file"] = str(foreign.coords_source.resolve())
        plans.append(ImportPlan(sid, foreign, Bag(foreign.coords, foreign.features, attrs),
                                out_dir / f"{sid}{BAG_SUFFIX}"))
    # the store's other bags of this name must have the same width, or training would fail later
    width = next(iter(dims), None)
    replaced = {p.target.name for p in plans}
    if width is not None and out_dir.is_dir():
        for other in sorted(out_dir.glob(f"*{BAG_SUFFIX}")):
            if other.name in replaced:
                continue
            try:
                bag = read_bag(other)
            except BagError:
                continue
            if bag.dim != width:
                raise InteropError(f"{other.stem} already has {encoder} features of width {bag.dim}, but these "
                                   f"have {width}: import under another --name, or re-import that slide too")
    return plans


def import_features(project_dir: str | os.PathLike[str], sources: Sequence[str | os.PathLike[str]], name: str,
                    patch_size: int, mpp: float, slide_id: str | None = None,
                    coords_dir: str | os.PathLike[str] | None = None,
                    report: Callable[[str], None] | None = None) -> list[Path]:
    """Import foreign feature files into ``project_dir``'s feature store; returns the bags written.

    All files are checked first; only then are the bags written, each atomically, into
    ``PROJECT/features/imported_NAME``. Re-importing a slide replaces its bag."""
    from ..project.project import PROJECT_FILE, Project
    from .extract import safe_dirname

    say = report or (lambda _m: None)
    encoder = imported_encoder(name)
    root = Path(project_dir)
    if not (root / PROJECT_FILE).is_file():
        raise InteropError(f"{root} is not a project folder (no {PROJECT_FILE})")
    files = expand_sources(sources)
    if slide_id is not None and len(files) != 1:
        raise InteropError(f"--slide names one slide, but {len(files)} files were given")
    project = Project.open(root, readonly=True)
    try:
        ids = project.slide_ids
        if slide_id is not None and slide_id not in ids:
            raise InteropError(f"slide {slide_id} is not in the project")
        stems = {sid: project.slide_path(sid).stem for sid in ids}
        by_slide: dict[str, Path] = {}
        for f in files:
            sid = slide_id if slide_id is not None else match_slide(f, ids, stems)
            if sid in by_slide:
                raise InteropError(f"{by_slide[sid].name} and {f.name} are both for slide {sid}")
            by_slide[sid] = f
        out_dir = root / "features" / safe_dirname(encoder)
        plans = plan_import(by_slide, encoder, patch_size, mpp, project.open_slide, out_dir, coords_dir)
    finally:
        project.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for plan in plans:
        plan.bag.save(plan.target)
        written.append(plan.target)
        say(f"{plan.slide_id}: {len(plan.bag)} patches x {plan.bag.dim} features from {plan.foreign.source.name}")
    return written


# ------------------------------------------------------------------------------------------ use in training
def imported_bags(slide_ids: Sequence[str], out_dir: Path, encoder: str, patch_size: int, mpp: float
                  ) -> dict[str, Path]:
    """slide id → imported bag for a run with ``--encoder imported:NAME``; every slide must have one, made at
    the run's patch size and µm/px (imported features cannot be recomputed, so a gap is an error that says
    how to fill it)."""
    bags: dict[str, Path] = {}
    missing: list[str] = []
    for sid in slide_ids:
        path = Path(out_dir) / f"{sid}{BAG_SUFFIX}"
        if not path.is_file():
            missing.append(sid)
            continue
        try:
            attrs = read_bag_attrs(path)
        except BagError as exc:
            raise InteropError(str(exc)) from None
        if attrs.get("encoder") != encoder:
            raise InteropError(f"{path} holds {attrs.get('encoder')} features, not {encoder}")
        if attrs.get("patch_size") != int(patch_size) or attrs.get("mpp") is None or \
                abs(float(attrs["mpp"]) - float(mpp)) > 1e-9:
            raise InteropError(f"the {encoder} features of {sid} are {attrs.get('patch_size')} px patches at "
                               f"{attrs.get('mpp')} µm/px: run with --patch {attrs.get('patch_size')} "
                               f"--mpp {attrs.get('mpp')}")
        bags[sid] = path
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise InteropError(f"no {encoder} features for {shown}: imported features cannot be computed here; "
                           f"import them with 'wsimil features-import PROJECT FILES --name "
                           f"{encoder[len(IMPORTED_PREFIX):]}', or leave those slides out")
    return bags


@dataclass(frozen=True)
class ImportedSet:
    """One ``imported:NAME`` feature set of a project, as its bags record it (what the Training widget lists).

    ``geometries`` holds every (patch size, µm/px) its bags were imported at, most common first: a run uses
    one, and a set re-imported at another geometry for some slides says so instead of failing later."""

    encoder: str
    folder: Path
    slides: tuple[str, ...]
    geometries: tuple[tuple[int, float], ...]
    sources: tuple[str, ...]  # the folders the imported files came from
    formats: tuple[str, ...]  # "h5", "pt"
    unreadable: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.encoder[len(IMPORTED_PREFIX):]

    @property
    def patch_size(self) -> int | None:
        return self.geometries[0][0] if self.geometries else None

    @property
    def mpp(self) -> float | None:
        return self.geometries[0][1] if self.geometries else None

    def describe(self) -> str:
        """A few lines for a tooltip: where the features came from, at which patch size and µm/px."""
        n = len(self.slides)
        lines = [f"{self.encoder}: features imported from files (wsimil features-import), {n} slide"
                 f"{'s' if n != 1 else ''}; no weights (they cannot be recomputed here)."]
        if self.sources:
            more = len(self.sources) - 3
            shown = "; ".join(self.sources[:3]) + (f" and {more} more" if more > 0 else "")
            lines.append(f"From {'/'.join(self.formats) or 'feature'} files in {shown}.")
        for patch, mpp in self.geometries:
            lines.append(f"{patch} px patches at {mpp:g} µm/px.")
        if len(self.geometries) > 1:
            lines.append("The slides were imported at different patch sizes: a run uses one of them.")
        if self.unreadable:
            lines.append(f"Unreadable bags: {', '.join(self.unreadable[:5])}.")
        lines.append(f"Stored in {self.folder}.")
        return "\n".join(lines)


def imported_sets(project_dir: str | os.PathLike[str]) -> list[ImportedSet]:
    """The ``imported:NAME`` feature sets of a project (``PROJECT/features/imported_*``), by name; only each
    bag's attrs are read, never its features, so listing a large store stays quick. A folder without a bag
    that records an ``imported:`` encoder is not a set (e.g. an interrupted first import)."""
    from collections import Counter

    root = Path(project_dir) / "features"
    out: list[ImportedSet] = []
    if not root.is_dir():
        return out
    for folder in sorted(f for f in root.iterdir() if f.is_dir() and f.name.startswith("imported_")):
        encoder = ""
        slides: list[str] = []
        geometries: Counter[tuple[int, float]] = Counter()
        sources: dict[str, None] = {}
        formats: dict[str, None] = {}
        unreadable: list[str] = []
        for path in sorted(folder.glob(f"*{BAG_SUFFIX}")):
            try:
                attrs = read_bag_attrs(path)
            except BagError:
                unreadable.append(path.stem)
                continue
            if not is_imported(attrs.get("encoder", "")):
                continue
            encoder = encoder or attrs["encoder"]
            slides.append(str(attrs.get("slide_id") or path.stem))
            if attrs.get("patch_size") and attrs.get("mpp"):
                geometries[(int(attrs["patch_size"]), float(attrs["mpp"]))] += 1
            if attrs.get("source_file"):
                sources[str(Path(attrs["source_file"]).parent)] = None
            if attrs.get("source_format"):
                formats[str(attrs["source_format"])] = None
        if encoder:
            out.append(ImportedSet(encoder, folder, tuple(slides), tuple(g for g, _ in geometries.most_common()),
                                   tuple(sources), tuple(formats), tuple(unreadable)))
    return sorted(out, key=lambda s: s.encoder)


# ------------------------------------------------------------------------------------------------- export
EXPORT_FORMATS = ("h5", "pt")


def export_bag(bag_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
               formats: Sequence[str] = EXPORT_FORMATS) -> list[Path]:
    """Write one bag the way CLAM lays its outputs out: ``OUT/h5_files/<slide>.h5`` (``features`` float32
    (N, D), ``coords`` int64 (N, 2) level-0 x, y, with CLAM's ``patch_size``/``patch_level`` attrs on
    ``coords`` and ours on the file) and ``OUT/pt_files/<slide>.pt`` (the features as one tensor).

    ``patch_size`` on ``coords`` is the patch side in level-0 pixels at ``patch_level`` 0, which is what
    CLAM's heatmap code uses to draw a patch; our own patch size and µm/px are in the file's attrs."""
    from .bags import patch_size_level0

    bag = read_bag(bag_path)
    sid = bag.attrs.get("slide_id") or Path(bag_path).stem
    out = Path(out_dir)
    written = []
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise InteropError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}")
    if "h5" in formats:
        import h5py

        target = out / "h5_files" / f"{sid}.h5"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            with h5py.File(tmp, "w") as h5:
                h5.create_dataset("features", data=bag.features)
                c = h5.create_dataset("coords", data=bag.coords)
                if "patch_size" in bag.attrs:
                    c.attrs["patch_size"] = int(round(patch_size_level0(bag.attrs)))
                c.attrs["patch_level"] = 0
                for key, value in bag.attrs.items():
                    if isinstance(value, (str, int, float, bool)):
                        h5.attrs[key] = value
        written.append(target)
    if "pt" in formats:
        import torch

        target = out / "pt_files" / f"{sid}.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            torch.save(torch.from_numpy(np.ascontiguousarray(bag.features)), tmp)
        written.append(target)
    return written


def export_features(feature_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                    formats: Sequence[str] = EXPORT_FORMATS, slide_ids: Sequence[str] | None = None,
                    report: Callable[[str], None] | None = None) -> list[Path]:
    """Export every bag of ``feature_dir`` (or those of ``slide_ids``); see :func:`export_bag`."""
    say = report or (lambda _m: None)
    folder = Path(feature_dir)
    if not folder.is_dir():
        raise InteropError(f"no feature bags at {folder}")
    bags = sorted(folder.glob(f"*{BAG_SUFFIX}"))
    if slide_ids is not None:
        wanted = set(slide_ids)
        missing = sorted(wanted - {b.stem for b in bags})
        if missing:
            raise InteropError(f"no bag for {', '.join(missing)} in {folder}")
        bags = [b for b in bags if b.stem in wanted]
    if not bags:
        raise InteropError(f"no feature bags (*{BAG_SUFFIX}) in {folder}")
    for b in bags:  # read everything first: a bad bag stops the export before a file is written
        read_bag_attrs(b)
    written = []
    for b in bags:
        files = export_bag(b, out_dir, formats)
        written.extend(files)
        say(f"{b.stem}: {', '.join(str(f) for f in files)}")
    return written


__all__ = ["EXPORT_FORMATS", "FOREIGN_SUFFIXES", "IMPORTED_PREFIX", "ForeignFeatures", "ImportPlan",
           "ImportedSet", "InteropError", "companion_h5", "expand_sources", "export_bag", "export_features",
           "import_features", "imported_bags", "imported_encoder", "imported_sets", "is_imported", "match_slide",
           "plan_import", "read_foreign", "read_h5", "read_pt"]
