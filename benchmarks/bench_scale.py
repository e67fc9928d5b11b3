"""Feature extraction and prediction on dask.distributed against the single-process path, measured in one run.

Same slides, same encoder, fresh output folders for every measurement:

- ``single/1t``: ``extract_cohort`` in this process with one torch thread (what one one-thread worker does);
- ``single``: the same with torch's default threads (how ``wsimil features`` runs without ``--cluster``);
- ``local:1`` and ``local:2``: ``--cluster local:N`` (one-thread worker *processes*), timed from the first
  submit to the last result on a cluster that is already up and warmed (its start and the warm-up, which imports
  torch and builds the encoder once per worker, are reported apart: they are paid once per run, not per slide).

Printed: seconds per slide, the overhead per slide (``local:1`` against ``single/1t``), the speed-up of 2
workers over 1 and ``local:2`` against ``single``; where the cluster's time goes (the tasks' own time, the
encoder construction inside them, the client/scheduler rest). Every measurement is repeated (``--repeats``) and
its min and max are printed: this machine is shared, so a single number would mislead.

    python benchmarks/bench_scale.py                       # 6 slides, resnet18 (random weights: speed only)
    python benchmarks/bench_scale.py --encoder handcrafted --slides 8
    python benchmarks/bench_scale.py --predict             # also wsimil predict (abmil), bags not cached
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import tree_cpu  # noqa: E402


def _spread(xs: list[float]) -> str:
    return f"{min(xs):7.2f} s  (min; max {max(xs):.2f}, n={len(xs)})"


_CEILING_JOB = """
import time, torch
torch.set_num_threads(1)
x = torch.randn(16, 3, 224, 224)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 7, 2), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, 2))
with torch.no_grad():
    net(x)
    t = time.perf_counter()
    for _ in range(12):
        net(x)
print(time.perf_counter() - t)
"""


def _ceiling() -> float:
    """What 2 one-thread processes get over 1 on this machine right now (2.0 on 2 idle cores): the best speed-up
    any 2-worker cluster could show in the same minutes."""
    import subprocess
    import sys

    def run(k: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", _CEILING_JOB], stdout=subprocess.PIPE, text=True)
                 for _ in range(k)]
        return max(float(p.communicate()[0]) for p in procs)

    one = run(1)
    two = run(2)
    return 2 * one / two


_SINGLE_JOB = """
import json, shutil, sys, time
import torch
from napari_wsimil.features.extract import extract_cohort
a = json.loads(sys.argv[1])
if a["threads"]:
    torch.set_num_threads(a["threads"])
