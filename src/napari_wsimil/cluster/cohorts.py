"""Feature extraction and prediction of a whole cohort on a cluster, one task per slide.

Both write exactly what the single-process commands write, in the same places: bags in the same feature store
(``PROJECT/features/ENCODER`` or ``--out``), and ``PRED/predictions.csv``, ``prediction.json`` and the family's
maps. Prediction also accepts new, unlabelled slides (a folder of slide files, or a CSV with only a ``path``
column), and lists the slides it could not predict in ``PRED/failures.csv`` (slide_id, path, reason) while the
others complete.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import WsimilError
from ..io.claims import sweep_stale
from .runner import Progress, run_slides
from .spec import ClusterHandle
from .tasks import ExtractJob, PredictJob, extract_task, predict_task, warm_worker

FAILURES_FILE = "failures.csv"


def extract_on_cluster(handle: ClusterHandle | None, source: Any, out_dir: str | os.PathLike[str] | None, encoder: str, *,
                       weights: str | None = None, patch: int = 256, mpp: float = 0.5, batch: int = 64,
                       device: str = "auto", min_tissue: float = 0.5, overwrite: bool = False,
                       reader_threads: int = 2, region_patches: int = 0, progress: Progress | None = None,
                       cancel: threading.Event | None = None) -> list[dict[str, Any]]:
    """One bag per slide of ``source`` (a project, its folder, slide paths or id → path), as ``extract_cohort``
    would write them (``handle`` None: the same tasks in this process); returns each slide's result (status
    "done", "skipped" or "failed" with a message). A slide with more than ``region_patches`` tissue patches (0:
    none) is encoded as region tasks of about that many patches, on several workers at once, and merged into the
    same bag (``features.regions``)."""
    from ..features.extract import cohort_slides, safe_dirname

    slides, features_dir = cohort_slides(source)
    if out_dir is None:
        if features_dir is None:
            raise WsimilError("give --out DIR for slide files (bags go inside a project by default)")
        out_dir = features_dir / safe_dirname(encoder)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [ExtractJob(sid, str(Path(path).resolve()), slide_mpp, str(out), encoder, weights, patch, mpp, batch,
                       device, min_tissue, reader_threads, overwrite, max(0, int(region_patches)))
            for sid, path, _opener, slide_mpp in slides]
    if jobs and handle is not None:
        warm_up(handle, encoder, weights, device, mpp)
    results = run_slides(handle, extract_task, jobs, progress, cancel=cancel)
    sweep_stale(out)  # claims of slides a killed run finished but never released
    from ..features.regions import remove_empty_regions

    remove_empty_regions(out)
    return results


def warm_up(handle: ClusterHandle, encoder: str, weights: str | None, device: str, mpp: float) -> dict[str, float]:
    """Build the encoder in every worker now there (worker address → seconds); workers that join later build it
    at their first slide. A worker that cannot build it says why at its first slide, so errors are ignored here."""
    try:
        return handle.client.run(warm_worker, encoder, weights, device, mpp)
    except Exception:  # noqa: BLE001 - see above
        return {}


def predict_on_cluster(handle: ClusterHandle | None, run: str | os.PathLike[str], cohort: str | os.PathLike[str],
                       out: str | os.PathLike[str], *, weights: str = "best", device: str = "auto",
                       options: dict[str, Any] | None = None, progress: Progress | None = None,
                       only: Sequence[str] | None = None, failed_before: Sequence[dict[str, Any]] = (),
                       region_patches: int = 0, cancel: threading.Event | None = None) -> list[dict[str, Any]]:
    """``wsimil predict`` with one task per slide; writes ``predictions.csv`` (cohort order), ``prediction.json``
    and, when some slides failed, ``failures.csv``. A slide finished by an earlier (killed) run with the same
    weights and options is not predicted again. ``handle`` None runs the tasks in this process; ``only`` limits
    them to those slide ids, and ``failed_before`` (results of slides already known to fail) joins the failures.
    A slide with more than ``region_patches`` tissue patches (0: none) whose bag is not made yet has it encoded
    as region tasks first (``features.regions``, as ``extract_on_cluster``), then is predicted from that bag
    (families that predict from the bag store: attention MIL)."""
    from ..train.cohort import load_cohort

    cohort_path = Path(cohort).resolve()
    items = load_cohort(cohort_path).slides
    if not items:
        raise WsimilError(f"{cohort} has no slides to predict")
    if only is not None:
        keep = set(only)
        items = [s for s in items if s.slide_id in keep]
    pred = Path(out).resolve()
    pred.mkdir(parents=True, exist_ok=True)
    jobs = [PredictJob(s.slide_id, str(s.path), str(Path(run).resolve()), str(cohort_path), str(pred), weights,
                       device, {k: v for k, v in (options or {}).items() if k != "slides"},
                       max(0, int(region_patches))) for s in items]
    results = run_slides(handle, predict_task, jobs, progress, cancel=cancel)
    sweep_stale(pred)
    if any(r.get("regions") for r in results):
        _tidy_bag_store(jobs)
    ok = [r for r in results if r["status"] in ("done", "skipped")]
    if ok:
        from ..io.atomic import write_text

        lines = [",".join(ok[0]["header"])] + [",".join(r["row"]) for r in ok]
        write_text(pred / "predictions.csv", "\n".join(lines) + "\n")
        write_text(pred / "prediction.json", json.dumps(ok[0]["meta"], indent=1))
    write_failures(pred, [*failed_before, *(r for r in results if r["status"] == "failed")])
    return [*failed_before, *results]


def _tidy_bag_store(jobs: Sequence[PredictJob]) -> None:
    """The bag store's stale claims and empty ``.regions`` folder, after region tasks (as ``extract_on_cluster``).
    Only then: finding the store loads the run's family (torch) in this client process."""
    from ..features.regions import remove_empty_regions
    from .tasks import bag_job

    try:
        ej = bag_job(jobs[0]) if jobs else None
    except (WsimilError, OSError, ValueError):
        return
    if ej is not None and Path(ej.out).is_dir():
        sweep_stale(Path(ej.out))
        remove_empty_regions(Path(ej.out))


