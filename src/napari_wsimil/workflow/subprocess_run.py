"""Training in a child process, seen from the parent as an iterator of the same events.

Why: feature extraction, tissue masks and checkpoint maps run C code that holds the GIL for 100 ms and
more at a time; in a thread of the GUI process that freezes napari's event loop. In a child process it
cannot. The parent only waits on a queue (which releases the GIL), so the window stays responsive, and a
crash in the child (a C library on a bad slide) ends the run with a message instead of the application.

Cancel terminates the child: checkpoints are written atomically (see ``engine``), so the run resumes
from its last complete epoch. Pause stops the child with SIGSTOP and resumes it with SIGCONT (POSIX),
so pausing really stops the computation rather than only the delivery of its events.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
from typing import Any

from ..errors import WsimilError

_POLL_S = 0.2


def _child(spec: Any, watch: list[str], q: Any, added: list[Any] | None = None) -> None:
    """Runs in the child: prepare and train, sending ("report" | "event" | "error" | "end", payload).

    ``added`` are the methods the parent registered at run time (a notebook's or a test's family): a
    spawned child starts with the built-in registry only.

    The child yields the CPU to the window: a lower priority, and one core left free for the GUI's
    thread when there are few (on 2 cores torch would otherwise take both)."""
    try:
        if hasattr(os, "nice"):
            os.nice(5)
        import torch

        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1)))
    except Exception:  # noqa: BLE001 - a scheduling hint only
        pass
    try:
        from ..train.registry import register
        from .live import prepare_run, train_with_maps

        if added:
            register(*added, replace=True)
        prepared = prepare_run(spec, report=lambda text: q.put(("report", text)))
        for ev in train_with_maps(prepared, watch):
            q.put(("event", ev))
        q.put(("end", None))
    except WsimilError as exc:
        q.put(("error", str(exc)))
    except BaseException as exc:  # noqa: BLE001 - anything else still reaches the user as a message
        import traceback

        q.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class SubprocessTraining:
    """Iterator over a child process's training events; ``report`` receives its progress lines."""

    def __init__(self, spec: Any, watch: list[str] | tuple[str, ...] = (), report: Any = None):
        from ..train.registry import added

        ctx = mp.get_context("spawn")  # fork would copy Qt and torch thread state
        self._q = ctx.Queue()
        self._report = report
        self._proc = ctx.Process(target=_child, args=(spec, list(watch), self._q, added()), daemon=True,
                                 name="wsimil-training")
        self._proc.start()
        self._done = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def __iter__(self) -> SubprocessTraining:
        return self

    def __next__(self) -> Any:
        while not self._done:
            try:
                kind, payload = self._q.get(timeout=_POLL_S)
            except queue_mod.Empty:
                if not self._proc.is_alive():
                    self._done = True
                    code = self._proc.exitcode
                    raise WsimilError(f"the training process stopped unexpectedly (exit code {code}); the run "
                                      "keeps its last complete epoch and can be resumed") from None
                continue
            if kind == "report":
                if self._report is not None:
                    self._report(payload)
            elif kind == "event":
                return payload
            elif kind == "error":
                self._done = True
                self._proc.join(timeout=5)
                raise WsimilError(payload)
            else:  # "end"
                self._done = True
                self._proc.join(timeout=10)
        raise StopIteration

    def pause(self) -> None:
        if self._proc.is_alive() and hasattr(signal, "SIGSTOP"):
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc.is_alive() and hasattr(signal, "SIGCONT"):
            os.kill(self._proc.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the child (cancel, or the consumer went away); safe to call twice."""
        self._done = True
        if self._proc.is_alive():
            self.resume()  # a stopped process does not handle SIGTERM until continued
            self._proc.terminate()
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


__all__ = ["SubprocessTraining"]
