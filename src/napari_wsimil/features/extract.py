"""Feature extraction: slide → patch grid → encoder → bag, for one slide or a whole cohort.

Reading and compute overlap: :class:`~napari_wsimil.slide.PatchReader` decodes the next batches in
its threads while the encoder runs on the current one (tile decoding releases the GIL; so does torch),
so the accelerator, not the JPEG decoder, sets the pace. Cohort runs write one bag per slide
atomically and skip bags that are complete and not stale, so an interrupted run resumes where it
stopped and changing the encoder or its weights recomputes exactly what it must.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from ..errors import WsimilError
from .bags import BAG_SUFFIX, Bag, bag_attrs, stale_reasons
from .encoders import Encoder, build_encoder

if TYPE_CHECKING:  # pragma: no cover
    from ..project import Project
    from ..slide import PatchGrid, Slide

#: ``progress(done_patches, total_patches)`` for one slide.
Progress = Callable[[int, int], None]


class ExtractionCancelled(WsimilError):
    """The caller asked extraction to stop (``cancel`` was set); nothing was written for that slide."""


def safe_dirname(name: str) -> str:
    """An encoder name as a folder name on every system (``timm:vit_large_patch16_224`` has a colon,
    which Windows refuses): characters other than letters, digits, ``.``, ``-``, ``_`` become ``_``."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _as_encoder(encoder: Encoder | str, device: str, weights: str | Path | None, mpp: float | None = None
                ) -> Encoder:
    if isinstance(encoder, Encoder):
        return encoder.to(device)
    return build_encoder(encoder, weights=weights, device=device, **encoder_scale_options(encoder, mpp))


def encoder_scale_options(name: str, mpp: float | None) -> dict[str, Any]:
    """``{"mpp": mpp}`` for an encoder whose builder takes it (one that measures in µm, such as
    handcrafted-v2): built by name, it is told the µm/px the patches are read at."""
    import inspect

    from .encoders import available_encoders

    spec = available_encoders().get(name)
    if mpp is None or spec is None:
        return {}
    return {"mpp": float(mpp)} if "mpp" in inspect.signature(spec.builder).parameters else {}


def extract_features(
    slide: Slide | str | os.PathLike[str],
    encoder: Encoder | str,
    patch_size: int = 256,
    mpp: float = 0.5,
    batch_size: int = 64,
    device: str = "auto",
    progress: Progress | None = None,
    *,
    grid: PatchGrid | None = None,
    min_tissue: float = 0.5,
    num_workers: int = 4,
    prefetch: int = 2,
    weights: str | Path | None = None,
    cancel: threading.Event | None = None,
) -> Bag:
    """Features of every tissue patch of ``slide`` (``patch_size`` px at ``mpp`` µm/px), in grid order.

    ``encoder`` is an :class:`Encoder` or a registered name (then ``weights`` names its file).
    ``grid`` reuses a patch grid already made (its patch size and µm/px win). ``progress`` is called
    after each batch; setting ``cancel`` stops at the next batch with :class:`ExtractionCancelled`.
    """
    from ..slide import PatchReader, open_slide, patch_grid

    if not isinstance(slide, (str, os.PathLike)):
        opened = slide
    else:
        opened = open_slide(slide)
    enc = _as_encoder(encoder, device, weights, grid.mpp if grid is not None else mpp)
    if grid is None:
        grid = patch_grid(opened, patch_size, mpp, min_tissue=min_tissue)
    total = len(grid)
    features = np.empty((total, enc.dim), np.float32)
    done = 0
    if progress is not None:
        progress(0, total)
    reader = PatchReader(opened, grid, batch_size=batch_size, num_workers=num_workers, prefetch=prefetch)
    with reader:
        for _, patches in reader:
            if cancel is not None and cancel.is_set():
                raise ExtractionCancelled(f"feature extraction of {opened.path.name} was cancelled")
            out = enc.encode(patches)
            features[done:done + len(out)] = out
            done += len(out)
            if progress is not None:
                progress(done, total)
    attrs = bag_attrs(enc, opened, grid.patch_size, grid.mpp, level=grid.level, min_tissue=float(min_tissue),
                      size_level0=float(grid.size_level0), stride_level0=float(grid.stride_level0))
    return Bag(grid.coords.copy(), features, attrs)