def write_failures(pred: Path, failed: Sequence[dict[str, Any]]) -> None:
    """``PRED/failures.csv`` (slide_id, path, reason) of the slides that could not be predicted; an earlier run's
    file is removed when every slide was predicted this time."""
    from ..io.atomic import write_text

    if failed:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["slide_id", "path", "reason"])
        for r in failed:
            w.writerow([r["slide_id"], r.get("path", ""), r.get("message", "")])
        write_text(pred / FAILURES_FILE, buf.getvalue())
    elif (pred / FAILURES_FILE).exists():
        (pred / FAILURES_FILE).unlink()


def unreadable_slides(items: Sequence[Any]) -> list[dict[str, Any]]:
    """A "failed" result (with the reader's reason) for each cohort slide that cannot be opened: checked before a
    single-process prediction starts, because a family's ``predict`` stops at the first slide it cannot read.
    Opening reads only the file's header and pyramid layout, so this costs milliseconds per slide."""
    from ..slide import open_slide

    bad = []
    for s in items:
        try:
            slide = open_slide(s.path, mpp=s.mpp)
        except (WsimilError, OSError, ValueError) as exc:
            bad.append({"slide_id": s.slide_id, "path": str(s.path), "status": "failed",
                        "message": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
            continue
        close = getattr(slide, "close", None)
        if close is not None:
            close()
    return bad


def predict_here(run: str | os.PathLike[str], cohort: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 weights: str = "best", device: str = "auto", options: dict[str, Any] | None = None,
                 report: Callable[[str], None] | None = None, progress: Progress | None = None
                 ) -> list[dict[str, Any]]:
    """``wsimil predict`` without ``--cluster``, as tolerant of bad slides as the cluster path: the slides that
    cannot be opened are listed in ``failures.csv`` and the family predicts the others in one call (its outputs
    exactly as before); if that call still fails (a slide that opens but cannot be decoded), the readable slides
    are predicted one task at a time in this process, as the cluster would, so that only the bad ones fail. When
    every slide fails that way the family's own error is raised (a bad run folder, not bad slides). Returns one
    result per slide ("done" or "failed" with its reason)."""
    from ..train.cohort import load_cohort
    from ..train.family import PredictRequest
    from ..train.registry import run_family

    items = load_cohort(cohort).slides
    bad = unreadable_slides(items)
    failed_ids = {r["slide_id"] for r in bad}
    good = [s.slide_id for s in items if s.slide_id not in failed_ids]
    pred = Path(out)
    if not good:
        pred.mkdir(parents=True, exist_ok=True)
        write_failures(pred, bad)
        return bad
    opts = dict(options or {})
    if bad:
        opts["slides"] = good
    family, _info = run_family(run)
    try:
        family.predict(PredictRequest(Path(run), Path(cohort), pred, weights, device, opts), report=report)
    except WsimilError as exc:
        if report is not None:
            report(f"prediction stopped ({str(exc).splitlines()[0]}); predicting the slides one at a time")
        results = predict_on_cluster(None, run, cohort, out, weights=weights, device=device, options=options,
                                     progress=progress, only=good, failed_before=bad)
        if not any(r["status"] in ("done", "skipped") for r in results):
            raise
        return results
    write_failures(pred, bad)
    return [*bad, *({"slide_id": sid, "status": "done"} for sid in good)]


__all__ = ["FAILURES_FILE", "extract_on_cluster", "predict_here", "predict_on_cluster", "unreadable_slides", "warm_up",
           "write_failures"]
