"""Where a ``--cluster local:1`` worker process spends its CPU while it extracts slides, thread by thread.

The task runs in dask's executor thread, tile decoding in the patch reader's threads, and the worker's own event loop
(heartbeats, memory monitor, messages) in the main thread; ``psutil`` reads each thread's CPU time in the worker
before and after extracting ``--slides`` synthetic slides (resnet18, 224 px at 0.5 µm/px, after one warm-up slide).

    python benchmarks/bench_worker_threads.py --slides 4
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def threads() -> dict[str, float]:
    """CPU seconds of this process's threads, by kind (runs in the worker through ``Client.run``)."""
    import threading

    import psutil

    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for t in psutil.Process().threads():
        name = names.get(t.id, "unnamed (native)")
        kind = ("task (dask executor)" if "Dask-Default-Threads" in name else
                "worker event loop (MainThread)" if name == "MainThread" else
                "patch reader" if "ThreadPool" in name or "Reader" in name else name)
        out[kind] = out.get(kind, 0.0) + t.user_time + t.system_time
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=4)
    args = ap.parse_args()
    from napari_wsimil.cluster.cohorts import extract_on_cluster
    from napari_wsimil.cluster.spec import local_cluster
    from napari_wsimil.slide.synthetic import synthesize_cohort

    tmp = Path(tempfile.mkdtemp(prefix="bench_worker_threads_"))
    try:
        synthesize_cohort(tmp / "cohort", args.slides, seed=7, size=2048)
        slides = sorted((tmp / "cohort").glob("slide_*[0-9].tiff"))
        opts = dict(patch=224, mpp=0.5, batch=32, device="cpu")
        with local_cluster(1) as handle:
            extract_on_cluster(handle, slides[:1], tmp / "warm", "resnet18", **opts)
            before = next(iter(handle.client.run(threads).values()))
            t0 = time.perf_counter()
            extract_on_cluster(handle, slides, tmp / "out", "resnet18", region_patches=20000, **opts)
            wall = time.perf_counter() - t0
            after = next(iter(handle.client.run(threads).values()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.slides} slides in {wall:.2f} s; the worker process's CPU by thread:")
    for kind in sorted(after, key=lambda k: before.get(k, 0.0) - after[k]):
        d = after[kind] - before.get(kind, 0.0)
        if d >= 0.005:
            print(f"  {kind:32s} {d:6.3f} s")


if __name__ == "__main__":
    main()
