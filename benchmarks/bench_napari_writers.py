"""The npe2 writers: what *File > Save Selected Layers* costs for a slide's labels and outlines.

    python benchmarks/bench_napari_writers.py [--quick]

Labels: a label array as the project widgets show it (12,500² label px, a 100,000² slide at 4 µm/px with
about 35 % of it painted; --quick: 4,096²) written by ``write_labels_mask`` (pyramidal, tiled, zlib OME-TIFF
with the class table), against the baseline of ``tifffile.imwrite`` of the same array as one tiled zlib
OME-TIFF level (no pyramid, no class table), in the same process. Memory is what writing adds on top of the
array the layer already holds (tracemalloc peak, numpy's buffers included). Shapes: 2,000 polygons of 64
vertices (--quick: 500) through ``write_shapes_geojson`` against ``json.dump`` of the raw vertex lists.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402


def _timed(fn) -> tuple[float, float]:
    tracemalloc.start()
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return dt, peak / 2**20


def _labels(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    labels = np.zeros((n, n), np.uint8)
    yy, xx = np.ogrid[:n, :n]
    for _ in range(40):  # blobs covering about a third of the slide
        cy, cx, r = rng.integers(0, n, 2).tolist() + [int(rng.integers(n // 40, n // 12))]
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = int(rng.integers(1, 4))
    return labels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    import tifffile

    from napari_wsimil._writer import write_labels_mask, write_shapes_geojson

    n = 4096 if args.quick else 12_500
    labels = _labels(n)
    attrs = {"name": "bench labels", "scale": [4.0, 4.0], "units": ("µm", "µm"), "metadata": {"wsimil": {
        "downsample": 8.0, "slide_mpp": 0.5, "slide_dimensions": [n * 8, n * 8],
        "classes": [{"id": i, "name": f"class {i}", "color": "#123456"} for i in range(4)]}}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        ours, ours_mem = _timed(lambda: write_labels_mask(str(out / "ours.ome.tif"), labels, attrs))
        base, base_mem = _timed(lambda: tifffile.imwrite(out / "base.ome.tif", labels, ome=True,
                                                         tile=(512, 512), compression="zlib"))
        rows.append([f"labels {n:,}² ({(labels > 0).mean():.0%} painted)", ours, base, ours / base,
                     ours_mem, base_mem, f"{(out / 'ours.ome.tif').stat().st_size / 2**20:.1f} MiB"])
        k = 500 if args.quick else 2000
        rng = np.random.default_rng(1)
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        centres = rng.uniform(1000, n * 8 * 0.5 - 1000, (k, 2))
        shapes = [np.stack([c[0] + 300 * np.sin(t), c[1] + 300 * np.cos(t)], 1) for c in centres]  # world µm
        sattrs = {"name": "bench shapes", "scale": [1.0, 1.0], "translate": [0.0, 0.0], "units": ("µm", "µm"),
                  "shape_type": ["polygon"] * k, "edge_color": np.tile([[1.0, 0, 0, 1]], (k, 1)),
                  "metadata": {"wsimil": {"slide_mpp": 0.5, "slide_dimensions": [n * 8, n * 8],
                                          "classes": []}}}
        ours, ours_mem = _timed(lambda: write_shapes_geojson(str(out / "ours.geojson"), shapes, sattrs))
        raw = lambda: (out / "base.json").write_text(json.dumps([s.tolist() for s in shapes]))  # noqa: E731
        base, base_mem = _timed(raw)
        rows.append([f"shapes {k:,} polygons x 64", ours, base, ours / base, ours_mem, base_mem,
                     f"{(out / 'ours.geojson').stat().st_size / 2**20:.1f} MiB"])
    print(table(rows, ["layer", "writer s", "baseline s", "ratio", "writer MiB", "baseline MiB", "file"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
