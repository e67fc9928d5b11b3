"""Kills at random moments (issue #21, part 3): seeded ``kill -9`` during painting with autosave, export, feature
extraction and training, then a check that nothing acknowledged was lost and nothing half-written passes for
finished.

    python benchmarks/kills.py --out out/kills              # 50 trials (20 painting, 10 of each other activity)
    python benchmarks/kills.py --out out/kills --trials 4   # one of each (tests/reliability runs this)

Each trial starts a child process that does the work and prints a line for every step it finished (a stroke
saved: what napari's autosave does after a stroke, ``save_pixel_labels`` with the stroke's dirty box and then
``save_annotations``; a mask file exported; a bag written; an epoch checkpointed). The parent kills it with
SIGKILL at a seeded random time, then checks:

- painting: every stroke acknowledged as saved is in the labels (each stroke paints its own cell, so any cell
  can be checked), the boxes acknowledged are in the annotations, no cell holds anything but 0 or its class,
  the project opens for writing and ``project check`` finds no damage besides the dead writer's stale lock
  and temporaries (which opening removes);
- export: every file under its final name in the output folder reads back and equals the labels;
- extraction: every bag under its final name loads and is consistent; none is truncated;
- training: ``last.json`` and ``best.safetensors``, when present, load into the model, and training resumes.

``OUT/kills.json`` holds every trial and the totals (strokes acknowledged, strokes lost, files checked, bad).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
CELL = 8  # label px per stroke cell
ACTIVITIES = ("paint", "export", "extract", "train")

CHILD = {
    "paint": """
        import sys
        import numpy as np
        from napari_wsimil.project import Project
        from napari_wsimil.project.annotations import Annotation
        root, cell = sys.argv[1], int(sys.argv[2])
        p = Project.open(root)
        sid = p.slide_ids[0]
        labels = p.pixel_labels(sid)
        h, w = labels.shape
        per_row = w // cell
        boxes = p.annotations(sid)
        p.save_pixel_labels(sid, labels)  # warm up (imports, the store) so that kills land in steady painting
        print("ready", flush=True)
        i = int(sys.argv[3])
        while True:
            y, x = (i // per_row) * cell, (i % per_row) * cell
            if y + cell > h:
                break
            labels[y:y + cell, x:x + cell] = 1 + i % 2
            p.save_pixel_labels(sid, labels, dirty=[(y, y + cell, x, x + cell)])
            if i % 5 == 0:
                boxes.append(Annotation.box(x * 8, y * 8, x * 8 + 40, y * 8 + 40, "tumour", name=f"s{i}"))
                p.save_annotations(sid, boxes)
            print(f"saved {i}", flush=True)
            i += 1
    """,
    "export": """
        import sys
        from napari_wsimil.project import Project
        from napari_wsimil.project.export import export_project
        root, out = sys.argv[1], sys.argv[2]
        p = Project.open(root, readonly=True)
        print("ready", flush=True)
        n = 0
        while True:
            for fmt in ("ome-tiff", "png", "geojson"):
                export_project(p, out, format=fmt, pixels_only=True)
                print(f"exported {n} {fmt}", flush=True)
                n += 1
    """,
    "extract": """
        import sys
        import torch
        torch.set_num_threads(1)
        from napari_wsimil.features.extract import extract_cohort
        root, out = sys.argv[1], sys.argv[2]
        n = 0
        while True:
            for r in extract_cohort(root, out, "handcrafted", patch_size=64, mpp=2.0, device="cpu",
                                    overwrite=True, num_workers=1):
                print(f"bag {n} {r.slide_id}", flush=True)
                if n == 0:  # a finished bag exists: kills now land while others are computed and written over it
                    print("ready", flush=True)
                n += 1
    """,
    "train": """
        import sys
        import numpy as np
        import torch
        torch.set_num_threads(1)
        from napari_wsimil.mil import BagDataset, build
        from napari_wsimil.train import make_config, train
        out = sys.argv[1]
        rng = np.random.default_rng(0)
        data = BagDataset.from_arrays([rng.normal(size=(30, 16)).astype(np.float32) + (i % 2) for i in range(16)],
                                      [i % 2 for i in range(16)])
        cfg = make_config("abmil", epochs=100000, seed=0, hidden=16, attn_hidden=8, lr=1e-3, device="cpu")
        for e in train(build("abmil", data, data, cfg), out, resume=True):
            if e.kind == "checkpoint":
                print(f"epoch {e.epoch}", flush=True)
                if e.epoch == 1:  # the first epoch pays for torch's warm-up: kills land in steady training
                    print("ready", flush=True)
    """,
}


def _env() -> dict[str, str]:
    src = str(HERE.parent / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _start(activity: str, args: list[str]) -> subprocess.Popen:
    code = textwrap.dedent(CHILD[activity])
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())


def _run_until_killed(child: subprocess.Popen, delay: float, ready_timeout: float = 120.0) -> list[str]:
    """Wait for 'ready', let it work ``delay`` seconds, kill -9; every line it printed (acknowledgements)."""
    lines: list[str] = []
    deadline = time.monotonic() + ready_timeout
    kill_at = None
    buf = ""
    fd = child.stdout.fileno()
    os.set_blocking(fd, False)
    while True:
        now = time.monotonic()
        if kill_at is not None and now >= kill_at:
            break
        if kill_at is None and now > deadline:
            break
        wait = (kill_at if kill_at is not None else deadline) - now
        ready, _, _ = select.select([fd], [], [], max(0.0, min(wait, 0.05)))
        if ready:
            chunk = os.read(fd, 65536).decode()
            if not chunk:  # the child exited by itself
                break
            buf += chunk
            *done, buf = buf.split("\n")
            for line in done:
                lines.append(line)
                if line == "ready" and kill_at is None:
                    kill_at = time.monotonic() + delay
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    # what it printed before dying is acknowledged (the pipe may still hold a last full line)
    try:
        rest = os.read(fd, 1 << 20).decode()
    except (BlockingIOError, OSError):
        rest = ""
    buf += rest
    lines += [ln for ln in buf.split("\n")[:-1]]
    err = child.stderr.read()
    child.stdout.close()
    child.stderr.close()
    if "ready" not in lines:
        raise RuntimeError(f"the child never got ready: {err[-2000:]}")
    return lines


# =============================================================================================== the cohort


def make_sources(work: Path) -> dict[str, str]:
    from napari_wsimil.project import Project
    from napari_wsimil.slide.synthetic import synthesize_cohort

    done = work / "sources.json"
    if done.exists():
        return json.loads(done.read_text())
    synthesize_cohort(work / "cohort", 2, seed=4, size=2048, workers=1)
    proj = work / "project"
    with Project.create_from_csv(proj, work / "cohort" / "cohort.csv", label_mpp=2.0):
        pass
    info = {"project": str(proj)}
    done.write_text(json.dumps(info))
    return info


# =================================================================================================== trials


def cell_check(labels: np.ndarray, acked: set[int]) -> tuple[list[int], list[int]]:
    """(strokes acknowledged but not all there, cells holding anything but 0 or their stroke's class)."""
    h, w = labels.shape
    per_row = w // CELL
    lost, garbage = [], []
    for i in range((h // CELL) * per_row):
        y, x = (i // per_row) * CELL, (i % per_row) * CELL
        cell = labels[y:y + CELL, x:x + CELL]
        want = 1 + i % 2
        if i in acked and not (cell == want).all():
            lost.append(i)
        elif not np.isin(cell, (0, want)).all():
            garbage.append(i)
    return lost, garbage


def trial_paint(work: Path, sources: dict[str, str], delay: float, index: int) -> dict[str, Any]:
    from napari_wsimil.project import Project
    from napari_wsimil.project.check import check_project

    root = work / f"paint-{index}"
    shutil.copytree(sources["project"], root)
    start = 0
    lines = _run_until_killed(_start("paint", [str(root), str(CELL), str(start)]), delay)
    acked = [int(ln.split()[1]) for ln in lines if ln.startswith("saved ")]
    report = check_project(root)
    damage = [d.kind for d in report.damage if d.kind not in ("stale-lock", "half-written")]
    with Project.open(root) as p:
        writable = not p.readonly
        sid = p.slide_ids[0]
        labels = p.pixel_labels(sid)
        names = {a.name for a in p.annotations(sid)}
    lost, garbage = cell_check(labels, set(acked))
    boxes_acked = {f"s{i}" for i in acked if i % 5 == 0}
    boxes_lost = sorted(boxes_acked - names)
    ok = not lost and not garbage and not boxes_lost and writable and not damage
    return {"activity": "paint", "delay_s": round(delay, 3), "acknowledged": len(acked), "lost": lost,
            "boxes_acknowledged": len(boxes_acked), "boxes_lost": boxes_lost, "garbage_cells": garbage,
            "damage": damage, "writable_after": writable, "ok": ok}


def trial_export(work: Path, sources: dict[str, str], delay: float, index: int) -> dict[str, Any]:
    import tifffile
    from PIL import Image

    from napari_wsimil.project import Project
    from napari_wsimil.project.annotations import read_geojson

    root = Path(sources["project"])
    out = work / f"export-{index}"
    lines = _run_until_killed(_start("export", [str(root), str(out)]), delay)
    bad, checked = [], 0
    with Project.open(root, readonly=True) as p:
        expected = {sid: p.pixel_labels(sid) for sid in p.slide_ids}
    for f in sorted(out.iterdir()) if out.exists() else []:
        if f.name.startswith("."):
            continue  # a temporary of the killed write: never under a final name
        checked += 1
        try:
            if f.name.endswith(".ome.tif"):
                got = tifffile.imread(f)
                sid = f.name[:-len(".ome.tif")]
            elif f.suffix == ".png":
                got = np.asarray(Image.open(f))
                sid = f.stem
            elif f.suffix == ".geojson":
                read_geojson(f)
                continue
            elif f.name == "classes.csv":
                if "class_id" not in f.read_text().splitlines()[0] and "id" not in f.read_text():
                    bad.append(f"{f.name}: no header")
                continue
            else:
                bad.append(f"{f.name}: unexpected file")
                continue
            if not np.array_equal(got, expected[sid]):
                bad.append(f"{f.name}: pixels differ from the labels")
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{f.name}: {type(exc).__name__}: {exc}")
    return {"activity": "export", "delay_s": round(delay, 3),
            "acknowledged": sum(ln.startswith("exported") for ln in lines), "files_checked": checked, "bad": bad,
            "ok": not bad}


def trial_extract(work: Path, sources: dict[str, str], delay: float, index: int) -> dict[str, Any]:
    from napari_wsimil.features.bags import read_bag

    root = Path(sources["project"])
    out = work / f"extract-{index}"
    lines = _run_until_killed(_start("extract", [str(root), str(out)]), delay)
    bad, checked = [], 0
    for f in sorted(out.rglob("*")) if out.exists() else []:
        if not f.is_file() or f.name.startswith(".") or f.suffix != ".npz":
            continue
        checked += 1
        try:
            bag = read_bag(f)
            if len(bag) == 0 or bag.features.shape[0] != bag.coords.shape[0]:
                bad.append(f"{f.name}: empty or inconsistent")
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{f.name}: {type(exc).__name__}: {exc}")
    return {"activity": "extract", "delay_s": round(delay, 3),
            "acknowledged": sum(ln.startswith("bag ") for ln in lines), "files_checked": checked, "bad": bad,
            "ok": not bad}


def trial_train(work: Path, sources: dict[str, str], delay: float, index: int) -> dict[str, Any]:
    import torch

    from napari_wsimil.models import ABMIL
    from napari_wsimil.train import load_model_weights

    out = work / f"train-{index}"
    lines = _run_until_killed(_start("train", [str(out)]), delay)
    acked = [int(ln.split()[1]) for ln in lines if ln.startswith("epoch ")]
    bad, checked = [], 0
    for name in ("last.json", "best.safetensors"):
        f = out / name
        if not f.exists():
            if name == "last.json" and acked:
                bad.append("last.json missing although an epoch was checkpointed")
            continue
        checked += 1
        try:
            load_model_weights(f, ABMIL(16, 2, hidden=16, attn_hidden=8))
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{name}: {type(exc).__name__}: {exc}")
    epoch = None
    if (out / "last.json").exists():
        epoch = json.loads((out / "last.json").read_text())["epoch"]
        if acked and epoch < max(acked):
            bad.append(f"last.json is at epoch {epoch} but epoch {max(acked)} was acknowledged")
    # resuming works (one more epoch from what was saved)
    if epoch is not None:
        from napari_wsimil.mil import BagDataset, build
        from napari_wsimil.train import make_config, train

        rng = np.random.default_rng(0)
        data = BagDataset.from_arrays([rng.normal(size=(30, 16)).astype(np.float32) + (i % 2) for i in range(16)],
                                      [i % 2 for i in range(16)])
        cfg = make_config("abmil", epochs=epoch + 1, seed=0, hidden=16, attn_hidden=8, lr=1e-3, device="cpu")
        torch.set_num_threads(1)
        try:
            events = list(train(build("abmil", data, data, cfg), out, resume=True))
            if events[-1].kind != "done":
                bad.append(f"resume ended with {events[-1].kind}")
        except Exception as exc:  # noqa: BLE001
            bad.append(f"resume: {type(exc).__name__}: {exc}")
    return {"activity": "train", "delay_s": round(delay, 3), "acknowledged": len(acked), "last_epoch": epoch,
            "files_checked": checked, "bad": bad, "ok": not bad}


TRIALS = {"paint": trial_paint, "export": trial_export, "extract": trial_extract, "train": trial_train}
DELAYS = {"paint": (0.0, 2.0), "export": (0.0, 2.0), "extract": (0.0, 4.0), "train": (0.0, 1.5)}


def schedule(trials: int, seed: int) -> list[tuple[str, float]]:
    """``trials`` (activity, delay) pairs: 40 % painting, the rest shared by the others; seeded."""
    rng = random.Random(seed)
    if trials <= len(ACTIVITIES):
        acts = list(ACTIVITIES[:trials])
    else:
        n_paint = round(trials * 0.4)
        rest = trials - n_paint
        acts = ["paint"] * n_paint + [ACTIVITIES[1 + i % 3] for i in range(rest)]
    return [(a, rng.uniform(*DELAYS[a])) for a in acts]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/kills"))
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=21)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parent / "src"))
    work = args.out
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    sources = make_sources(work / "sources")
    results = []
    t0 = time.perf_counter()
    for i, (activity, delay) in enumerate(schedule(args.trials, args.seed)):
        res = TRIALS[activity](work, sources, delay, i)
        results.append(res)
        print(f"  trial {i + 1:2d} {activity:8s} killed after {delay:5.2f} s: acknowledged {res['acknowledged']:3d}"
              f"  {'ok' if res['ok'] else 'BAD ' + json.dumps({k: v for k, v in res.items() if k in ('lost', 'bad', 'garbage_cells', 'damage', 'boxes_lost')})}",
              flush=True)
        for d in work.glob(f"*-{i}"):
            if res["ok"]:
                shutil.rmtree(d, ignore_errors=True)
    paint = [r for r in results if r["activity"] == "paint"]
    summary = {
        "trials": len(results), "seed": args.seed, "by_activity": {a: sum(r["activity"] == a for r in results)
                                                                    for a in ACTIVITIES},
        "strokes_acknowledged": sum(r["acknowledged"] for r in paint),
        "strokes_lost": sum(len(r["lost"]) for r in paint),
        "boxes_acknowledged": sum(r["boxes_acknowledged"] for r in paint),
        "boxes_lost": sum(len(r["boxes_lost"]) for r in paint),
        "garbage_cells": sum(len(r["garbage_cells"]) for r in paint),
        "files_checked": sum(r.get("files_checked", 0) for r in results),
        "bad_trials": sum(not r["ok"] for r in results),
        "wall_s": round(time.perf_counter() - t0, 1),
        "results": results,
    }
    (work / "kills.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=1))
    return 0 if summary["bad_trials"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
