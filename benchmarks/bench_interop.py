"""Interop outputs and inputs: what do the OME-Zarr writer and the CLAM feature import cost?

    python benchmarks/bench_interop.py [--quick]

1. ``ngff``: a class-id mask of S² px (default 16,384², --quick 8,192²; blocky content, as painted masks are)
   written as OME-Zarr (NGFF 0.4, ``io.ngff.write_ngff``) and, as the baseline measured in the same run, as a
   pyramidal OME-TIFF from the same row bands (``slide.tiff_writer.write_pyramid(ome=True)``, zlib). Time and
   peak Python-allocated memory (tracemalloc, numpy included) of each; the level-0 size is printed beside them
   so that "never the full level in memory" can be read off.
2. ``import``: CLAM ``.h5`` feature files (F files of N patches x 1024 features, float32) imported into a
   project (``features.interop.plan_import`` + writing the bags: every check included) against the bare I/O of
   the same data (h5py read + ``np.savez``), both in this run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402


def blocky(size: int, seed: int = 0):
    """Row bands of a mask made of 64 px blocks of classes 0-3 (computed per band, never whole)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 4, size=(size // 64 + 1, size // 64 + 1)).astype(np.uint8)

    def band(y0: int, y1: int) -> np.ndarray:
        rows = np.arange(y0, y1) // 64
        return np.repeat(cells[rows], 64, axis=1)[:, :size]

    return band


def measure(func) -> tuple[float, float]:
    """(seconds, peak MiB allocated) of ``func()``; the writers' libraries are imported before, so that their
    module objects do not count as memory the writing takes."""
    import h5py  # noqa: F401
    import imagecodecs  # noqa: F401
    import numcodecs  # noqa: F401
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    tracemalloc.start()
    t = time.perf_counter()
    func()
    dt = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return dt, peak / 2**20


def bench_ngff(size: int, work: Path) -> None:
    from napari_wsimil.io.ngff import write_ngff
    from napari_wsimil.slide.tiff_writer import TILE, write_pyramid

    band = blocky(size)

    def tiff() -> None:
        def tile(ty: int, tx: int) -> np.ndarray:
            return band(ty * TILE, min(size, (ty + 1) * TILE))[:, tx * TILE:(tx + 1) * TILE]

        write_pyramid(work / "m.ome.tif", (size, size), tile, channels=1, mpp=4.0, compression="zlib",
                      resample="nearest", workers=1, ome=True, min_size=512)

    def zarr() -> None:
        write_ngff(work / "m.ome.zarr", (size, size), band, mpp=4.0, name="m", resample="nearest")

    t_tif, m_tif = measure(tiff)
    t_zarr, m_zarr = measure(zarr)
    level = size * size / 2**20
    print(f"\nngff: {size}² uint8 mask, level 0 = {level:.0f} MiB")
    print(table([["OME-TIFF (baseline)", t_tif, m_tif, 1.0],
                 ["OME-Zarr NGFF 0.4", t_zarr, m_zarr, t_zarr / t_tif]],
                ["writer", "seconds", "peak MiB", "time ratio"]))
    print(f"peak memory of the OME-Zarr writer = {m_zarr / level:.3f} x level 0")


def bench_import(files: int, patches: int, work: Path) -> None:
    import h5py

    from napari_wsimil.features.interop import plan_import
    from napari_wsimil.slide import open_slide
    from napari_wsimil.slide.synthetic import synthesize_slide

    slide = work / "s.tiff"
    synthesize_slide(slide, 2048, seed=1, malignant=False, mpp=0.5)
    rng = np.random.default_rng(0)
    src = {}
    for i in range(files):
        p = work / f"s{i}.h5"
        with h5py.File(p, "w") as h5:
            h5.create_dataset("features", data=rng.normal(size=(patches, 1024)).astype(np.float32))
            h5.create_dataset("coords", data=rng.integers(0, 1792, size=(patches, 2)).astype(np.int64))
        src[f"s{i}"] = p
    mb = files * patches * 1024 * 4 / 2**20

    def bare() -> None:
        for sid, p in src.items():
            with h5py.File(p, "r") as h5:
                f, c = h5["features"][()], h5["coords"][()]
            with open(work / f"bare_{sid}.npz", "wb") as fh:
                np.savez(fh, coords=c, features=f)

    def ours() -> None:
        out = work / "features" / "imported_bench"
        plans = plan_import(src, "imported:bench", 256, 0.5, lambda _sid: open_slide(slide), out)
        out.mkdir(parents=True, exist_ok=True)
        for plan in plans:
            plan.bag.save(plan.target)

    t_bare, _ = measure(bare)
    t_ours, _ = measure(ours)
    print(f"\nimport: {files} CLAM .h5 files x {patches} patches x 1024 features ({mb:.0f} MiB)")
    print(table([["h5py read + np.savez (baseline)", t_bare, mb / t_bare, 1.0],
                 ["features-import (checked, atomic)", t_ours, mb / t_ours, t_ours / t_bare]],
                ["", "seconds", "MiB/s", "time ratio"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench_ngff(8192 if args.quick else 16384, work)
        bench_import(3 if args.quick else 6, 5000 if args.quick else 10000, work)


if __name__ == "__main__":
    main()
