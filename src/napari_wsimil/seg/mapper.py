"""The mapping worker: recomputes probability maps with fresh weights while the trainer trains.

It runs in a thread of the training process (torch releases the GIL in its kernels, so mapping and
training overlap on the CPU cores or share the GPU) with its own copy of the network. The trainer hands it
weights after each epoch (:meth:`MappingWorker.update_weights`); the worker maps one slide at a time, the
slide chosen by its own :class:`~.sampling.SlideScheduler`, writes the map to ``maps_dir`` (zarr, which
napari can show live) and publishes the slide's sampling grid to the :class:`~.sampling.GridBoard`.

The worker idles once every slide has been mapped with the current weights (re-mapping with the same
weights would only take cores from the trainer), and wakes up when new weights arrive.

A crash in the worker is kept and re-raised by :meth:`check` in the trainer, which then stops with the
mapper's error instead of waiting for maps that will never come. :meth:`wait_for` lets the trainer wait
until maps are at most ``staleness`` epochs behind, and counts the time it waited.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError
from .data import SegSlide
from .maps import compute_map
from .sampling import GridBoard, SlideScheduler


class MapperError(WsimilError):
    """The mapping worker failed; the message carries its error."""


class MappingWorker:
    """See the module doc. ``net`` is copied; ``maps_dir`` None keeps maps in memory only (grids)."""

    def __init__(self, net: Any, slides: Sequence[SegSlide], board: GridBoard, *, mpp: float,
                 maps_dir: Path | None, device: Any = "cpu", tile: int = 512, margin: int = 32,
                 revisit_epochs: int = 5, seed: int = 0, threads: int = 0,
                 on_map: Callable[[str, int], None] | None = None):
        self.net = copy.deepcopy(net).to(device).eval()
        self.slides = list(slides)
        self.board = board
        self.mpp, self.maps_dir, self.device = mpp, maps_dir, device
        self.tile, self.margin = tile, margin
        self.scheduler = SlideScheduler([s.label for s in slides], revisit_epochs)
        self.rng = np.random.default_rng([seed, 7])
        self.on_map = on_map
        # Torch's CPU thread count is per thread: the worker's own team, sized so that it and the trainer do
        # not both spin a full team on the same cores (which made both several times slower).
        self.threads = threads if threads > 0 else max(1, (os.cpu_count() or 2) // 2)
        self.error: BaseException | None = None
        self.maps_done = 0
        self.wait_seconds = 0.0
        self._weights: dict[str, Any] | None = None
        self._weights_epoch = 0
        self._epoch = 0
        self._mapped_with = np.full(len(self.slides), -1)  # epoch of the weights each slide's map came from
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wsimil-mapper", daemon=True)

    # ---------------------------------------------------------------------------------- trainer side
    def start(self) -> MappingWorker:
        self._thread.start()
        return self

    def update_weights(self, state_dict: dict[str, Any], epoch: int) -> None:
        """Weights the trainer has after ``epoch`` epochs (copied: the trainer goes on changing its own)."""
        snap = {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
        with self._cond:
            self._weights, self._weights_epoch = snap, epoch
            self._cond.notify_all()

    def check(self) -> None:
        """Raise the worker's error, if it had one."""
        if self.error is not None:
            raise MapperError(f"the mapping worker failed: {type(self.error).__name__}: {self.error}") from self.error

    def wait_for(self, epoch: int, staleness: int, timeout: float | None = None) -> float:
        """Block until some map was computed with weights of epoch >= ``epoch - staleness`` (or the worker
        failed); returns the seconds waited (also added to ``wait_seconds``)."""
        need = epoch - staleness
        return self._wait_until(lambda: self.board.latest_epoch >= need, timeout,
                                "the mapping worker stopped before producing the maps the trainer needs")

    def wait_all(self, epoch: int) -> float:
        """Block until every slide's map comes from weights of epoch >= ``epoch`` (or the worker failed);
        returns the seconds waited (also added to ``wait_seconds``). With weights handed over only before
        this call, the maps are then a function of those weights alone: what makes ``sync_maps`` reproducible."""
        return self._wait_until(lambda: not bool((self._mapped_with < epoch).any()), None,
                                "the mapping worker stopped before mapping every slide")

    def _wait_until(self, done: Callable[[], bool], timeout: float | None, stopped: str) -> float:
        """Wait for ``done()`` (or the worker's error, a stop, or ``timeout``); the worker's error is raised,
        and ``stopped`` if the worker ended without ``done()``."""
        t0 = time.perf_counter()
        with self._cond:
            while not done() and self.error is None and not self._stop.is_set() and self._thread.is_alive():
                left = None if timeout is None else timeout - (time.perf_counter() - t0)
                if left is not None and left <= 0:
                    break
                self._cond.wait(0.2 if left is None else min(left, 0.2))
        waited = time.perf_counter() - t0
        self.wait_seconds += waited
        self.check()
        if not done() and not self._thread.is_alive():
            raise MapperError(stopped)
        return waited

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---------------------------------------------------------------------------------- worker side
    def _take_weights(self) -> None:
        with self._cond:
            w, ep = self._weights, self._weights_epoch
            self._weights = None
        if w is not None:
            self.net.load_state_dict(w)
            self.net.eval()
            self._epoch = ep

    def _run(self) -> None:
        try:
            if str(self.device).startswith("cpu"):
                import torch

                torch.set_num_threads(self.threads)
            while not self._stop.is_set():
                self._take_weights()
                stale = np.flatnonzero(self._mapped_with < self._epoch)
                if len(stale) == 0:  # every map is as fresh as the weights: idle until new ones
                    with self._cond:
                        while self._weights is None and not self._stop.is_set():
                            self._cond.wait(0.5)
                    continue
                i = int(self.scheduler.draw(1, self._epoch, self.rng, self.board.q_sums())[0])
                if self._mapped_with[i] >= self._epoch:  # drawn again with the same weights: take the stalest
                    i = int(stale[np.argmin(self._mapped_with[stale])])
                slide = self.slides[i]
                out = None if self.maps_dir is None else Path(self.maps_dir) / f"{slide.slide_id}.zarr"
                grid = compute_map(self.net, slide, self.mpp, tile=self.tile, margin=self.margin,
                                   device=self.device, out=out, block=self.board.block, alpha=self.board.alpha,
                                   epoch=self._epoch, should_stop=self._stop.is_set)
                if grid is None:
                    break
                self.board.publish(i, grid)
                self._mapped_with[i] = self._epoch
                self.maps_done += 1
                with self._cond:
                    self._cond.notify_all()
                if self.on_map is not None:
                    self.on_map(slide.slide_id, self._epoch)
        except BaseException as exc:  # noqa: BLE001 - kept for the trainer, which re-raises it with context
            self.error = exc
            with self._cond:
                self._cond.notify_all()


__all__ = ["MapperError", "MappingWorker"]
