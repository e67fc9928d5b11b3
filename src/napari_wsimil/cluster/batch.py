"""A batch of slides (feature extraction or prediction) as a generator of progress events, for a window.

``run_batch`` does what ``wsimil features`` / ``wsimil predict`` do, with or without ``--cluster``, slide by slide
through the same tasks (:mod:`.tasks`: the same claims, atomic writes and outputs), and yields a
:class:`BatchEvent` after each slide (and one with the dashboard address when a cluster is used). The runner
reports through a callback from inside its loop, so the work runs in a thread of its own and the generator hands its
events over one by one: the caller (a napari worker thread, in ``_qt/batch_panel.py``) only iterates, and quitting
the generator, or setting ``cancel``, stops the batch after the slides running now. No Qt here.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WsimilError

KINDS = ("features", "predict")


@dataclass(frozen=True)
class BatchRequest:
    """What to run: ``kind`` "features" (bags of ``source`` into ``out``, or the project's features folder) or
    "predict" (the trained ``run`` on ``source`` into the ``out`` folder); ``cluster`` a ``--cluster`` spec or None
    (this process)."""

    kind: str
    source: str
    out: str | None = None
    cluster: str | None = None
    encoder: str = "handcrafted"
    patch: int = 256
    mpp: float = 0.5
    batch: int = 64
    run: str | None = None
    weights: str = "best"
    device: str = "auto"
    region_patches: int = 20000
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchEvent:
    """``done`` of ``total`` slides finished; ``result`` the slide just finished (None for a message only)."""

    done: int
    total: int
    result: dict[str, Any] | None = None
    message: str = ""


def check(req: BatchRequest) -> None:
    """A one-line :class:`WsimilError` for a request that cannot run (before any thread starts)."""
    if req.kind not in KINDS:
        raise WsimilError(f"batch kind {req.kind!r} is not one of {', '.join(KINDS)}")
    if not req.source or not Path(req.source).exists():
        raise WsimilError(f"choose the slides: a folder of slides, a cohort CSV or a project ({req.source or 'none'})")
    if req.kind == "predict":
        if not req.run or not (Path(req.run) / "run.json").is_file():
            raise WsimilError(f"choose a run folder written by training ({req.run or 'none'} has no run.json)")
        if not req.out:
            raise WsimilError("choose a folder for the predictions")
    elif not req.out and not _is_project(req.source):
        raise WsimilError("choose a folder for the feature bags (they go inside a project by default)")


def _is_project(source: str) -> bool:
    from ..project.project import PROJECT_FILE

    return (Path(source) / PROJECT_FILE).is_file()


def _slides(source: str) -> Any:
    """What ``extract_on_cluster`` takes: a project folder as it is; a cohort CSV or a folder of slide files as
    slide id → path."""
    if _is_project(source):
        return source
    from ..train.cohort import load_cohort

    return {s.slide_id: s.path for s in load_cohort(source).slides}


def _work(req: BatchRequest, emit: Any, cancel: threading.Event) -> list[dict[str, Any]]:
    from .cohorts import extract_on_cluster, predict_on_cluster

    handle = None
    if req.cluster:
        from .spec import connect

        handle = connect(req.cluster)
        emit(BatchEvent(0, 0, message=f"cluster {handle.spec}: dashboard {handle.dashboard}"))
    try:
        def progress(done: int, total: int, result: dict[str, Any] | None) -> None:
            emit(BatchEvent(done, total, result))

        if req.kind == "features":
            return extract_on_cluster(handle, _slides(req.source), req.out, req.encoder, patch=req.patch,
                                      mpp=req.mpp, batch=req.batch, device=req.device,
                                      region_patches=req.region_patches, progress=progress, cancel=cancel)
        return predict_on_cluster(handle, str(req.run), req.source, str(req.out), weights=req.weights,
                                  device=req.device, options=dict(req.options), region_patches=req.region_patches,
                                  progress=progress, cancel=cancel)
    finally:
        if handle is not None:
            handle.close()


def run_batch(req: BatchRequest, cancel: threading.Event | None = None
              ) -> Generator[BatchEvent, None, list[dict[str, Any]]]:
    """Yield a :class:`BatchEvent` as each slide finishes; return every slide's result. The work's own error
    (a bad spec, an unreadable cohort ...) is raised here, in the caller's thread."""
    check(req)
    cancel = cancel or threading.Event()
    events: queue.Queue[Any] = queue.Queue()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["results"] = _work(req, events.put, cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the generator's thread
            box["error"] = exc
        finally:
            events.put(None)

    thread = threading.Thread(target=target, name=f"batch {req.kind}", daemon=True)
    thread.start()
    try:
        while (event := events.get()) is not None:
            yield event
    finally:  # also when the caller quits the generator: stop after the running slides
        if thread.is_alive():
            cancel.set()
            thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("results", [])


__all__ = ["BatchEvent", "BatchRequest", "KINDS", "check", "run_batch"]
