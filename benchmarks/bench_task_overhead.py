"""The cluster's slide tasks without dask: is the per-slide overhead in the task code, or in the worker process?

Runs the same slides through ``extract_cohort`` (the single-process loop) and through the cluster's own tasks run
in this process (``extract_on_cluster(None, ...)``: claims, grid computed once and passed on, results as dicts), each
variant in a fresh process with one torch thread and 2 reader threads, interleaved, and prints wall and CPU time
(``getrusage``: every thread of the process). If the two agree, what ``bench_scale.py`` measures beyond them for
``--cluster local:1`` is the dask worker process and its neighbours, not the task code.

    python benchmarks/bench_task_overhead.py --slides 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, shutil, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
mode, cohort, out, enc_name = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
slides = sorted(cohort.glob("slide_*[0-9].tiff"))
from napari_wsimil.train.cohort import cohort_encoder
from napari_wsimil.features.extract import extract_cohort
enc = cohort_encoder(enc_name, None, "cpu", 0.5)
extract_cohort(slides[:1], str(out) + "-warm", enc, 224, 0.5, 32, device="cpu", num_workers=2)
shutil.rmtree(str(out) + "-warm")
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
c0, t0 = cpu(), time.perf_counter()
if mode == "extract_cohort":
    extract_cohort(slides, out, enc, 224, 0.5, 32, device="cpu", num_workers=2)
else:
    from napari_wsimil.cluster.cohorts import extract_on_cluster
    res = extract_on_cluster(None, slides, out, enc_name, patch=224, mpp=0.5, batch=32, device="cpu",
                             reader_threads=2, region_patches=20000)
    assert all(r["status"] == "done" for r in res), res
print(json.dumps([time.perf_counter() - t0, cpu() - c0]))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--encoder", default="resnet18")
    args = ap.parse_args()
    from napari_wsimil.slide.synthetic import synthesize_cohort

    tmp = Path(tempfile.mkdtemp(prefix="bench_task_overhead_"))
    got: dict[str, list[tuple[float, float]]] = {"extract_cohort": [], "tasks in process": []}
    try:
        synthesize_cohort(tmp / "cohort", args.slides, seed=7, size=2048)
        for r in range(args.repeats):
            for mode in got:
                out = tmp / f"out-{r}-{mode.split()[0]}"
                p = subprocess.run([sys.executable, "-c", CHILD, mode, str(tmp / "cohort"), str(out), args.encoder],
                                   capture_output=True, text=True, check=True)
                got[mode].append(tuple(json.loads(p.stdout.strip().splitlines()[-1])))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.slides} slides, {args.encoder}, 224 px at 0.5 µm/px, one torch thread, {args.repeats} repeats")
    for mode, v in got.items():
        walls, cpus = [w for w, _ in v], [c for _, c in v]
        print(f"  {mode:18s} wall {min(walls):.2f} – {max(walls):.2f} s   CPU {min(cpus):.2f} – {max(cpus):.2f} s")
    base = min(c for _, c in got["extract_cohort"])
    print(f"  tasks' CPU over the loop's (min against min): {(min(c for _, c in got['tasks in process']) / base - 1) * 100:+.1f} %")


if __name__ == "__main__":
    main()
