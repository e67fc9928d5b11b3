"""Run one task per slide on a dask cluster and gather what they report.

dask does the hard parts: a task whose worker dies is rerun on another worker (``distributed.scheduler.
allowed-failures`` times, then ``KilledWorker``), and tasks go to workers with the resources they ask for. What is
left here: submit the slides (GPU resources when the workers have them), hand back a slide another client holds
("busy") until that client is done with it, run the region tasks of a huge slide and then its merge, and report
every slide as it finishes.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .spec import ClusterHandle

#: ``progress(finished, total, result)`` after each slide, and once with ``(0, total, None)`` before the first
Progress = Callable[[int, int, "dict[str, Any] | None"], None]
#: seconds between two tries of a slide another client holds
BUSY_RETRY_S = 1.0


def run_slides(handle: ClusterHandle | None, fn: Callable[[Any], dict[str, Any]], jobs: Sequence[Any],
               progress: Progress | None = None, *, busy_retry_s: float = BUSY_RETRY_S,
               cancel: threading.Event | None = None) -> list[dict[str, Any]]:
    """``fn(job)`` for every job on the cluster; the results in the jobs' order. A job whose task fails for good
    (its worker died too often, or it raised) is a "failed" result with the reason, never an exception. ``handle``
    None runs the same tasks one after the other in this process (``wsimil predict`` without ``--cluster`` when a
    slide failed), with the same claims, commits and results.

    A task may answer "split" (a huge slide): its ``parts`` jobs are then run (on any worker, in parallel), and
    once all of them are done or skipped its ``merge`` job, whose result is the slide's; a failed part fails the
    slide (the merge is not run). A split that also names a ``then`` job (a prediction waiting for the huge
    slide's bag) runs that job once the merge is done, and its result is the slide's. Setting ``cancel`` stops
    it: tasks not started are dropped (cancelled on the cluster), those running finish or are abandoned, and the
    slides finished so far are returned."""
    engine: _Engine = _Here(fn) if handle is None else _Dask(handle, fn)
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    split: dict[int, dict[str, Any]] = {}  # slide index → parts left, merge job, first failure, seconds
    if progress is not None:
        progress(0, len(jobs), None)
    for i, job in enumerate(jobs):
        engine.submit(i, job)
    finished = 0
    for i, job, res in engine.completed():
        status = res.get("status")
        if cancel is not None and cancel.is_set() and (status in ("busy", "split") or "region" in res) \
                and engine.cancel():
            break  # nothing more to start; a finished slide's result (below) is still recorded
        if status == "busy":  # another client has it: ask again once it may be done
            engine.submit(i, job, after_s=busy_retry_s)
            continue
        if status == "split":
            split[i] = {"left": len(res["parts"]), "regions": len(res["parts"]), "merge": res["merge"],
                        "then": res.get("then"), "failed": None, "seconds": float(res.get("seconds") or 0),
                        "cpu_s": float(res.get("cpu_s") or 0)}
            for part in res["parts"]:
                engine.submit(i, part)
            continue
        if i in split:
            state = split[i]
            state["seconds"] += float(res.get("seconds") or 0)
            state["cpu_s"] += float(res.get("cpu_s") or 0)
            if "region" in res:
                if status == "failed" and state["failed"] is None:
                    state["failed"] = res
                state["left"] -= 1
                if state["left"] > 0:
                    continue
                if state["failed"] is None:
                    engine.submit(i, state["merge"])
                    continue
                res = state["failed"]
            elif job is state["merge"] and state["then"] is not None and status in ("done", "skipped"):
                then, state["then"] = state["then"], None
                engine.submit(i, then)  # the bag is there: now the slide's own task (a prediction) runs
                continue
            del split[i]
            res = {**res, "seconds": state["seconds"], "cpu_s": state["cpu_s"], "regions": state["regions"]}
            res.pop("region", None)
        results[i] = res
        finished += 1
        if progress is not None:
            progress(finished, len(jobs), res)
        if cancel is not None and cancel.is_set() and engine.cancel():
            break
    return [r for r in results if r is not None]


def _failed(job: Any, exc: BaseException) -> dict[str, Any]:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if type(exc).__name__ == "KilledWorker":
        reason = "its worker died on every try (out of memory? a crashing reader?)"
    return {"slide_id": job.slide_id, "path": getattr(job, "path", ""), "status": "failed", "message": reason}


class _Engine(ABC):
    """Where tasks run: ``submit(index, job)``, then ``completed()`` yields ``(index, job, result)`` as they end,
    until none is left (jobs submitted meanwhile included). Two engines: dask (``--cluster``) and this process
    (plain ``wsimil predict`` falling back to one slide at a time)."""

    @abstractmethod
    def submit(self, index: int, job: Any, after_s: float = 0.0) -> None:
        """Queue ``job`` (slide ``index``), to start no sooner than ``after_s`` seconds from now."""

    @abstractmethod
    def completed(self) -> Iterator[tuple[int, Any, dict[str, Any]]]:
        """The finished tasks, as they finish."""

    def cancel(self) -> bool:
        """Drop every task not finished yet; True (the caller stops waiting)."""
        return True


class _Dask(_Engine):
    def __init__(self, handle: ClusterHandle, fn: Callable[[Any], dict[str, Any]]) -> None:
        from distributed import as_completed

        self.client, self.fn = handle.client, fn
        self.resources = {"GPU": 1} if handle.uses_gpus else None
        self.pending = as_completed([])
        self.of: dict[Any, tuple[int, Any, Any]] = {}  # key → slide index, job, future

    def submit(self, index: int, job: Any, after_s: float = 0.0) -> None:
        if after_s and not self.pending.count():
            time.sleep(after_s)  # nothing else to wait for: do not spin on a slide another client holds
        what = type(job).__name__.removesuffix("Job").lower()
        fut = self.client.submit(self.fn, job, pure=False, resources=self.resources,
                                 key=f"{getattr(self.fn, '__name__', 'task')}-{what}-{job.slide_id}-"
                                     f"{time.monotonic_ns()}")
        self.of[fut.key] = (index, job, fut)
        self.pending.add(fut)

    def completed(self) -> Iterator[tuple[int, Any, dict[str, Any]]]:
        for fut in self.pending:
            index, job, _ = self.of.pop(fut.key)
            try:
                res = fut.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker, or a bug in the task: the slide failed
                res = _failed(job, exc)
            fut.release()
            yield index, job, res

    def cancel(self) -> bool:
        futures = [fut for _, _, fut in self.of.values()]
        self.pending.clear()
        self.client.cancel(futures)
        self.of.clear()
        return True


class _Here(_Engine):
    def __init__(self, fn: Callable[[Any], dict[str, Any]]) -> None:
        self.fn = fn
        self.queue: deque[tuple[float, int, Any]] = deque()

    def submit(self, index: int, job: Any, after_s: float = 0.0) -> None:
        self.queue.append((time.monotonic() + after_s, index, job))

    def completed(self) -> Iterator[tuple[int, Any, dict[str, Any]]]:
        while self.queue:
            not_before, index, job = self.queue.popleft()
            wait = not_before - time.monotonic()
            if wait > 0:
                if any(t <= time.monotonic() for t, _, _ in self.queue):  # something else is ready first
                    self.queue.append((not_before, index, job))
                    continue
                time.sleep(wait)
            try:
                res = self.fn(job)
            except Exception as exc:  # noqa: BLE001 - as a cluster task's exception: that slide failed
                res = _failed(job, exc)
            yield index, job, res

    def cancel(self) -> bool:
        self.queue.clear()
        return True


__all__ = ["Progress", "run_slides"]
