"""A dask worker preload: one GPU per worker process in a batch job that holds several GPUs.

The batch system gives a *job* its GPUs (SLURM sets ``CUDA_VISIBLE_DEVICES`` to the job's, e.g. ``0,1,2,3``); a job
running four worker processes (``processes: 4``) starts them with one ``dask worker --nworkers 4`` command, so they
all inherit the same list and would all compute on the first GPU. ``dask worker`` names its processes
``<name>-0`` ... ``<name>-3``; this preload, run in each worker process before any task (so before torch sees CUDA),
keeps only the GPU of its index. ``cluster.spec.jobqueue_cluster`` adds it to the worker command when a YAML spec
has ``gpus`` and more than one process per job.
"""

from __future__ import annotations

import os
from typing import Any


def pick_gpu(worker_name: str, visible: str | None) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` of the worker process named ``worker_name`` (``...-<index>``) in a job whose
    GPUs are ``visible`` (None or empty: the GPUs are numbered from 0)."""
    tail = str(worker_name).rsplit("-", 1)[-1]
    if not tail.isdigit():
        return None
    gpus = [v.strip() for v in (visible or "").split(",") if v.strip()]
    index = int(tail)
    return gpus[index % len(gpus)] if gpus else str(index)


def dask_setup(worker: Any) -> None:
    """dask's preload hook: pin this worker process to its GPU."""
    gpu = pick_gpu(worker.name, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


__all__ = ["dask_setup", "pick_gpu"]
