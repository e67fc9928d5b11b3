"""What a dask worker runs: one task per slide, for feature extraction and for prediction.

A task gets paths and settings (small, picklable dataclasses), never pixel arrays or models: the worker opens the
slide itself, builds the encoder or loads the run once per process (``train.cohort.cohort_encoder`` keeps it), and
writes its result into the same stores the single-process path writes, under that slide's claim:

- extraction: ``features.extract.extract_slide``, the very function ``wsimil features`` runs per slide, so the
  bags are byte-for-byte the same computation;
- prediction: the run's family ``predict`` restricted to the one slide (``options["slides"]``) into a private
  folder ``PRED/.parts/<slide>``, whose files are then moved into ``PRED`` (``os.replace``, atomic) and whose
  predictions row becomes ``PRED/.done/<slide>.json`` — the slide's commit point. A worker killed before that
  leaves only a hidden part folder, removed by the next task that claims the slide.

Each returns a plain dict (status, slide id, seconds, message ...), which is all that travels back.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WsimilError

PARTS_DIR = ".parts"
DONE_DIR = ".done"
#: how long a task waits for a slide another client holds before handing it back as "busy"
BUSY_WAIT_S = 2.0


@dataclass(frozen=True)
class ExtractJob:
    """One slide's feature bag: what ``wsimil features`` would do for it."""

    slide_id: str
    path: str
    slide_mpp: float | None
    out: str
    encoder: str
    weights: str | None = None
    patch: int = 256
    mpp: float = 0.5
    batch: int = 64
    device: str = "auto"
    min_tissue: float = 0.5
    reader_threads: int = 2
    overwrite: bool = False
    #: a slide with more tissue patches than this is extracted as region tasks (0: never; see features.regions)
    region_patches: int = 0


@dataclass(frozen=True)
class _SlidePart:
    """A job on part of one slide's extraction: it names the slide as a whole job does (the runner's results)."""

    slide: ExtractJob

    @property
    def slide_id(self) -> str:
        return self.slide.slide_id

    @property
    def path(self) -> str:
        return self.slide.path


@dataclass(frozen=True)
class RegionJob(_SlidePart):
    """Patches ``start:stop`` of a huge slide's grid: one region task (``features.regions.extract_region``)."""

    start: int
    stop: int


@dataclass(frozen=True)
class MergeJob(_SlidePart):
    """A huge slide's bag from its region parts (``features.regions.merge_regions``), once every region is done."""

    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class PredictJob:
    """One slide's prediction: what ``wsimil predict`` would write for it."""

    slide_id: str
    path: str
    run: str
    cohort: str
    out: str
    weights: str = "best"
    device: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    #: a slide with more tissue patches than this whose bag is not made yet has it extracted as region tasks
    #: first (families with a :meth:`~napari_wsimil.train.family.MethodFamily.bag_store` only; 0: never)
    region_patches: int = 0

    def signature(self) -> dict[str, Any]:
        """What a finished slide's prediction depends on: a resumed run with another signature redoes it."""
        run = Path(self.run)
        stamp = [(p.name, p.stat().st_mtime_ns) for p in sorted(run.glob("*.safetensors"))]
        opts = {k: v for k, v in self.options.items() if k != "slides"}
        sig = {"run": str(run.resolve()), "weights": self.weights, "options": opts, "checkpoints": stamp}
        return json.loads(json.dumps(sig))  # as it reads back from a done marker (tuples become lists)


def _one_thread() -> None:
    """A one-thread dask worker runs one task at a time: one torch thread each, or two workers on two cores run
    four threads and both slow down (dask already sets OMP_NUM_THREADS=1 in the processes it spawns; a worker
    started by hand may not have)."""
    try:
        from distributed import get_worker

        threads = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        return  # not in a worker: leave the caller's setting alone
    import torch

    if torch.get_num_threads() != 1 and threads >= 1:
        torch.set_num_threads(1)


def _result(job: Any, status: str, **extra: Any) -> dict[str, Any]:
    return {"slide_id": job.slide_id, "path": job.path, "status": status, "host": socket.gethostname(),
            "pid": os.getpid(), **extra}