# --- cohorts --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CohortEvent:
    """What ``extract_cohort`` reports: ``stage`` is "skipped", "busy" (another process
    holds its claim), "started", "patches" (``done`` of ``total`` patches), "done" or "failed" (``message`` says why), for slide ``index`` of ``count``."""

    stage: str
    slide_id: str
    index: int
    count: int
    done: int = 0
    total: int = 0
    message: str = ""


@dataclass(frozen=True)
class CohortResult:
    """The outcome for one slide: its bag path and whether it was computed, skipped or failed."""

    slide_id: str
    slide_path: Path
    bag_path: Path
    status: str  # "done" | "skipped" | "failed"
    n_patches: int = 0
    seconds: float = 0.0
    message: str = ""


SlideSource = Union["Project", str, os.PathLike, Mapping[str, Any], Iterable[Any]]


#: one slide of a cohort: (slide id, path, opener, µm/px set by the project or None)
SlideEntry = tuple[str, Path, Callable[[], "Slide"], Union[float, None]]
_Entry = SlideEntry


def cohort_slides(source: SlideSource) -> tuple[list[_Entry], Path | None]:
    """(slide id, path, opener, µm/px set by the project or None) for each slide, and the project's
    features folder where there is one."""
    from ..project.project import PROJECT_FILE, Project, id_from_path
    from ..slide import open_slide

    if isinstance(source, (str, os.PathLike)) and (Path(source) / PROJECT_FILE).is_file():
        source = Project.open(source, readonly=True)
    if isinstance(source, Project):
        p = source
        return [(sid, p.slide_path(sid), (lambda s=sid: p.open_slide(s)), p.record(sid).mpp)
                for sid in p.slide_ids], p.features_dir
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    items = source.items() if isinstance(source, Mapping) else ((id_from_path(Path(s)), s) for s in source)
    out: list[_Entry] = []
    seen: set[str] = set()
    for sid, path in items:
        if sid in seen:
            raise WsimilError(f"two slides would share the bag name {sid!r}; "
                              "pass a mapping of unique ids to paths")
        seen.add(sid)
        path = Path(path)
        out.append((sid, path, (lambda q=path: open_slide(q)), None))
    return out, None


