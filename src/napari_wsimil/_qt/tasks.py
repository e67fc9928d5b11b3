"""Background work for every dock widget: one helper over ``napari.qt.threading``.

A :class:`TaskRunner` runs a function, or iterates a generator function, in a napari worker thread:

- its progress shows in napari's activity dock (an indeterminate bar named after the task: a
  determinate one is advanced through ``QApplication.processEvents()``, which would re-enter the
  widget's handlers mid-event; widgets that count epochs show that count themselves);
- an exception in the worker is caught there and handed to the main thread as a value, never
  re-raised: the user reads one notification (our own errors are written for them, anything else
  gets its type), the traceback goes to the log;
- ``done``, ``yielded`` and ``failed`` callbacks run on the main thread (the worker's signals are
  delivered there), so layers are only ever added or changed on the main thread;
- the widget's status label shows ``"<task>…"`` while it runs and is cleared when the last task ends,
  unless something else was written there in the meantime.

Workers are kept until they finish (``busy``, which tests wait on); quitting the widget's window asks
the running ones to stop at their next yield.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from qtpy.QtCore import QObject, QTimer, Signal

from ..errors import WsimilError
from ._autosave import notify

log = logging.getLogger(__name__)


@dataclass
class Failure:
    """An exception caught in a worker, handed to the main thread as a value."""

    exc: BaseException


def message(exc: BaseException) -> str:
    """What the user reads: our own errors are written for them; anything else gets its type."""
    return str(exc) if isinstance(exc, WsimilError) else f"{type(exc).__name__}: {exc}"


def report_failure(what: str, exc: BaseException) -> str:
    """A readable notification for the user, the traceback for the log; returns the text shown."""
    log.error("%s failed", what, exc_info=(type(exc), exc, exc.__traceback__))
    text = f"{what} failed: {message(exc)}"
    notify(text)
    return text


class _Closer(QObject):
    """Quits a destroyed widget's running tasks. The receiver of ``destroyed`` must outlive the widget: a
    slot of the widget's own children is disconnected before the signal comes, and a lambda's proxy slot
    is freed while Qt deletes the widget (a segmentation fault in PyQt6)."""

    _alive: set[_Closer] = set()

    def __init__(self, workers: list[Any]):
        super().__init__()
        self._workers = workers

    @classmethod
    def watch(cls, widget: QObject, workers: list[Any]) -> None:
        closer = cls(workers)
        cls._alive.add(closer)
        widget.destroyed.connect(closer.close)

    def close(self, *_: Any) -> None:
        for worker in list(self._workers):
            worker.quit()
        QTimer.singleShot(0, self._forget)  # not while the signal is delivered to this object

    def _forget(self) -> None:
        self._alive.discard(self)


class TaskRunner(QObject):
    """Runs a widget's background tasks; see the module doc."""

    changed = Signal()  # a task started or ended (widgets refresh their buttons)
    message = Signal(str)  # progress lines from worker threads, delivered on the main thread

    def __init__(self, parent: QObject, status: Any = None):
        super().__init__(parent)
        self._status = status  # a QLabel (or anything with text/setText), or None
        self._workers: list[Any] = []
        if status is not None:
            self.message.connect(status.setText)
        _Closer.watch(parent, self._workers)

    # --- state -----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self._workers)

    @property
    def workers(self) -> tuple[Any, ...]:
        return tuple(self._workers)

    def report(self, text: str) -> None:
        """Safe to call from a worker thread: the line reaches the status label through a queued signal."""
        try:
            self.message.emit(str(text))
        except RuntimeError:  # the widget was closed while the worker ran
            pass

    def quit_all(self, *_: Any) -> None:
        """Ask every running task to stop (generators stop at their next yield)."""
        for worker in list(self._workers):
            worker.quit()

    # --- running ---------------------------------------------------------------------------------
    def run(self, what: str, func: Callable[[], Any], done: Callable[[Any], Any] | None = None, *,
            failed: Callable[[BaseException], Any] | None = None) -> Any:
        """``func()`` in a worker; ``done(result)`` on the main thread, or a notification if either failed."""

        def work() -> Any:
            try:
                return func()
            except Exception as exc:  # noqa: BLE001 - handed to the main thread as a value
                return Failure(exc)

        return self._start(what, work, done, failed, None)

    def run_generator(self, what: str, func: Callable[[], Generator[Any, Any, Any]],
                      yielded: Callable[[Any], Any], done: Callable[[Any], Any] | None = None, *,
                      failed: Callable[[BaseException], Any] | None = None, progress: bool = True) -> Any:
        """Iterate ``func()`` in a worker, ``yielded(value)`` on the main thread for each value; the worker
        can be paused, resumed and quit (it stops at its next yield). ``progress`` False: no indeterminate bar in
        the activity dock (the caller shows a determinate one of its own, advanced from ``yielded``)."""

        def work() -> Generator[Any, Any, Any]:
            try:
                return (yield from func())
            except Exception as exc:  # noqa: BLE001 - handed to the main thread as a value
                return Failure(exc)

        return self._start(what, work, done, failed, yielded, progress)

    def _start(self, what: str, work: Callable[[], Any], done: Callable[[Any], Any] | None,
               failed: Callable[[BaseException], Any] | None, yielded: Callable[[Any], Any] | None,
               progress: bool = True) -> Any:
        from napari.qt.threading import create_worker

        def returned(result: Any) -> None:
            if isinstance(result, Failure):
                self._failed(what, result.exc, failed)
            elif done is not None:
                try:
                    done(result)
                except Exception as exc:  # noqa: BLE001 - a failing view update is reported, not raised
                    self._failed(what, exc, failed)

        def each(value: Any) -> None:
            try:
                yielded(value)
            except Exception as exc:  # noqa: BLE001
                self._failed(what, exc, failed)

        worker = create_worker(work, _progress={"desc": what} if progress else None)
        worker.returned.connect(returned)
        if yielded is not None:
            worker.yielded.connect(each)
        worker.finished.connect(lambda: self._finished(worker))
        self._workers.append(worker)
        self._set_status(f"{what}…")
        self.changed.emit()
        worker.start()
        return worker

    def _failed(self, what: str, exc: BaseException, failed: Callable[[BaseException], Any] | None) -> None:
        self._set_status(report_failure(what, exc))
        if failed is not None:
            failed(exc)

    def _finished(self, worker: Any) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        try:
            if not self._workers and self._status is not None and self._status.text().endswith("…"):
                self._status.setText("")
            self.changed.emit()
        except RuntimeError:  # the widget was closed while the worker ran
            pass

    def _set_status(self, text: str) -> None:
        if self._status is not None:
            self._status.setText(text)


__all__ = ["Failure", "TaskRunner", "message", "report_failure"]
