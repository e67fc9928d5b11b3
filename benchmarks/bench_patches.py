"""Random 256×256 patches at 0.5 and 1.0 µm/px: napari-wsimil against OpenSlide, same patches, same run.

What a feature extractor does: ask for a patch at a physical resolution. Ours goes through
``Slide.read_region(mpp=...)`` (one thread) and ``PatchReader`` (a thread pool, batches); OpenSlide
reads the level ``get_best_level_for_downsample`` picks, converts RGBA to RGB and resizes with PIL's
box filter (the filter ours uses), one thread and the same thread count through a pool. Each run
opens its slide afresh so no side starts with a warm tile cache. The last column is the mean
absolute difference between the two sides' patches (0-255), to show they are the same patches.

    python benchmarks/bench_patches.py [--quick] [--threads N] [--n N]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import real_slides, synthetic_slide, table  # noqa: E402

PATCH = 256


def random_coords(width: int, height: int, size0: float, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    span_x, span_y = max(1, int(width - size0)), max(1, int(height - size0))
    return np.stack([rng.integers(0, span_x, n), rng.integers(0, span_y, n)], axis=1).astype(np.int64)


def openslide_reader(path: Path, slide_mpp: float, mpp: float):
    """A read(x, y) -> (256, 256, 3) function the way an OpenSlide user writes it, and its closer."""
    import openslide
    from PIL import Image

    osr = openslide.OpenSlide(str(path))
    target = mpp / slide_mpp
    level = osr.get_best_level_for_downsample(target)
    ds = osr.level_downsamples[level]
    scale = target / ds
    side = int(np.ceil(PATCH * scale))

    def read(x: int, y: int) -> np.ndarray:
        img = osr.read_region((int(x), int(y)), level, (side, side)).convert("RGB")
        if side != PATCH:
            img = img.resize((PATCH, PATCH), Image.Resampling.BOX, box=(0, 0, PATCH * scale, PATCH * scale))
        return np.asarray(img)

    return read, osr.close


def timed(func) -> tuple[float, object]:
    t = time.perf_counter()
    out = func()
    return time.perf_counter() - t, out


def bench(path: Path, mpp: float, n: int, threads: int, batch: int) -> list[object]:
    from napari_wsimil import open_slide
    from napari_wsimil.slide.tiling import PatchGrid, PatchReader

    with open_slide(path) as slide:
        if slide.mpp is None:
            raise SystemExit(f"{path.name} records no pixel size; this benchmark needs one")
        slide_mpp = slide.mpp
        height, width = slide.level_shapes[0]
        level = slide.best_level_for_mpp(mpp)
    size0 = PATCH * mpp / slide_mpp
    coords = random_coords(width, height, size0, n)
    grid = PatchGrid(coords=coords, patch_size=PATCH, mpp=mpp, size_level0=size0,
                     tissue_fraction=np.ones(n), stride_level0=size0)

    with open_slide(path) as slide:  # ours, one thread
        t_ours1, ours = timed(lambda: [slide.read_region((x, y), (PATCH, PATCH), mpp=mpp) for x, y in coords])
    with open_slide(path) as slide:  # ours, PatchReader
        def run_reader() -> list[np.ndarray]:
            with PatchReader(slide, grid, batch_size=batch, num_workers=threads, prefetch=2) as reader:
                return [p for _, p in reader]

        t_oursn, batches = timed(run_reader)
    read, close = openslide_reader(path, slide_mpp, mpp)
    try:
        t_os1, theirs = timed(lambda: [read(x, y) for x, y in coords])
    finally:
        close()
    read, close = openslide_reader(path, slide_mpp, mpp)
    try:
        with ThreadPoolExecutor(threads) as pool:
            t_osn, _ = timed(lambda: list(pool.map(lambda c: read(*c), coords)))
    finally:
        close()

    ours_arr = np.concatenate(batches)
    assert np.array_equal(ours_arr, np.stack(ours)), "PatchReader and read_region disagree"
    diff = float(np.mean([np.abs(a.astype(np.int16) - b).mean() for a, b in zip(ours, theirs)]))
    rate = lambda t: n / t  # noqa: E731
    return [
        path.name, f"{width}x{height}", f"{slide_mpp:.3f}", mpp, level,
        rate(t_ours1), rate(t_os1), rate(t_ours1) / rate(t_os1),
        rate(t_oursn), rate(t_osn), rate(t_oursn) / rate(t_osn), diff,
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer patches and a 5,000² synthetic slide")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=None, help="patches per run (default 200, --quick 60)")
    args = ap.parse_args(argv)
    n = args.n or (60 if args.quick else 200)
    files = real_slides("CMU-1-Small-Region.svs", "test3-DAPI-2-387.ndpi")
    try:
        files.append(synthetic_slide(5000 if args.quick else 20000))
    except ImportError:
        print("(napari_wsimil.slide.synthetic is missing: no synthetic slide)")
    rows = [bench(p, mpp, n, args.threads, args.batch) for p in files for mpp in (0.5, 1.0)]
    t = args.threads
    print(f"\nRandom {PATCH}x{PATCH} patches at a physical resolution, {n} per run, patches/s "
          f"(ratio = ours / OpenSlide, measured in the same run; 'ours {t}thr' is PatchReader)")
    print(table(rows, ["slide", "size", "slide mpp", "mpp", "our level", "ours 1thr", "openslide 1thr", "ratio",
                       f"ours {t}thr", f"openslide {t}thr", f"ratio {t}thr", "mean |diff|"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