def extract_cohort(
    slides_or_project: SlideSource,
    out_dir: str | os.PathLike[str] | None,
    encoder: Encoder | str,
    patch_size: int = 256,
    mpp: float = 0.5,
    batch_size: int = 64,
    device: str = "auto",
    progress: Callable[[CohortEvent], None] | None = None,
    *,
    overwrite: bool = False,
    weights: str | Path | None = None,
    cancel: threading.Event | None = None,
    poll_s: float = 0.5,
    **options: Any,
) -> list[CohortResult]:
    """One bag per slide in ``out_dir`` (``<slide id>.npz``), skipping bags already complete and current.

    ``slides_or_project`` is a :class:`Project` (or its folder), slide paths, or a mapping id → path.
    ``out_dir`` None means ``<project>/features/<encoder name>``. A slide that cannot be read is
    reported ("failed", with the reason) and the run goes on with the next; ``overwrite`` recomputes
    everything. ``options`` go to :func:`extract_features` (``min_tissue``, ``num_workers``...).

    Each slide is claimed first (:mod:`napari_wsimil.io.claims`, in ``out_dir/.claims``), so two extractions
    on one project share the slides instead of both doing all of them: a slide another live process holds is
    left for later, then reported "skipped" once its bag is there (or done here if that process died; every
    ``poll_s`` seconds until then).
    """
    slides, features_dir = cohort_slides(slides_or_project)
    enc = _as_encoder(encoder, device, weights, mpp)
    if out_dir is None:
        if features_dir is None:
            raise ValueError("out_dir is needed when the slides do not come from a project")
        out_dir = features_dir / safe_dirname(enc.name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[CohortResult] = []
    count = len(slides)

    def emit(event: CohortEvent) -> None:
        if progress is not None:
            progress(event)

    deferred: list[tuple[int, _Entry]] = []
    for index, entry in enumerate(slides):
        result = extract_slide(entry, out, enc, patch_size, mpp, batch_size, index=index, count=count,
                               emit=emit, overwrite=overwrite, cancel=cancel, options=options)
        if result.status == "busy":  # another process has it: come back once it is done
            deferred.append((index, entry))
        results.append(result)
    while deferred:  # slides another process was extracting: wait for it, then skip (or redo if it died)
        time.sleep(poll_s)
        still: list[tuple[int, _Entry]] = []
        for index, entry in deferred:
            result = extract_slide(entry, out, enc, patch_size, mpp, batch_size, index=index, count=count,
                                   emit=emit, overwrite=False, cancel=cancel, options=options, quiet_busy=True)
            if result.status == "busy":
                still.append((index, entry))
            else:
                results[index] = result
        deferred = still
    from ..io.claims import sweep_stale

    sweep_stale(out)  # claims of bags a killed run finished but never released
    return results


def bag_is_current(entry: _Entry, out: Path, enc: Encoder, patch_size: int, mpp: float) -> bool:
    """Whether ``out/<slide id>.npz`` exists and was made by ``enc`` from this unchanged slide at these settings."""
    sid, path, _opener, slide_mpp = entry
    bag_path = out / f"{sid}{BAG_SUFFIX}"
    return bag_path.exists() and not stale_reasons(bag_path, enc, path, patch_size, mpp, slide_mpp)


def extract_slide(entry: _Entry, out: Path, enc: Encoder, patch_size: int, mpp: float, batch_size: int, *,
                  index: int = 0, count: int = 1, emit: Callable[[CohortEvent], None] | None = None,
                  overwrite: bool = False, cancel: threading.Event | None = None,
                  options: Mapping[str, Any] | None = None, quiet_busy: bool = False) -> CohortResult:
    """One slide's bag ``out/<slide id>.npz`` under a claim: the unit of work that the cohort loop, a second
    process on the same project and a dask worker all run, so their outputs are the same file.

    Status "skipped" (current bag), "done", "failed" (``message`` says why) or "busy" (another live process
    holds the claim; nothing was done). The bag is written atomically before the claim is released, so a
    process killed at any point leaves either no bag or a whole one, and a stale claim of a dead process
    is taken over by the next one to try."""
    from ..io.claims import Claim, try_claim

    sid, path, opener, slide_mpp = entry
    say = emit or (lambda _e: None)
    bag_path = out / f"{sid}{BAG_SUFFIX}"

    def current() -> bool:
        return bag_is_current(entry, out, enc, patch_size, mpp)

    if not overwrite and current():
        say(CohortEvent("skipped", sid, index, count, message="up to date"))
        return CohortResult(sid, path, bag_path, "skipped")
    claim = try_claim(out, f"{sid}{BAG_SUFFIX}")  # the key every extraction of this bag uses
    if not isinstance(claim, Claim):
        if not quiet_busy:
            say(CohortEvent("busy", sid, index, count, message=f"being extracted by {claim.describe()}"))
        return CohortResult(sid, path, bag_path, "busy", message=f"claimed by {claim.describe()}")
    with claim:
        from ..io.atomic import TMP_SUFFIX

        for tmp in out.glob(f".{bag_path.name}.*{TMP_SUFFIX}"):  # a killed writer's leftovers: the bag is ours now
            tmp.unlink(missing_ok=True)
        if not overwrite and current():  # finished by another process between our check and our claim
            say(CohortEvent("skipped", sid, index, count, message="done by another process"))
            return CohortResult(sid, path, bag_path, "skipped", message="done by another process")
        say(CohortEvent("started", sid, index, count))
        t0 = time.perf_counter()
        try:
            slide = opener()
            try:
                bag = extract_features(
                    slide, enc, patch_size, mpp, batch_size, device=enc.device, cancel=cancel,
                    progress=lambda d, t: say(CohortEvent("patches", sid, index, count, d, t)),
                    **dict(options or {}),
                )
            finally:
                close = getattr(slide, "close", None)
                if close is not None:
                    close()
            bag.attrs["slide_id"] = sid
            bag.save(bag_path)
        except ExtractionCancelled:
            raise
        except (WsimilError, OSError) as exc:
            say(CohortEvent("failed", sid, index, count, message=str(exc)))
            return CohortResult(sid, path, bag_path, "failed", message=str(exc))
    seconds = time.perf_counter() - t0
    say(CohortEvent("done", sid, index, count, len(bag), len(bag)))
    return CohortResult(sid, path, bag_path, "done", len(bag), seconds)


__all__ = ["CohortEvent", "CohortResult", "ExtractionCancelled", "SlideEntry", "bag_is_current", "cohort_slides",
           "extract_cohort", "extract_features", "extract_slide"]
