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
from pathlib import Path
from typing import Any

from ..errors import WsimilError
from ..io.claims import sweep_stale
from .runner import Progress, run_slides
from .spec import ClusterHandle
from .tasks import ExtractJob, PredictJob, extract_task, predict_task, warm_worker

FAILURES_FILE = "failures.csv"


def extract_on_cluster(handle: ClusterHandle, source: Any, out_dir: str | os.PathLike[str] | None, encoder: str, *,
                       weights: str | None = None, patch: int = 256, mpp: float = 0.5, batch: int = 64,
                       device: str = "auto", min_tissue: float = 0.5, overwrite: bool = False,
                       reader_threads: int = 2, progress: Progress | None = None) -> list[dict[str, Any]]:
    """One bag per slide of ``source`` (a project, its folder, slide paths or id → path), as ``extract_cohort``
    would write them; returns each slide's result (status "done", "skipped" or "failed" with a message)."""
    from ..features.extract import cohort_slides, safe_dirname

    slides, features_dir = cohort_slides(source)
    if out_dir is None:
        if features_dir is None:
            raise WsimilError("give --out DIR for slide files (bags go inside a project by default)")
        out_dir = features_dir / safe_dirname(encoder)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [ExtractJob(sid, str(Path(path).resolve()), slide_mpp, str(out), encoder, weights, patch, mpp, batch,
                       device, min_tissue, reader_threads, overwrite)
            for sid, path, _opener, slide_mpp in slides]
    if jobs:
        warm_up(handle, encoder, weights, device, mpp)
    results = run_slides(handle, extract_task, jobs, progress)
    sweep_stale(out)  # claims of slides a killed run finished but never released
    return results


def warm_up(handle: ClusterHandle, encoder: str, weights: str | None, device: str, mpp: float) -> dict[str, float]:
    """Build the encoder in every worker now there (worker address → seconds); workers that join later build it
    at their first slide. A worker that cannot build it says why at its first slide, so errors are ignored here."""
    try:
        return handle.client.run(warm_worker, encoder, weights, device, mpp)
    except Exception:  # noqa: BLE001 - see above
        return {}


def predict_on_cluster(handle: ClusterHandle, run: str | os.PathLike[str], cohort: str | os.PathLike[str],
                       out: str | os.PathLike[str], *, weights: str = "best", device: str = "auto",
                       options: dict[str, Any] | None = None, progress: Progress | None = None
                       ) -> list[dict[str, Any]]:
    """``wsimil predict`` with one task per slide; writes ``predictions.csv`` (cohort order), ``prediction.json``
    and, when some slides failed, ``failures.csv``. A slide finished by an earlier (killed) run with the same
    weights and options is not predicted again."""
    from ..io.atomic import write_text
    from ..train.cohort import load_cohort

    cohort_path = Path(cohort).resolve()
    items = load_cohort(cohort_path).slides
    if not items:
        raise WsimilError(f"{cohort} has no slides to predict")
    pred = Path(out).resolve()
    pred.mkdir(parents=True, exist_ok=True)
    jobs = [PredictJob(s.slide_id, str(s.path), str(Path(run).resolve()), str(cohort_path), str(pred), weights,
                       device, dict(options or {})) for s in items]
    results = run_slides(handle, predict_task, jobs, progress)
    sweep_stale(pred)
    ok = [r for r in results if r["status"] in ("done", "skipped")]
    failed = [r for r in results if r["status"] == "failed"]
    if ok:
        lines = [",".join(ok[0]["header"])] + [",".join(r["row"]) for r in ok]
        write_text(pred / "predictions.csv", "\n".join(lines) + "\n")
        write_text(pred / "prediction.json", json.dumps(ok[0]["meta"], indent=1))
    if failed:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["slide_id", "path", "reason"])
        for r in failed:
            w.writerow([r["slide_id"], r.get("path", ""), r.get("message", "")])
        write_text(pred / FAILURES_FILE, buf.getvalue())
    elif (pred / FAILURES_FILE).exists():  # an earlier run's failures, all predicted now
        (pred / FAILURES_FILE).unlink()
    return results


__all__ = ["FAILURES_FILE", "extract_on_cluster", "predict_on_cluster", "warm_up"]