slides = a["slides"]
extract_cohort(slides[:1], a["out"] + "-warm", a["encoder"], a["patch"], a["mpp"], a["batch"], device="cpu")
shutil.rmtree(a["out"] + "-warm")
c0, t0 = time.process_time(), time.perf_counter()
res = extract_cohort(slides, a["out"], a["encoder"], a["patch"], a["mpp"], a["batch"], device="cpu")
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
assert all(r.status == "done" for r in res), res
print(json.dumps([wall, cpu]))
"""


def _single(slides: list[Path], out: Path, args: argparse.Namespace, threads: int | None) -> tuple[float, float]:
    """``extract_cohort`` in a fresh process (imports and the first slide's costs left out), so that no idle
    cluster of this benchmark counts in its CPU time: (wall, CPU of that process) for all slides."""
    import subprocess
    import sys

    shutil.rmtree(out, ignore_errors=True)
    job = {"threads": threads, "slides": [str(p) for p in slides], "out": str(out), "encoder": args.encoder,
           "patch": args.patch, "mpp": args.mpp, "batch": args.batch}
    r = subprocess.run([sys.executable, "-c", _SINGLE_JOB, json.dumps(job)], capture_output=True, text=True,
                       check=True)
    wall, cpu = json.loads(r.stdout.strip().splitlines()[-1])
    return wall, cpu


def _clustered(handle: Any, slides: list[Path], out: Path, args: argparse.Namespace
               ) -> tuple[float, float, list[dict]]:
    from napari_wsimil.cluster.cohorts import extract_on_cluster

    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = tree_cpu(), time.perf_counter()  # this process (client, scheduler) and the worker processes
    res = extract_on_cluster(handle, slides, out, args.encoder, patch=args.patch, mpp=args.mpp, batch=args.batch,
                             device="cpu", reader_threads=args.reader_threads)
    wall, cpu = time.perf_counter() - t0, tree_cpu() - c0
    assert all(r["status"] == "done" for r in res), res
    return wall, cpu, res


def _warm(handle: Any, args: argparse.Namespace) -> float:
    """Imports torch and builds the encoder in every worker process (what ``extract_on_cluster`` does first)."""
    from napari_wsimil.cluster.cohorts import warm_up

    t0 = time.perf_counter()
    warm_up(handle, args.encoder, None, "cpu", args.mpp)
    return time.perf_counter() - t0


def _predict_single(run: Path, cohort: Path, out: Path, feats: Path, threads: int | None = None) -> float:
    """``wsimil predict`` in this process; ``threads=1`` is what one one-thread worker does, the overhead's baseline."""
    import torch

    from napari_wsimil.cli import main

    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(feats, ignore_errors=True)  # new slides: their bags are not cached
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        assert main(["predict", str(run), "--cohort", str(cohort), "--out", str(out), "--device", "cpu"]) == 0
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def _predict_cluster(handle: Any, run: Path, cohort: Path, out: Path, feats: Path) -> float:
    from napari_wsimil.cluster.cohorts import predict_on_cluster

    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(feats, ignore_errors=True)
    t0 = time.perf_counter()
    res = predict_on_cluster(handle, run, cohort, out, device="cpu", options={"heatmaps": True})
    assert all(r["status"] == "done" for r in res), res
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--size", type=int, default=2048, help="synthetic slide side in px at 0.5 µm/px")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--patch", type=int, default=224)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reader-threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--predict", action="store_true", help="also measure wsimil predict (abmil)")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args()

    import torch

    from napari_wsimil.cluster.spec import connect
    from napari_wsimil.slide.synthetic import synthesize_cohort

    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        csv_path = synthesize_cohort(tmp / "cohort", args.slides, seed=7, size=args.size)
        slides = sorted((tmp / "cohort").glob("slide_*[0-9].tiff"))
        print(f"{len(slides)} slides of {args.size} px, encoder {args.encoder}, {args.patch} px at {args.mpp:g} µm/px,"
              f" batch {args.batch}; this process: {torch.get_num_threads()} torch threads")
        times: dict[str, list[float]] = {"single/1t": [], "single": [], "local:1": [], "local:2": []}
        cpus: dict[str, list[float]] = {k: [] for k in times}
        ceilings: list[float] = []
        parts: dict[str, list[dict]] = {"local:1": [], "local:2": []}
        setup: dict[str, list[dict[str, float]]] = {"local:1": [], "local:2": []}
        handles = {}
        try:
            for _ in range(args.repeats):  # interleaved, so a burst of load from other jobs hits every variant
                ceilings.append(_ceiling())
                for key, threads in (("single/1t", 1), ("single", None)):
                    wall, cpu = _single(slides, tmp / "s", args, threads)
                    times[key].append(wall)
                    cpus[key].append(cpu)
                for n in (1, 2):  # one cluster at a time: an idle one would add its CPU to the other's
                    t0 = time.perf_counter()
                    handles[n] = connect(f"local:{n}")
                    start = time.perf_counter() - t0
                    setup[f"local:{n}"].append({"start_s": start, "warm_s": _warm(handles[n], args)})
                    wall, cpu, res = _clustered(handles[n], slides, tmp / f"c{n}", args)
                    times[f"local:{n}"].append(wall)
                    cpus[f"local:{n}"].append(cpu)
                    parts[f"local:{n}"].append({"wall": wall, "task_s": sum(r["seconds"] for r in res),
                                                "task_cpu_s": sum(r["cpu_s"] for r in res), "cpu": cpu,
                                                "encoder_s": sum(r["encoder_s"] for r in res)})
                    handles.pop(n).close()
            pred: dict[str, list[float]] = {}
            if args.predict:
                from napari_wsimil.cli import main as cli

                run = tmp / "work" / "run"
                assert cli(["train", str(csv_path), "--method", "abmil", "--out", str(run), "--epochs", "1",
                            "--encoder", args.encoder, "--patch", str(args.patch), "--mpp", str(args.mpp),
                            "--device", "cpu"]) == 0
                feats = tmp / "work" / "features"
                pred = {"single/1t": [], "single": [], "local:1": [], "local:2": []}
                for n in (1, 2):
                    handles[n] = connect(f"local:{n}")
                    _warm(handles[n], args)
                for _ in range(args.repeats):
                    pred["single/1t"].append(_predict_single(run, csv_path, tmp / "p0", feats, threads=1))
                    pred["single"].append(_predict_single(run, csv_path, tmp / "p0", feats))
                    for n in (1, 2):
                        pred[f"local:{n}"].append(_predict_cluster(handles[n], run, csv_path, tmp / f"p{n}", feats))
        finally:
            for h in handles.values():
                h.close()

        n = len(slides)
        print("\nfeature extraction, all slides: wall time | CPU time of every process involved")
        for k, v in times.items():
            print(f"  {k:10s} {_spread(v)}   {min(v) / n:.2f} s/slide | CPU {min(cpus[k]):.2f} s "
                  f"(max {max(cpus[k]):.2f})")
        print(f"  this machine's 2-process ceiling (2 one-thread CPU-bound processes vs 1), in the same minutes: "
              + ", ".join(f"{c:.2f}x" for c in ceilings))
        for k, ss in setup.items():
            print(f"  {k}: cluster start " + "/".join(f"{x['start_s']:.1f}" for x in ss) + " s, warm-up (torch "
                  "import + encoder build in every worker) " + "/".join(f"{x['warm_s']:.1f}" for x in ss)
                  + " s: once per run, not per slide")
        base1, base2 = min(times["single/1t"]), min(times["single"])
        c1, c2 = min(times["local:1"]), min(times["local:2"])
        overhead = (c1 - base1) / base1
        cpu_over = (min(cpus["local:1"]) - min(cpus["single/1t"])) / min(cpus["single/1t"])
        print(f"\noverhead per slide, local:1 vs single/1t: wall {overhead * 100:+.1f} % "
              f"({(c1 - base1) / n:+.3f} s/slide), CPU {cpu_over * 100:+.1f} % (goal <= 5 %)")
        print(f"speed-up, local:2 vs local:1: {c1 / c2:.2f}x (goal >= 1.7x)")
        print(f"local:2 vs single (default threads): {base2 / c2:.2f}x (goal >= 1.0x)")
        for k, ps in parts.items():
            best = min(ps, key=lambda p: p["wall"])
            workers = 1 if k == "local:1" else 2
            print(f"  {k}: tasks' own time {best['task_s']:.2f} s over {workers} worker(s) (CPU {best['task_cpu_s']:.2f}"
                  f" s of the {best['cpu']:.2f} s all processes used), encoder construction inside tasks "
                  f"{best['encoder_s']:.3f} s, the rest (scheduling, transfer, idle) "
                  f"{best['wall'] - best['task_s'] / workers:.2f} s")
        print(f"spread across repeats (max/min): " + ", ".join(f"{k} {max(v) / min(v):.2f}" for k, v in times.items()))
        if pred:
            print("\nprediction (abmil; bags extracted again each time, as for new slides):")
            for k, v in pred.items():
                print(f"  {k:10s} {_spread(v)}   {min(v) / n:.2f} s/slide")
            print(f"  local:2 vs local:1 {min(pred['local:1']) / min(pred['local:2']):.2f}x, local:2 vs single "
                  f"{min(pred['single']) / min(pred['local:2']):.2f}x, overhead local:1 vs single/1t "
                  f"{(min(pred['local:1']) - min(pred['single/1t'])) / min(pred['single/1t']) * 100:+.1f} %")
        if args.json:
            Path(args.json).write_text(json.dumps({"times": times, "cpu": cpus, "ceiling": ceilings, "setup": setup, "parts": parts, "predict": pred,
                                                   "slides": n, "args": vars(args)}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
