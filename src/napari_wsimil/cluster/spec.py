"""``--cluster SPEC`` → a connected dask ``Client``: ``local[:N]``, ``tcp://HOST:PORT`` or a dask-jobqueue YAML file.

The engine is dask.distributed, not a home-made one: it already retries a dead worker's task elsewhere, places
tasks on workers with free resources and serves a dashboard. This module only turns the user's short spec into a
client, with a one-line reason when it cannot (an unreachable scheduler is a user problem, not a traceback).

``local[:N]`` starts N worker *processes* with one thread each (default: one per CPU core, or one per GPU when
torch sees GPUs); dask sets ``OMP_NUM_THREADS=1`` in every worker it spawns, so torch does not start one BLAS
thread per core in each worker and oversubscribe the machine. With GPUs each worker gets its own
``CUDA_VISIBLE_DEVICES`` and the resource ``GPU=1``, and tasks ask for ``resources={"GPU": 1}``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WsimilError

#: how long to try reaching a scheduler before saying it is unreachable
CONNECT_TIMEOUT_S = 10.0
#: dask-jobqueue cluster classes (module, class) by the ``jobqueue:`` key of a YAML spec. ``local`` is dask-jobqueue's
#: own ``JobQueueCluster`` whose "jobs" are subprocesses of this machine running the generated job script: the way
#: to try a YAML file (every key but the batch system's own directives) before submitting to SLURM
JOBQUEUE_CLASSES = {"slurm": ("dask_jobqueue", "SLURMCluster"), "pbs": ("dask_jobqueue", "PBSCluster"),
                    "sge": ("dask_jobqueue", "SGECluster"), "lsf": ("dask_jobqueue", "LSFCluster"),
                    "htcondor": ("dask_jobqueue", "HTCondorCluster"), "moab": ("dask_jobqueue", "MoabCluster"),
                    "oar": ("dask_jobqueue", "OARCluster"), "local": ("dask_jobqueue.local", "LocalCluster")}
#: keys a YAML spec must give (dask-jobqueue's classes need the size of a job; the rest have defaults)
JOBQUEUE_REQUIRED = ("jobqueue", "cores", "memory")
#: the worker preload that gives each worker process of a multi-GPU job its own GPU (see :mod:`.gpu_pin`)
GPU_PIN_PRELOAD = "napari_wsimil.cluster.gpu_pin"


class ClusterError(WsimilError):
    """The cluster spec cannot be used: malformed, unreachable scheduler, missing package."""


@dataclass
class ClusterHandle:
    """A connected client, the cluster this process started (None for a scheduler it only joined) and how to say
    where the dashboard is."""

    client: Any
    cluster: Any = None
    spec: str = ""
    gpus: int = 0
    closers: list[Any] = field(default_factory=list)

    @property
    def dashboard(self) -> str:
        """The dashboard address, with a note when bokeh (which serves it) is not installed."""
        link = str(getattr(self.client, "dashboard_link", "") or "")
        try:
            import bokeh  # noqa: F401
        except ImportError:
            return f"{link} (not served: bokeh is not installed; pip install 'bokeh>=3.1' to see it)"
        return link

    @property
    def uses_gpus(self) -> bool:
        """Whether any worker advertises the GPU resource (tasks then ask for one each)."""
        try:
            workers = self.client.scheduler_info().get("workers", {})
        except Exception:  # noqa: BLE001 - a scheduler that went away: no GPUs to ask for
            return False
        return any((w.get("resources") or {}).get("GPU") for w in workers.values())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        for c in (self.cluster, *self.closers):
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()

    def __enter__(self) -> ClusterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return 0
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch or no CUDA: CPU workers
        return 0


def _dashboard_address() -> str | None:
    """A free port for the dashboard when bokeh can serve one (``:0``), else none at all."""
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return None
    return ":0"


#: dask's ``distributed.nanny.pre-spawn-environ`` entries this package unsets in the workers it starts.
#: ``MALLOC_TRIM_THRESHOLD_`` (65536 by default) makes long-lived workers hand freed memory back to the system, but it
#: also turns off glibc's adaptive mmap threshold, so every patch batch's large arrays are mmap'ed and unmapped
#: again: on this package's extraction it doubled the *system* CPU time (+1.3 s per 4 slides of resnet18 features,
#: about +19 % of all CPU; see docs/scale.md). A slide task frees its memory when it ends, so glibc's default is right.
UNSET_WORKER_ENV = ("MALLOC_TRIM_THRESHOLD_",)


#: dask settings that wake idle processes less often (default → this): the event-loop blocking monitor (20 ms: it
#: only warns about a blocked loop), the system monitor's sampling for the dashboard (500 ms) and the memory check of
#: workers and nannies (100 ms: a worker over its memory limit is now stopped within a second rather than 0.1 s).
#: Set them in the dask configuration of a tcp:// or jobqueue cluster for the same effect.
CALM_CONFIG = {"distributed.admin.tick.interval": "1s", "distributed.admin.system-monitor.interval": "2s",
               "distributed.worker.memory.monitor-interval": "1s"}


def local_cluster(n_workers: int | None = None, *, gpus: int | None = None) -> ClusterHandle:
    """A LocalCluster of one-thread worker processes on this machine (see the module docstring)."""
    import dask
    import distributed  # noqa: F401 - loads its config first: set() would otherwise drop it all on exit

    unset = {f"distributed.nanny.pre-spawn-environ.{k}": None for k in UNSET_WORKER_ENV}
    # the worker's statistical profiler samples every thread's stack each 10 ms (for the dashboard's profile page):
    # about 5 % of a slide's CPU in tasks whose reader threads are many (measured, docs/scale.md)
    unset["distributed.worker.profile.enabled"] = False
    # the periodic wake-ups of idle processes: a warmed, idle local:1 used 27 CPU-ms per second with dask's
    # defaults and 7 with these (benchmarks/bench_cluster_idle.py) — most of the per-slide overhead left outside
    # the tasks, since it is paid for every second a run lasts
    unset.update(CALM_CONFIG)
    with dask.config.set(unset):  # each nanny reads it once, when it is made, and keeps it for its restarts
        return _local_cluster(n_workers, gpus)


def _local_cluster(n_workers: int | None, gpus: int | None) -> ClusterHandle:
    from distributed import Client, LocalCluster

    gpus = _gpu_count() if gpus is None else gpus
    if gpus:
        from distributed import Nanny, Scheduler, SpecCluster

        n = n_workers or gpus
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()] or \
            [str(i) for i in range(gpus)]
        workers = {f"gpu-{i}": {"cls": Nanny, "options": {
            "nthreads": 1, "resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": visible[i % len(visible)]}}}
            for i in range(n)}
        scheduler = {"cls": Scheduler, "options": {"dashboard_address": _dashboard_address() or ":0"}}
        cluster = SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        cluster = LocalCluster(n_workers=n_workers or cores, threads_per_worker=1, processes=True,
                               dashboard_address=_dashboard_address(), silence_logs=40)
    return ClusterHandle(Client(cluster), cluster, f"local:{len(cluster.workers)}", gpus)


def _jobqueue_cluster(path: Path) -> ClusterHandle:
    cluster, kind, jobs, gpus = jobqueue_cluster(path)
    try:
        cluster.scale(jobs=jobs)
        from distributed import Client

        client = Client(cluster)
    except Exception:
        cluster.close()
        raise
    return ClusterHandle(client, cluster, f"{kind}:{jobs} jobs", gpus)


def jobqueue_cluster(path: Path) -> tuple[Any, str, int, int]:
    """The dask-jobqueue cluster a YAML spec describes, not scaled yet (no job submitted: ``job_script()`` shows
    what would be), with the batch system's name, the number of jobs and the GPUs per job.

    Beside ``jobqueue`` and ``jobs``, ``gpus: N`` (per job) is this package's: each worker process then advertises
    the resource ``GPU`` (``--resources GPU=<N / processes>``, so tasks never share a GPU), SLURM jobs ask for
    ``--gres=gpu:N`` (unless ``job_extra_directives`` already asks for GPUs), ``processes`` defaults to ``gpus``
    (one worker process per GPU), and with several worker processes
    per job each one is pinned to its own GPU by setting ``CUDA_VISIBLE_DEVICES`` in the worker at start (the
    :mod:`.gpu_pin` preload: the batch system gives the job its GPUs, not each process). The job script exports the
    dask settings ``local_cluster`` uses (:func:`worker_config_exports`). Every other key goes to the cluster class
    unchanged."""
    import yaml

    try:
        conf = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())
        raise ClusterError(f"cannot read the cluster file {path}: {reason}") from None
    if not isinstance(conf, dict):
        raise ClusterError(f"{path} should be a mapping such as 'jobqueue: slurm', 'jobs: 10', 'cores: 8' ...")
    conf = {str(k).replace("-", "_"): v for k, v in conf.items()}
    missing = [k for k in JOBQUEUE_REQUIRED if conf.get(k) in (None, "")]
    if missing:
        raise ClusterError(f"{path}: missing {', '.join(missing)} (e.g. 'jobqueue: slurm', 'cores: 8', "
                           "'memory: 32GB')")
    kind = str(conf.pop("jobqueue")).lower()
    if kind not in JOBQUEUE_CLASSES:
        raise ClusterError(f"{path}: jobqueue {kind!r} is not one of {', '.join(JOBQUEUE_CLASSES)}")
    jobs, gpus = _whole(path, conf, "jobs", 1, 1), _whole(path, conf, "gpus", 0, 0)
    if gpus and "processes" not in conf:
        conf["processes"] = gpus  # one worker process per GPU (dask-jobqueue would pick about √cores)
    processes = _whole(path, conf, "processes", 1, 1)
    conf.pop("jobs", None)
    conf.pop("gpus", None)
    if gpus:
        if gpus % processes:
            raise ClusterError(f"{path}: gpus ({gpus}) must be a multiple of processes ({processes}): each worker "
                               "process gets the same number of GPUs")
        extra = list(conf.get("worker_extra_args") or [])
        extra += ["--resources", f"GPU={gpus // processes}"]
        if processes > 1:
            extra += ["--preload", GPU_PIN_PRELOAD]
        conf["worker_extra_args"] = extra
        directives = list(conf.get("job_extra_directives") or [])
        if kind == "slurm" and not any("gpu" in str(d).lower() for d in directives):
            conf["job_extra_directives"] = [*directives, f"--gres=gpu:{gpus}"]
    if kind != "local":  # dask-jobqueue runs a local job's script as one command line, without its prologue
        conf["job_script_prologue"] = [*(conf.get("job_script_prologue") or []), *worker_config_exports()]
    if "scheduler_options" not in conf:
        conf["scheduler_options"] = {"dashboard_address": _dashboard_address() or ":0"}
    module, name = JOBQUEUE_CLASSES[kind]
    try:
        from importlib import import_module

        cls = getattr(import_module(module), name)
    except ImportError:
        raise ClusterError("a YAML cluster spec needs dask-jobqueue: pip install dask-jobqueue") from None
    try:
        import dask

        with dask.config.set(CALM_CONFIG):  # the scheduler, in this process, reads them when it is made
            cluster = cls(**conf)
    except (TypeError, ValueError) as exc:
        import re

        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unknown:
            raise ClusterError(f"{path}: {unknown.group(1)!r} is not an option of a {kind} cluster (dask-jobqueue's "
                               f"{name} lists them)") from None
        raise ClusterError(f"{path}: {' '.join(str(exc).split())}") from None
    return cluster, kind, jobs, gpus


def worker_config_exports() -> list[str]:
    """``export DASK_...=...`` lines that give a batch job's workers the settings ``local_cluster`` uses: the calmer
    periodic callbacks (:data:`CALM_CONFIG`) and no statistical profiler. (``MALLOC_TRIM_THRESHOLD_`` cannot be
    unset this way: dask lower-cases the keys of its environment variables, and that key is upper-case.)"""
    settings = {**CALM_CONFIG, "distributed.worker.profile.enabled": False}
    return [f"export DASK_{key.upper().replace('.', '__').replace('-', '_')}={value}"
            for key, value in settings.items()]


def _whole(path: Path, conf: dict[str, Any], key: str, default: int, least: int) -> int:
    value = conf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ClusterError(f"{path}: {key} must be a whole number ≥ {least}, not {value!r}")
    return value


def connect(spec: str, *, timeout: float | None = None) -> ClusterHandle:
    """The client for ``spec`` (see the module docstring); :class:`ClusterError` with one line when it cannot."""
    spec = spec.strip()
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    if spec == "local" or spec.startswith("local:"):
        n: int | None = None
        if spec != "local":
            try:
                n = int(spec.split(":", 1)[1])
            except ValueError:
                n = 0
            if n < 1:
                raise ClusterError(f"--cluster {spec}: the number of workers must be a whole number ≥ 1, e.g. local:4")
        return local_cluster(n)
    if "://" in spec:
        from distributed import Client

        try:
            client = Client(spec, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ClusterError(f"cannot reach the dask scheduler at {spec} within {timeout:g} s: is it running and "
                               f"reachable from here? ({reason[:160]})") from None
        return ClusterHandle(client, None, spec)
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise ClusterError(f"cluster file {path} does not exist")
        return _jobqueue_cluster(path)
    raise ClusterError(f"--cluster {spec!r}: expected local, local:N, tcp://HOST:PORT or a dask-jobqueue .yaml file")


__all__ = ["ClusterError", "ClusterHandle", "connect", "jobqueue_cluster", "local_cluster"]