def extract_task(job: ExtractJob | RegionJob | MergeJob) -> dict[str, Any]:
    """Extract one slide's bag into ``job.out`` (see the module docstring); "busy" when another client holds it.

    With ``job.region_patches`` set, a slide whose grid has more patches than that is not extracted here: the
    result is "split", carrying its :class:`RegionJob` s and the :class:`MergeJob` to run once they are all done
    (``runner.run_slides`` runs them; region and merge jobs come back to this function)."""
    from ..features.extract import bag_is_current, extract_slide
    from ..slide import open_slide
    from ..train.cohort import cohort_encoder

    _one_thread()
    t0, c0 = time.perf_counter(), time.process_time()
    one = job if isinstance(job, ExtractJob) else job.slide
    enc = cohort_encoder(one.encoder, one.weights, one.device, one.mpp)
    t_enc = time.perf_counter() - t0
    path = Path(one.path)
    entry = (one.slide_id, path, lambda: open_slide(path, mpp=one.slide_mpp), one.slide_mpp)
    out = Path(one.out)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(job, ExtractJob):
        return _region_or_merge(job, entry, out, enc, t0, c0)
    options: dict[str, Any] = {"min_tissue": job.min_tissue, "num_workers": job.reader_threads}
    if job.region_patches > 0 and (job.overwrite or not bag_is_current(entry, out, enc, job.patch, job.mpp)):
        from ..errors import WsimilError

        try:
            plan = _split_plan(job, entry)
        except (WsimilError, OSError) as exc:
            return _result(job, "failed", seconds=time.perf_counter() - t0, message=str(exc))
        if isinstance(plan, dict):
            return _result(job, "split", **plan, seconds=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
        options["grid"] = plan  # computed once: extract_slide would tile the slide again
    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        r = extract_slide(entry, out, enc, job.patch, job.mpp, job.batch, overwrite=job.overwrite, options=options)
        if r.status != "busy" or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    return _result(job, r.status, n_patches=r.n_patches, seconds=time.perf_counter() - t0, encoder_s=t_enc,
                   cpu_s=time.process_time() - c0, message=r.message)


def _split_plan(job: ExtractJob, entry: Any) -> Any:
    """The slide's region jobs and merge job (``{"n_patches", "parts", "merge"}``) when its grid has more than
    ``job.region_patches`` patches, else the grid itself (the caller extracts the slide whole)."""
    from ..features.regions import region_ranges, slide_grid

    grid = slide_grid(entry, job.patch, job.mpp, job.min_tissue)
    if len(grid) <= job.region_patches:
        return grid
    ranges = tuple(region_ranges(len(grid), job.batch, job.region_patches))
    return {"n_patches": len(grid), "parts": [RegionJob(job, a, b) for a, b in ranges], "merge": MergeJob(job, ranges)}


def _region_or_merge(job: RegionJob | MergeJob, entry: Any, out: Path, enc: Any, t0: float, c0: float
                     ) -> dict[str, Any]:
    from ..features.regions import extract_region, merge_regions

    one = job.slide
    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        if isinstance(job, RegionJob):
            r = extract_region(entry, out, enc, one.patch, one.mpp, one.batch, job.start, job.stop,
                               min_tissue=one.min_tissue, num_workers=one.reader_threads)
        else:
            r = merge_regions(entry, out, enc, one.patch, one.mpp, [tuple(x) for x in job.ranges])
        if r.status != "busy" or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    extra = {"region": (job.start, job.stop)} if isinstance(job, RegionJob) else {}
    return _result(job, r.status, n_patches=r.n_patches, seconds=time.perf_counter() - t0,
                   cpu_s=time.process_time() - c0, message=r.message, **extra)


def warm_worker(encoder: str, weights: str | None, device: str, mpp: float) -> float:
    """Import torch and build the encoder in this worker (``Client.run`` on every worker before the first slide),
    so that no slide's time includes them; returns the seconds it took."""
    from ..train.cohort import cohort_encoder

    t0 = time.perf_counter()
    _one_thread()
    cohort_encoder(encoder, weights, device, mpp)
    return time.perf_counter() - t0


# --- prediction ------------------------------------------------------------------------------------------

def done_marker(out: Path, slide_id: str) -> Path:
    return out / DONE_DIR / f"{slide_id}.json"


def read_done(out: Path, slide_id: str, signature: dict[str, Any]) -> dict[str, Any] | None:
    """The committed prediction of ``slide_id`` when it was made with ``signature``, else None."""
    try:
        d = json.loads(done_marker(out, slide_id).read_text())
    except (OSError, ValueError):
        return None
    return d if d.get("signature") == signature else None


def _move_outputs(part: Path, out: Path) -> None:
    """Every file of the part folder but its own predictions.csv and prediction.json, into ``out`` (atomic
    renames on one file system)."""
    for src in sorted(p for p in part.rglob("*") if p.is_file()):
        rel = src.relative_to(part)
        if rel.parts[0] in ("predictions.csv", "prediction.json"):
            continue
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


def bag_job(job: PredictJob) -> ExtractJob | None:
    """The extraction of the slide's bag exactly as the run's family would do it when predicting (its bag store,
    encoder and settings; ``ensure_features``'s batch and tissue threshold, which are ``ExtractJob``'s defaults),
    or None when the family does not predict from the bag store or the bags are imported (nothing to encode)."""
    from ..features.interop import is_imported
    from ..train.cohort import load_cohort
    from ..train.registry import run_family

    family, _info = run_family(job.run)
    cohort = load_cohort(Path(job.cohort)).only([job.slide_id])
    store = family.bag_store(Path(job.run), cohort)
    if store is None or is_imported(store.encoder) or not cohort.slides:
        return None
    s = cohort.slides[0]
    return ExtractJob(s.slide_id, str(s.path), s.mpp, str(store.folder), store.encoder, store.weights, store.patch,
                      store.mpp, device=job.device, region_patches=job.region_patches)


def _split_for_regions(job: PredictJob, t0: float) -> dict[str, Any] | None:
    """A "split" result when the slide is huge and its bag is not there yet: its region jobs, their merge, and
    then this prediction again (``then``), which finds the merged bag in the store. None: predict it whole (a
    slide that cannot even be tiled is left to the family, whose own error goes to failures.csv)."""
    from ..errors import WsimilError
    from ..features.extract import bag_is_current
    from ..slide import open_slide
    from ..train.cohort import cohort_encoder

    try:
        ej = bag_job(job)
        if ej is None:
            return None
        enc = cohort_encoder(ej.encoder, ej.weights, ej.device, ej.mpp)
        path = Path(ej.path)
        entry = (ej.slide_id, path, lambda: open_slide(path, mpp=ej.slide_mpp), ej.slide_mpp)
        if bag_is_current(entry, Path(ej.out), enc, ej.patch, ej.mpp):
            return None
        plan = _split_plan(ej, entry)
    except (WsimilError, OSError, ValueError):
        return None
    if not isinstance(plan, dict):
        return None
    Path(ej.out).mkdir(parents=True, exist_ok=True)
    return _result(job, "split", **plan, then=job, seconds=time.perf_counter() - t0)


def predict_task(job: PredictJob | RegionJob | MergeJob) -> dict[str, Any]:
    """Predict one slide with the run's family into ``job.out`` (see the module docstring).

    With ``job.region_patches`` set, a huge slide whose bag is not made yet answers "split" (see
    :func:`_split_for_regions`); its region and merge jobs come back here and run as :func:`extract_task`."""
    import csv

    from ..io.atomic import write_text
    from ..io.claims import Claim, try_claim
    from ..train.family import PredictRequest
    from ..train.registry import run_family

    if not isinstance(job, PredictJob):
        return extract_task(job)
    _one_thread()
    t0 = time.perf_counter()
    out = Path(job.out)
    signature = job.signature()
    if (done := read_done(out, job.slide_id, signature)) is not None:
        return _result(job, "skipped", seconds=0.0, row=done["row"], header=done["header"], meta=done["meta"])
    if job.region_patches > 0 and (split := _split_for_regions(job, t0)) is not None:
        return split
    deadline = time.monotonic() + BUSY_WAIT_S
    while not isinstance(claim := try_claim(out, job.slide_id), Claim):
        if time.monotonic() > deadline:
            return _result(job, "busy", message=f"claimed by {claim.describe()}")
        time.sleep(0.25)
    with claim:
        if (done := read_done(out, job.slide_id, signature)) is not None:  # finished by another client
            return _result(job, "skipped", seconds=0.0, row=done["row"], header=done["header"], meta=done["meta"])
        parts = out / PARTS_DIR
        for old in parts.glob(f"{job.slide_id}.*"):  # a dead attempt's leftovers: the claim is ours now
            shutil.rmtree(old, ignore_errors=True)
        part = parts / f"{job.slide_id}.{os.getpid()}"
        part.mkdir(parents=True, exist_ok=True)
        try:
            family, _info = run_family(job.run)
            request = PredictRequest(Path(job.run), Path(job.cohort), part, job.weights, job.device,
                                     {**job.options, "slides": [job.slide_id]})
            meta = family.predict(request, report=None)
            with open(part / "predictions.csv", newline="") as fh:
                rows = list(csv.reader(fh))
            if len(rows) != 2 or rows[1][0] != job.slide_id:
                raise WsimilError(f"the {family.name} family predicted {len(rows) - 1} slides when asked for "
                                  f"{job.slide_id} alone: it does not support --cluster (options['slides'])")
            _move_outputs(part, out)
            record = {"slide_id": job.slide_id, "header": rows[0], "row": rows[1], "meta": meta,
                      "signature": signature}
            write_text(done_marker(out, job.slide_id), json.dumps(record))
        except (WsimilError, OSError, ValueError) as exc:
            return _result(job, "failed", seconds=time.perf_counter() - t0, message=str(exc).splitlines()[0])
        finally:
            shutil.rmtree(part, ignore_errors=True)
    return _result(job, "done", seconds=time.perf_counter() - t0, row=rows[1], header=rows[0], meta=meta)


__all__ = ["ExtractJob", "MergeJob", "PredictJob", "RegionJob", "bag_job", "done_marker", "extract_task", "predict_task",
           "read_done", "warm_worker"]
