"""Synthesis speed and memory: does peak memory stay flat as the slide grows 9x in area?

    python benchmarks/bench_synthesis.py [--quick] [--workers N] [--looks-only]

Full mode writes one 20,000^2 and one 60,000^2 malignant slide; --quick writes 4,000^2 and 12,000^2.
Each slide is made in its own child process, which reports its own peak RSS (ru_maxrss), so the
figures are not mixed with the parent's or each other's. Outputs go to a temporary folder that is
deleted afterwards. The table gives wall time, megapixels per second, seconds per megapixel, peak RSS,
and the ratio of peak RSS large/small, which should be about 1.

Then the cost of the harder looks (``--tumour-contrast``, ``--mucinous-share``, ``--aggregate-share``) and of real
tissue (``--textures``, from ../shared/data/pcam at 0.97 µm/px, left out with a note when absent): rendering every
tile of 8192^2 malignant slides (no JPEG, no writing) with each look, against the plain look in the same run (median
of 3 repeats over 2 slide seeds, one thread). Last, whole slides written (all levels, JPEG included) plainly and
textured, in ms per megapixel: what ``wsimil synth`` costs. ``--looks-only`` skips the memory part.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(size: int, out_dir: str, workers: int | None) -> None:
    from napari_wsimil.slide.synthetic import synthesize_slide

    t0 = time.perf_counter()
    truth = synthesize_slide(Path(out_dir) / f"bench_{size}.tiff", size, seed=1234, malignant=True, workers=workers)
    wall = time.perf_counter() - t0
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({
        "size": size, "wall_s": wall, "maxrss_mib": maxrss_kib / 1024,
        "file_mib": truth.path.stat().st_size / 2**20, "tissue_fraction": truth.tissue_fraction,
        "tumour_fraction": truth.tumour_fraction,
    }))


def _run(size: int, workers: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="wsimil-bench-") as tmp:
        cmd = [sys.executable, __file__, "--child", str(size), "--out", tmp]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        outer = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"child for {size}^2 failed:\n{proc.stderr}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["process_s"] = outer
        return result


LOOKS = {"plain": {}, "contrast 0.3": {"tumour_contrast": 0.3}, "mucinous 0.3": {"mucinous_share": 0.3},
         "aggregates 0.03": {"aggregate_share": 0.03}}
TEXTURED = "textured (pcam)"
SHARED_DATA = Path(os.environ.get("WSIMIL_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def pcam_pools(mpp: float = 0.5):
    """The training-tile pools of ../shared/data/pcam (at 0.97 µm/px), or None with a note when it is absent."""
    pcam = SHARED_DATA / "pcam"
    if not pcam.is_dir():
        print(f"({pcam} is absent: the textured look is left out)")
        return None
    from napari_wsimil.slide.synthetic import TRAIN, open_textures

    return open_textures(pcam, splits=[TRAIN], tile_mpp=0.97, mpp=mpp).pools[TRAIN]


def render_looks(size: int = 8192, repeats: int = 3) -> dict[str, float]:
    """Median seconds to render every tile of a ``size``² malignant slide, per look."""
    import numpy as np

    from napari_wsimil.slide.synthetic import TILE, SlideModel, TexturedSlide

    pools = pcam_pools()
    n = size // TILE
    looks: dict[str, dict] = dict(LOOKS)
    if pools is not None:
        looks[TEXTURED] = {}
    times: dict[str, list[float]] = {k: [] for k in looks}
    for _ in range(repeats):
        for seed in (3, 11):
            for name, kw in looks.items():
                model = SlideModel((size, size), seed, True, 0.5, **kw)
                render = TexturedSlide(model, pools).render_tile if name == TEXTURED else model.render_tile
                t0 = time.perf_counter()
                for ty in range(n):
                    for tx in range(n):
                        render(ty, tx)
                times[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def write_looks(size: int, workers: int | None, seeds: tuple[int, ...] = (3, 11)) -> dict[str, float]:
    """Median ms per megapixel to write a whole ``size``² malignant slide (all levels, JPEG), plain and textured."""
    import numpy as np

    from napari_wsimil.slide.synthetic import synthesize_slide

    pools = pcam_pools()
    out: dict[str, list[float]] = {"plain": []} | ({TEXTURED: []} if pools is not None else {})
    with tempfile.TemporaryDirectory(prefix="wsimil-bench-") as tmp:
        for seed in seeds:
            for name in out:
                t0 = time.perf_counter()
                synthesize_slide(Path(tmp) / f"{seed}.tiff", size, seed=seed, malignant=True, workers=workers,
                                 textures=pools if name == TEXTURED else None)
                out[name].append(1e3 * (time.perf_counter() - t0) / (size * size / 1e6))
    return {k: float(np.median(v)) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4,000^2 and 12,000^2 instead of 20,000^2 and 60,000^2")
    ap.add_argument("--workers", type=int, default=None, help="render threads (default: CPU count, at most 8)")
    ap.add_argument("--looks-only", action="store_true", help="skip the memory part (the two large slides)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.out, args.workers)
        return 0

    print(f"synthesis benchmark, {os.cpu_count()} CPUs, workers={args.workers or 'default'}")
    if not args.looks_only:
        _memory(args)
    looks = render_looks(4096 if args.quick else 8192)
    print("\nrendering the harder looks and real tissue (all tiles, no writing), against the plain look in this run:")
    for name, sec in looks.items():
        print(f"  {name:16s} {sec:6.2f} s  x{sec / looks['plain']:.2f}")
    size = 4096 if args.quick else 8192
    written = write_looks(size, args.workers)
    print(f"\nwriting whole {size}^2 slides (all levels, JPEG included), median of 2 seeds:")
    for name, ms in written.items():
        print(f"  {name:16s} {ms:6.1f} ms/Mpx  x{ms / written['plain']:.2f}")
    return 0


def _memory(args: argparse.Namespace) -> None:
    sizes = (4000, 12000) if args.quick else (20000, 60000)
    rows = [_run(s, args.workers) for s in sizes]
    print(f"{'size':>8} {'Mpx':>8} {'wall s':>8} {'Mpx/s':>7} {'ms/Mpx':>7} {'peak RSS MiB':>13} {'file MiB':>9}"
          f" {'tissue':>7} {'tumour':>7}")
    for r in rows:
        mpx = r["size"] ** 2 / 1e6
        print(f"{r['size']:>8} {mpx:>8.0f} {r['wall_s']:>8.1f} {mpx / r['wall_s']:>7.1f} "
              f"{1e3 * r['wall_s'] / mpx:>7.1f} {r['maxrss_mib']:>13.0f} {r['file_mib']:>9.1f}"
              f" {100 * r['tissue_fraction']:>6.1f}% {100 * r['tumour_fraction']:>6.2f}%")
    ratio = rows[1]["maxrss_mib"] / rows[0]["maxrss_mib"]
    area = (sizes[1] / sizes[0]) ** 2
    print(f"peak RSS ratio {sizes[1]}^2 / {sizes[0]}^2: {ratio:.2f} (area ratio {area:.0f}); "
          f"time ratio {rows[1]['wall_s'] / rows[0]['wall_s']:.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
