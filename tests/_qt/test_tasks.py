"""The one background-task helper of every dock widget: work off the main thread, results and errors on it."""

from __future__ import annotations

import logging
import threading

import pytest

pytestmark = pytest.mark.gui
pytest.importorskip("napari")


@pytest.fixture
def runner(qtbot, monkeypatch):
    from napari.utils import notifications
    from qtpy.QtWidgets import QLabel, QWidget

    from napari_wsimil._qt.tasks import TaskRunner

    parent = QWidget()
    qtbot.addWidget(parent)
    label = QLabel(parent)
    r = TaskRunner(parent, status=label)
    r.notes = []
    r.owner = parent  # the runner lives as long as its widget
    for level in ("error", "warning", "info"):
        monkeypatch.setattr(notifications, f"show_{level}",
                            lambda message, level=level: r.notes.append((level, message)))
    return r, label


def _wait(qtbot, r) -> None:
    qtbot.waitUntil(lambda: not r.busy, timeout=10_000)


def test_function_runs_off_the_main_thread_and_its_result_arrives_on_it(runner, qtbot):
    r, label = runner
    seen = {}
    release = threading.Event()

    def work():
        seen["work"] = threading.current_thread()
        release.wait(5)
        return 42

    changes = []
    r.changed.connect(lambda: changes.append(r.busy))
    worker = r.run("Counting", work, lambda v: seen.update(done=threading.current_thread(), value=v))
    assert r.busy and r.workers == (worker,) and label.text() == "Counting…"
    assert worker.pbar.desc == "Counting"  # napari's activity dock shows it
    fired = []
    from qtpy.QtCore import QTimer

    QTimer.singleShot(50, lambda: fired.append(True))
    qtbot.waitUntil(lambda: bool(fired), timeout=2_000)  # the event loop runs while the work blocks
    release.set()
    _wait(qtbot, r)
    assert seen["value"] == 42 and seen["done"] is threading.main_thread()
    assert seen["work"] is not threading.main_thread()
    assert label.text() == "" and changes == [True, False] and not r.notes


@pytest.mark.parametrize("exc, shown", [
    (None, "Reading slide failed: the slide is broken"),
    (ValueError("bad value"), "Reading slide failed: ValueError: bad value"),
])
def test_errors_become_one_notification_and_a_logged_traceback(runner, qtbot, caplog, exc, shown):
    from napari_wsimil.errors import WsimilError

    r, label = runner
    failed = []

    def work():
        raise exc if exc is not None else WsimilError("the slide is broken")

    with caplog.at_level(logging.ERROR, logger="napari_wsimil._qt"):
        r.run("Reading slide", work, lambda v: pytest.fail("done after a failure"),
              failed=lambda e: failed.append((e, threading.current_thread())))
        _wait(qtbot, r)
    assert r.notes == [("error", shown)] and label.text() == shown
    assert failed and failed[0][1] is threading.main_thread()
    assert any(rec.exc_info for rec in caplog.records)


def test_a_failing_view_update_is_reported_too(runner, qtbot):
    r, _ = runner
    r.run("Drawing", lambda: 1, lambda v: 1 / 0)
    _wait(qtbot, r)
    assert r.notes == [("error", "Drawing failed: ZeroDivisionError: division by zero")]


def test_closing_the_widget_quits_its_running_tasks(qtbot):
    from qtpy.QtWidgets import QWidget

    from napari_wsimil._qt.tasks import TaskRunner

    parent = QWidget()
    r = TaskRunner(parent)
    stop = threading.Event()

    def forever():
        while not stop.is_set():
            yield 1
            stop.wait(0.01)

    worker = r.run_generator("Looping", forever, lambda v: None)
    qtbot.waitUntil(lambda: worker.is_running, timeout=5_000)
    parent.deleteLater()  # the window closed
    del parent, r
    qtbot.waitUntil(lambda: worker.abort_requested and not worker.is_running, timeout=5_000)
    stop.set()


def test_generator_values_arrive_in_order_on_the_main_thread_and_quit_stops_it(runner, qtbot):
    r, _ = runner
    got, threads, done = [], set(), []

    def count():
        for i in range(3):
            yield i
        return "end"

    r.run_generator("Counting", count, lambda v: (got.append(v), threads.add(threading.current_thread())),
                    done.append)
    _wait(qtbot, r)
    assert got == [0, 1, 2] and threads == {threading.main_thread()} and done == ["end"]

    stop = threading.Event()

    def forever():
        while not stop.is_set():
            yield 1
            stop.wait(0.01)

    w = r.run_generator("Looping", forever, lambda v: None, done.append)
    r.report("from the worker")  # what a worker's progress callback calls
    w.quit()
    _wait(qtbot, r)
    stop.set()
    assert done == ["end"]  # a quit task returns nothing

    def broken():
        yield 1
        raise RuntimeError("mid-way")

    r.run_generator("Breaking", broken, lambda v: None)
    _wait(qtbot, r)
    assert r.notes == [("error", "Breaking failed: RuntimeError: mid-way")]
