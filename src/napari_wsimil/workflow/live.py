"""Training that shows its work: engine events plus, after each checkpoint, the watched slides' maps.

The training widget runs :func:`train_with_maps` in a child process (:mod:`.subprocess_run`); a napari
worker relays its events and, on the main thread, each :class:`~napari_wsimil.train.events.MapEvent`'s
array goes into a layer over the slide. Pause stops that child process with SIGSTOP (Resume continues it
with SIGCONT) and Cancel terminates it, so neither waits for a yield; checkpoints are written atomically,
so a cancelled run resumes from its last complete epoch. A caller iterating in its own process (a
notebook, ``InteractiveSession.train``) can stop at the yields, one per optimiser step.

Which maps (attention, tumour probability ...) is the method family's choice
(:meth:`~napari_wsimil.train.family.MethodFamily.live_maps`); this module only interleaves them.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

from ..train.events import MapEvent, ProgressEvent
from ..train.family import MethodFamily
from ..train.registry import family_of
from ..train.run import PreparedRun, RunSpec


def prepare_run(spec: RunSpec, report: Any = None) -> PreparedRun:
    """The family of ``spec.method`` prepares the run (checks, split, bags or masks, run.json)."""
    return family_of(spec.method).prepare(spec, report)


def train_with_maps(prepared: PreparedRun, watch: Sequence[str] = (), *, every: int = 1,
                    step_events: bool = True, family: MethodFamily | None = None
                    ) -> Generator[ProgressEvent | MapEvent, None, Any]:
    """The family's training of a prepared run, with a :class:`MapEvent` per watched slide after every
    ``every``-th checkpoint and after the last one. Returns the trained model."""
    fam = family or family_of(prepared.spec.method)
    if step_events and not prepared.method.config.step_events:
        prepared.method.config.step_events = 1  # a yield per step: progress per step, and in-process callers
        # can stop between steps (the widget's child process is paused by signal, not at a yield)
    maps = fam.live_maps(prepared, list(watch))
    gen = fam.train(prepared)
    while True:
        try:
            ev = next(gen)
        except StopIteration as stop:
            return stop.value
        yield ev
        if ev.kind == "checkpoint" and ev.epoch % max(1, every) == 0:
            yield from maps(ev.epoch, False)
        elif ev.kind == "done":
            yield from maps(ev.epoch, True)


__all__ = ["MapEvent", "prepare_run", "train_with_maps"]
