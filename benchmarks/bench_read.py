"""Random 256×256 level-0 tile reads: napari-wsimil against OpenSlide on the same files, same positions.

Both sides return an RGB numpy array (OpenSlide's RGBA PIL image is converted, as any caller must).
Each side starts cold (a fresh open, empty caches). Run: python benchmarks/bench_read.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import rate, real_slides, synthetic_slide, table  # noqa: E402


def positions(w: int, h: int, n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(0, max(1, w - 256))), int(rng.integers(0, max(1, h - 256)))) for _ in range(n)]


def bench_file(path: Path, n: int, threads: int) -> list[object]:
    import openslide

    from napari_wsimil import open_slide

    with open_slide(path) as s:
        w, h = s.dimensions
    pos = positions(w, h, n)

    def ours_run(workers: int) -> float:
        with open_slide(path) as slide:
            it = iter(pos)
            read = lambda p: slide.read_region(p, (256, 256), level=0)  # noqa: E731
            if workers == 1:
                return rate(lambda: read(next(it)), n)
            with ThreadPoolExecutor(workers) as pool:
                return rate(lambda: list(pool.map(read, pos)), 1) * n

    def openslide_run(workers: int) -> float:
        osr = openslide.OpenSlide(str(path))
        read = lambda p: np.asarray(osr.read_region(p, 0, (256, 256)).convert("RGB"))  # noqa: E731
        try:
            if workers == 1:
                it = iter(pos)
                return rate(lambda: read(next(it)), n)
            with ThreadPoolExecutor(workers) as pool:
                return rate(lambda: list(pool.map(read, pos)), 1) * n
        finally:
            osr.close()

    from napari_wsimil.slide.tile_cache import TILE_CACHE

    o1, r1 = ours_run(1), openslide_run(1)
    on, rn = ours_run(threads), openslide_run(threads)
    # The same reads with our tile cache off: every read decodes its tiles again (OpenSlide keeps its cache).
    budget, TILE_CACHE.max_bytes = TILE_CACHE.max_bytes, 0
    try:
        cold = ours_run(1)
    finally:
        TILE_CACHE.max_bytes = budget
    return [path.name, f"{w}x{h}", o1, r1, o1 / r1, cold, cold / r1, on, rn, on / rn]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer reads and a smaller synthetic slide")
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args(argv)
    n = 100 if args.quick else 400
    files = real_slides("CMU-1-Small-Region.svs", "tcga-cr-7395-01a-01-ts1.svs", "test3-DAPI-2-387.ndpi")
    files.append(synthetic_slide(5000 if args.quick else 20000))
    rows = [bench_file(p, n, args.threads) for p in files]
    t = args.threads
    print(f"\nRandom 256x256 level-0 reads, {n} per run, tiles/s (ratio = ours / OpenSlide, same run)")
    print(table(rows, ["slide", "size", "ours", "openslide", "ratio", "ours no-cache", "ratio no-cache", f"ours {t}thr", f"openslide {t}thr", f"ratio {t}thr"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
