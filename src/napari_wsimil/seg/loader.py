"""Training patches: read by a thread pool ahead of the trainer, mixed in a shuffle buffer, batched.

Reading (JPEG decode, resampling, label lookups) happens in threads while the trainer computes, through a
bounded queue, so neither memory nor the reading lead grows with the epoch. The shuffle buffer mixes
patches of different slides inside a batch even though a slide's patches are read close together.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import SegSlide
from .sampling import PatchRequest


@dataclass
class Patch:
    """One training sample: RGB, pixel labels (-1 unknown), tissue, slide label, optional soft target."""

    rgb: np.ndarray
    labels: np.ndarray
    tissue: np.ndarray
    slide_label: int
    kind: str = ""
    soft: np.ndarray | None = None


@dataclass
class Batch:
    """Stacked patches (numpy; the method moves them to its device)."""

    rgb: np.ndarray  # (B, H, W, 3) uint8
    labels: np.ndarray  # (B, H, W) int8
    tissue: np.ndarray  # (B, H, W) bool
    slide_labels: np.ndarray  # (B,) int64
    kinds: list[str]
    soft: np.ndarray | None = None  # (B, H, W) float32, NaN where no soft target


def read_patch(slide: SegSlide, req: PatchRequest, size: int, mpp: float, kind: str = "",
               soft: Callable[[PatchRequest], np.ndarray | None] | None = None, benign_fill: bool = True) -> Patch:
    """``benign_fill``: label a benign slide's tissue 0 (its pixels are known to be benign); off for
    methods that learn benign slides through their slide-level loss alone."""
    labels = slide.pixel_labels_at(req.x0, req.y0, size, mpp, benign_fill=benign_fill)
    return Patch(slide.read(req.x0, req.y0, size, mpp), labels,
                 slide.tissue_at(req.x0, req.y0, size, mpp), int(slide.label if slide.label is not None else -1),
                 kind, None if soft is None else soft(req))


def stack(patches: Sequence[Patch]) -> Batch:
    soft = None
    if any(p.soft is not None for p in patches):
        soft = np.stack([p.soft if p.soft is not None else np.full(p.labels.shape, np.nan, np.float32)
                         for p in patches]).astype(np.float32)
    return Batch(np.stack([p.rgb for p in patches]), np.stack([p.labels for p in patches]),
                 np.stack([p.tissue for p in patches]), np.asarray([p.slide_label for p in patches], np.int64),
                 [p.kind for p in patches], soft)


class PatchBatches:
    """An epoch's batches: ``len()`` is known up front (the engine's progress and ETA use it)."""

    def __init__(self, jobs: Sequence[Callable[[], Patch]], batch_size: int, rng: np.random.Generator,
                 workers: int = 4, buffer: int = 64, before_batch: Callable[[], None] | None = None):
        self.jobs = list(jobs)
        self.batch_size = max(1, int(batch_size))
        self.rng = rng
        self.workers = max(1, workers)
        self.buffer = max(self.batch_size, buffer)
        self.before_batch = before_batch

    def __len__(self) -> int:
        return len(self.jobs) // self.batch_size  # the last partial batch is dropped (batch norm)

    def __iter__(self) -> Iterator[Batch]:
        q: queue.Queue[Any] = queue.Queue(maxsize=self.buffer)
        stop = threading.Event()
        wanted = len(self) * self.batch_size

        def produce() -> None:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="wsimil-seg-read") as pool:
                futures: list[Any] = []
                for job in self.jobs[:wanted]:
                    if stop.is_set():
                        break
                    futures.append(pool.submit(job))
                    if len(futures) >= self.workers * 2:
                        _put(futures.pop(0))
                for f in futures:
                    if stop.is_set():
                        break
                    _put(f)
            q.put(None)

        def _put(f: Any) -> None:
            try:
                item: Any = f.result()
            except BaseException as exc:  # noqa: BLE001 - surfaced in the trainer's thread
                item = exc
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue

        t = threading.Thread(target=produce, name="wsimil-seg-producer", daemon=True)
        t.start()
        pool: list[Patch] = []
        done = False
        emitted = 0
        try:
            while emitted < len(self):
                while not done and len(pool) < self.buffer:
                    item = q.get()
                    if item is None:
                        done = True
                        break
                    if isinstance(item, BaseException):
                        raise item
                    pool.append(item)
                if len(pool) < self.batch_size:
                    break
                take = self.rng.choice(len(pool), self.batch_size, replace=False)
                batch = [pool[i] for i in take]
                for i in sorted(take, reverse=True):
                    pool.pop(i)
                if self.before_batch is not None:
                    self.before_batch()
                yield stack(batch)
                emitted += 1
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            t.join()


__all__ = ["Batch", "Patch", "PatchBatches", "read_patch", "stack"]
