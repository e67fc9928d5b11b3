"""Helpers shared by the benchmarks: where the real slides are, a synthetic slide or cohort on demand, the
split-and-paint step of the quality benchmarks, running ``wsimil``, a table printer."""

from __future__ import annotations

import csv
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SHARED_DATA = Path(os.environ.get("WSIMIL_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SHARED_SLIDES = SHARED_DATA / "slides"
#: The real-tissue benchmark's default textures: PatchCamelyon's lymph-node tumour and normal patches.
PCAM = SHARED_DATA / "pcam"
PCAM_MPP = 0.97


def real_slides(*names: str) -> list[Path]:
    found = [SHARED_SLIDES / n for n in names if (SHARED_SLIDES / n).exists()]
    if len(found) < len(names):
        print(f"(some real slides are missing from {SHARED_SLIDES}; they are left out)")
    return found


def synthetic_slide(size: int, workdir: Path | None = None, seed: int = 3) -> Path:
    """A malignant synthetic slide of size² px, cached across benchmark runs in the temp folder."""
    from napari_wsimil.slide.synthetic import SAMPLE_VERSION, synthesize_slide

    workdir = workdir or Path(tempfile.gettempdir()) / "wsimil-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"synthetic_v{SAMPLE_VERSION}_{size}_{seed}.tiff"  # a new renderer makes new files
    if not path.exists():
        t = time.perf_counter()
        synthesize_slide(path, size, seed=seed, malignant=True, mpp=0.5)
        print(f"(made {path.name} in {time.perf_counter() - t:.1f} s)")
    return path


def rate(func: Callable[[], object], n: int) -> float:
    """Calls per second of ``func`` over ``n`` calls."""
    t = time.perf_counter()
    for _ in range(n):
        func()
    return n / (time.perf_counter() - t)


def table(rows: list[list[object]], header: list[str]) -> str:
    cells = [header] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def make_cohort(work: Path, n_slides: int, size: int, seed: int, contrast: float = 1.0,
                mucinous: float = 0.0, aggregates: float = 0.0) -> Path:
    """The synthetic cohort, made once per (n, size, seed, look) and reused across runs.

    The folder name carries the contrast when it is not 1, the mucinous and lymphoid-aggregate shares when
    they are not 0 (so caches made before these options stay valid)."""
    from napari_wsimil.slide.synthetic import SAMPLE_VERSION, synthesize_cohort

    tag = ("" if contrast == 1.0 else f"_c{contrast:g}") + ("" if mucinous == 0.0 else f"_m{mucinous:g}")
    tag += "" if aggregates == 0.0 else f"_a{aggregates:g}"
    folder = work / f"cohort_v{SAMPLE_VERSION}_{n_slides}x{size}_s{seed}{tag}"
    csv_path = folder / "cohort.csv"
    if not csv_path.is_file():
        t = time.perf_counter()
        synthesize_cohort(folder, n_slides, seed=seed, size=size, tumour_contrast=contrast,
                          mucinous_share=mucinous, aggregate_share=aggregates)
        print(f"(synthesised {n_slides} slides of {size}² in {time.perf_counter() - t:.0f} s)", flush=True)
    return csv_path


def add_texture_options(ap: Any) -> None:
    """The quality benchmarks' choice of cohort: real textures (PCam by default) or the procedural look."""
    ap.add_argument("--textures", type=Path, default=PCAM,
                    help="folder of labelled real tiles, one folder per class (default: PCam)")
    ap.add_argument("--tile-mpp", type=float, default=None,
                    help=f"µm/px of the textures' tiles (default {PCAM_MPP} for PCam)")
    ap.add_argument("--synthetic", action="store_true",
                    help="the procedural generator instead of real textures (unit-test look)")


def make_textured_cohort(work: Path, n_slides: int, size: int, seed: int, textures: Path,
                         tile_mpp: float | None, tumour_share: tuple[float, float] | None = None) -> Path:
    """A cohort whose regions are filled with real labelled tissue (``wsimil synth --textures``), made once
    per (n, size, seed, textures) and reused. Its CSV already holds the split: training slides are drawn from
    the textures' training tiles, validation slides from a quarter of the held-out tiles (so model selection
    sees tissue no training slide showed; sets with fewer than 8 held-out tiles per class share the training
    tiles instead), test slides from the rest. ``tumour_share`` (low, high):
    the range of the malignant slides' tumour share of their tissue (``wsimil synth --tumour-share``; None: the
    generator's default, and the folder name of the caches made before the option)."""
    from napari_wsimil.slide.synthetic import SAMPLE_VERSION, TEXTURES_VERSION

    textures = Path(textures)
    if not textures.is_dir():
        raise SystemExit(f"no textures at {textures}: ../shared/data must be beside the checkout "
                         "(or pass --textures DIR)")
    tag = "" if tumour_share is None else f"_t{tumour_share[0]:g}-{tumour_share[1]:g}"
    folder = work / f"textured_v{SAMPLE_VERSION}.{TEXTURES_VERSION}_{textures.name}_{n_slides}x{size}_s{seed}{tag}"
    csv_path = folder / "cohort.csv"
    if not csv_path.is_file():
        t = time.perf_counter()
        args: list[object] = ["synth", folder, "--slides", n_slides, "--seed", seed, "--size", size,
                              "--textures", textures]
        if tile_mpp:
            args += ["--tile-mpp", tile_mpp]
        if tumour_share is not None:
            args += ["--tumour-share", f"{tumour_share[0]:g},{tumour_share[1]:g}"]
        wsimil(*args)
        print(f"(synthesised {n_slides} slides of {size}² from {textures.name} in {time.perf_counter() - t:.0f} s)",
              flush=True)
    return csv_path


def _paint_everything(row: dict, truth: np.ndarray) -> np.ndarray:
    return np.where(truth, 1, 2).astype(np.uint8)


def split_cohort(csv_path: Path, out_csv: Path, seed: int, annotated_fraction: float, *,
                 paint: Callable[[dict, np.ndarray], np.ndarray] = _paint_everything,
                 test_csv: Path | None = None, val_annotated: int = 0) -> dict[str, int]:
    """Add a stratified, seeded split (30 % test, 15 % val per class; kept when every row has one) and paint the ground truth of
    ``annotated_fraction`` of the malignant slides (taken from train), and of ``val_annotated`` malignant
    validation slides, into pixel-label masks: ``paint(row, truth)`` gives the class ids (default 1 tumour,
    2 everything else). ``test_csv`` also gets the test rows alone. Returns counts for the report."""
    import tifffile

    from napari_wsimil.project.mask_io import MaskImage

    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rng = np.random.default_rng(seed)
    keep_splits = all(r.get("split") in ("train", "val", "test") for r in rows)  # textured cohorts: tiles decide
    for label in ("0", "1") if not keep_splits else ():
        group = [r for r in rows if r["label"] == label]
        order = rng.permutation(len(group))
        n_test, n_val = round(0.30 * len(group)), round(0.15 * len(group))
        for rank, i in enumerate(order):
            group[i]["split"] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    malignant_train = [r for r in rows if r["label"] == "1" and r["split"] == "train"]
    n_mal = sum(r["label"] == "1" for r in rows)
    n_annot = min(len(malignant_train), max(1, math.ceil(annotated_fraction * n_mal)))
    annotated = {r["slide_id"] for r in malignant_train[:n_annot]}
    annotated_val = {r["slide_id"] for r in rows if r["label"] == "1" and r["split"] == "val"}
    annotated_val = set(sorted(annotated_val)[:max(0, val_annotated)])
    paint_dir = out_csv.parent / "paint"
    paint_dir.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["path"] = str((csv_path.parent / r["path"]).resolve())
        r["gt_mask"] = str((csv_path.parent / r["gt_mask"]).resolve())
        r["pixel_labels"], r["pixel_labels_downsample"] = "", ""
        if r["slide_id"] in annotated | annotated_val:
            with MaskImage(Path(r["gt_mask"])) as gt:
                truth = gt.points(np.arange(gt.shape[0]), np.arange(gt.shape[1])) > 0
            target = paint_dir / f"{r['slide_id']}.tif"
            tifffile.imwrite(target, paint(r, truth))
            r["pixel_labels"], r["pixel_labels_downsample"] = str(target), r["gt_downsample"]
    outputs = [(out_csv, rows)] + ([(test_csv, [r for r in rows if r["split"] == "test"])] if test_csv else [])
    for path, keep in outputs:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(keep)
    return {"train": sum(r["split"] == "train" for r in rows), "val": sum(r["split"] == "val" for r in rows),
            "test": sum(r["split"] == "test" for r in rows), "annotated": len(annotated), "annotated_val": len(annotated_val), "malignant": n_mal,
            "malignant_test": sum(r["split"] == "test" and r["label"] == "1" for r in rows)}


def wsimil(*argv: object) -> None:
    """Run the command line in this process; a failure stops the benchmark with the command in the message."""
    from napari_wsimil.cli import main

    code = main([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"wsimil {' '.join(map(str, argv))} failed with status {code}")


def tree_cpu() -> float:
    """CPU seconds of this process and every process under it (worker processes, nannies): CPU time, unlike wall
    time, hardly changes when other jobs load the machine, so the overhead is measured in it too."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total
