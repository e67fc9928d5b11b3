"""Run one task per slide on a dask cluster and gather what they report.

dask does the hard parts: a task whose worker dies is rerun on another worker (``distributed.scheduler.
allowed-failures`` times, then ``KilledWorker``), and tasks go to workers with the resources they ask for. What is
left here: submit the slides (GPU resources when the workers have them), hand back a slide another client holds
("busy") until that client is done with it, and report every slide as it finishes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from .spec import ClusterHandle

#: ``progress(finished, total, result)`` after each slide, and once with ``(0, total, None)`` before the first
Progress = Callable[[int, int, "dict[str, Any] | None"], None]
#: seconds between two tries of a slide another client holds
BUSY_RETRY_S = 1.0


def run_slides(handle: ClusterHandle | None, fn: Callable[[Any], dict[str, Any]], jobs: Sequence[Any],
               progress: Progress | None = None, *, busy_retry_s: float = BUSY_RETRY_S) -> list[dict[str, Any]]:
    """``fn(job)`` for every job on the cluster, in the jobs' order; a job whose task fails for good (its worker
    died too often, or it raised) is a "failed" result with the reason, never an exception. ``handle`` None runs
    the same tasks one after the other in this process (``wsimil predict`` without ``--cluster`` when a slide
    failed), with the same claims, commits and results."""
    if handle is None:
        return _run_here(fn, jobs, progress, busy_retry_s)
    from distributed import as_completed

    client = handle.client
    resources = {"GPU": 1} if handle.uses_gpus else None
    index_of: dict[Any, int] = {}

    def submit(i: int) -> Any:
        fut = client.submit(fn, jobs[i], pure=False, resources=resources,
                            key=f"{getattr(fn, '__name__', 'task')}-{jobs[i].slide_id}-{time.monotonic_ns()}")
        index_of[fut.key] = i
        return fut

    results: list[dict[str, Any] | None] = [None] * len(jobs)
    if progress is not None:
        progress(0, len(jobs), None)
    pending = as_completed([submit(i) for i in range(len(jobs))])
    finished = 0
    for fut in pending:
        i = index_of.pop(fut.key)
        try:
            res = fut.result()
        except Exception as exc:  # noqa: BLE001 - KilledWorker, or a bug in the task: the slide failed
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if type(exc).__name__ == "KilledWorker":
                reason = "its worker died on every try (out of memory? a crashing reader?)"
            res = {"slide_id": jobs[i].slide_id, "path": getattr(jobs[i], "path", ""), "status": "failed",
                   "message": reason}
        fut.release()
        if res.get("status") == "busy":  # another client has it: ask again once it may be done
            time.sleep(busy_retry_s if not pending.count() else 0)
            pending.add(submit(i))
            continue
        results[i] = res
        finished += 1
        if progress is not None:
            progress(finished, len(jobs), res)
    return [r for r in results if r is not None]


def _run_here(fn: Callable[[Any], dict[str, Any]], jobs: Sequence[Any], progress: Progress | None,
              busy_retry_s: float) -> list[dict[str, Any]]:
    """The tasks in this process, in order; a slide another process holds is asked for again after the others."""
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    if progress is not None:
        progress(0, len(jobs), None)
    todo = list(range(len(jobs)))
    finished = 0
    while todo:
        busy = []
        for i in todo:
            try:
                res = fn(jobs[i])
            except Exception as exc:  # noqa: BLE001 - as a cluster task's exception: that slide failed
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                res = {"slide_id": jobs[i].slide_id, "path": getattr(jobs[i], "path", ""), "status": "failed",
                       "message": reason}
            if res.get("status") == "busy":
                busy.append(i)
                continue
            results[i] = res
            finished += 1
            if progress is not None:
                progress(finished, len(jobs), res)
        if busy:
            time.sleep(busy_retry_s)
        todo = busy
    return [r for r in results if r is not None]


__all__ = ["Progress", "run_slides"]
