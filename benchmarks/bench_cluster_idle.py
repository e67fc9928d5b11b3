"""Where the per-slide overhead of ``--cluster local`` that is not in the tasks goes: the CPU an *idle* cluster burns.

``bench_scale.py`` found the tasks' own CPU within +2 to +6 % of the single process, and the rest of the cluster's
overhead (about 0.17 CPU-s over an 8 s run of 4 slides) in the scheduler, the client and the workers' event loops,
"a fixed cost per second". This measures that cost directly: a ``local:N`` cluster, warmed, then left idle for
``--seconds``, with the CPU time of this process (client, scheduler and nannies live here) and of the worker
processes read before and after. Each dask setting that wakes an idle process periodically is set to its
``cluster.spec.CALM_CONFIG`` value, alone and all together, against dask's defaults, in a fresh cluster each,
interleaved over ``--repeats``; the table gives CPU-ms per wall second, min and max.

    python benchmarks/bench_cluster_idle.py --workers 1 --seconds 8 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tree_cpu  # noqa: E402

#: dask's own values of the settings that make an idle process wake up periodically
DEFAULTS = {
    "distributed.admin.tick.interval": "20ms",  # event-loop blocking monitor, in every process
    "distributed.admin.system-monitor.interval": "500ms",  # CPU/memory/network sampling for the dashboard
    "distributed.worker.memory.monitor-interval": "100ms",  # worker/nanny memory check
}


def _idle_rate(settings: dict[str, Any], workers: int, seconds: float) -> float:
    """CPU seconds per wall second of a warmed, idle ``local_cluster`` whose periodic settings are ``settings``
    (in place of the ``CALM_CONFIG`` it applies itself)."""
    from napari_wsimil.cluster import spec

    kept = spec.CALM_CONFIG
    spec.CALM_CONFIG = settings
    try:
        handle = spec.local_cluster(workers)
    finally:
        spec.CALM_CONFIG = kept
    with handle:
        handle.client.run(lambda: 0)  # every worker up and answering
        time.sleep(1.0)  # start-up work settles
        c0, t0 = tree_cpu(), time.perf_counter()
        time.sleep(seconds)
        return (tree_cpu() - c0) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from napari_wsimil.cluster.spec import CALM_CONFIG

    variants: dict[str, dict[str, Any]] = {"dask defaults": dict(DEFAULTS)}
    variants.update({k.split(".", 1)[1]: {**DEFAULTS, k: v} for k, v in CALM_CONFIG.items()})
    variants["all three calmer (CALM_CONFIG)"] = dict(CALM_CONFIG)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, settings in variants.items():
            rates[name].append(_idle_rate(settings, args.workers, args.seconds))
    base = min(rates["dask defaults"])
    print(f"idle local:{args.workers}, {args.seconds:g} s each, {args.repeats} repeats (CPU-ms per wall second)")
    for name, v in rates.items():
        print(f"  {name:32s} {min(v) * 1e3:6.1f} – {max(v) * 1e3:6.1f}   {min(v) / base:.2f}x of the defaults")


if __name__ == "__main__":
    main()
