"""Pixel-label saving: how long from a brush stroke to its bytes on disk, and at what memory cost?

    python benchmarks/bench_labels.py [--quick]

For a 20,000² and a 100,000² slide (--quick: 10,000² and 40,000²) at 0.5 µm/px, labels at 4 µm/px
(2,500² and 12,500² label pixels, 156 MB for the large one), each measurement runs in its own child
process so that its peak RSS is its own:

- ``dirty``: paint a stroke (circles of radius 50 label px every 10 px along a 400 px line, as
  napari's brush does), then ``save_pixel_labels(slide, labels, dirty=[stroke bbox])``: only the
  chunks the stroke touches are rewritten (atomically, fsync'ed). Time = stroke painted -> save
  returned, median of 5 strokes at different places.
- ``full``: the naive baseline in the same process set-up: the same strokes, each followed by a
  save of the whole label array.
- ``export``: ``export_mask`` as pyramidal OME-TIFF then ``import_mask`` back (both band by band).

The label array starts with realistic content (about 35 % of the slide painted), since empty chunks
cost nothing to save and would flatter the baseline. No 100,000² slide file is made: the project
gets a small synthetic slide, then its record's dimensions are set to the benchmark size (saving
labels never reads the slide, only its recorded dimensions and pixel size). Peak RSS is the
process high-water mark (``VmHWM``), reset just before the timed part, so it shows what saving adds
on top of the label array the painting layer already holds; ``base`` is the RSS before.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STROKES = 5
RADIUS = 50
LENGTH = 400  # label px (1.6 mm at 4 µm/px)


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
    except OSError:
        pass


def _stroke(lab, y: int, x: int, length: int = LENGTH, value: int = 2) -> tuple[int, int, int, int]:
    """Paint circles along a diagonal line; return the (y0, y1, x0, x1) bounding box, as napari reports it."""
    import numpy as np

    h, w = lab.shape
    r = RADIUS
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = yy * yy + xx * xx <= r * r
    box = [h, 0, w, 0]
    for t in range(0, length, 10):
        cy, cx = y + t // 2, x + t
        y0, y1, x0, x1 = max(0, cy - r), min(h, cy + r + 1), max(0, cx - r), min(w, cx + r + 1)
        if y1 <= y0 or x1 <= x0:
            continue
        sub = disk[y0 - (cy - r):y1 - (cy - r), x0 - (cx - r):x1 - (cx - r)]
        lab[y0:y1, x0:x1][sub] = value
        box = [min(box[0], y0), max(box[1], y1), min(box[2], x0), max(box[3], x1)]
    return tuple(box)  # type: ignore[return-value]


def _child(size: int, mode: str, out: str) -> None:
    import numpy as np

    from napari_wsimil.project import Project
    from napari_wsimil.project import pixel_labels as pl
    from napari_wsimil.slide.synthetic import synthesize_slide

    work = Path(out)
    slide = work / "small.tiff"
    synthesize_slide(slide, 1024, seed=1, malignant=False, mpp=0.5, workers=2)
    p = Project.create(work / "proj")
    sid = p.add_slide(slide).slide_id
    p._update(sid, dimensions=(size, size), scan_mpp=0.5)  # a slide of the benchmark size (see docstring)
    g = p.label_geometry(sid)
    h, w = g.shape
    rng = np.random.default_rng(0)
    lab = np.zeros((h, w), np.uint8)
    lab[:, : int(w * 0.3)] = 1  # a large labelled region plus scattered boxes: ~35 % of chunks hold labels
    for _ in range(200):
        y, x = rng.integers(0, h), rng.integers(0, w)
        lab[y:y + h // 40, x:x + w // 40] = rng.integers(1, 3)
    p.save_pixel_labels(sid, lab)  # set-up, not timed

    written = [0, 0]  # files, bytes
    real = pl._durable_put

    def counting(path: Path, data) -> None:
        written[0] += 1
        written[1] += len(memoryview(data).cast("B"))
        real(path, data)

    pl._durable_put = counting
    base = _rss_mib("VmRSS")
    result: dict = {"size": size, "mode": mode, "label_shape": [h, w], "base_mib": base}
    _reset_peak()
    if mode in ("dirty", "full"):
        times, paint = [], []
        for i in range(STROKES):
            t0 = time.perf_counter()
            box = _stroke(lab, int(h * (0.15 + 0.15 * i)), int(w * (0.1 + 0.15 * i)))
            t1 = time.perf_counter()
            if mode == "dirty":
                p.save_pixel_labels(sid, lab, dirty=[box])
            else:
                p.save_pixel_labels(sid, lab)
            times.append(time.perf_counter() - t1)
            paint.append(t1 - t0)
        result["peak_mib"] = _rss_mib("VmHWM")
        result.update(save_s=statistics.median(times), paint_s=statistics.median(paint),
                      files=written[0] / STROKES, mib=written[1] / STROKES / 2**20)
        assert np.array_equal(p.pixel_labels(sid), lab)  # after the peak is taken: this reads everything
    else:
        del lab  # export and import work from the label store; nothing holds the whole array
        import gc

        gc.collect()
        result["base_mib"] = _rss_mib("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        p.export_mask(sid, work / "m.ome.tif")
        result.update(export_s=time.perf_counter() - t0, export_peak_mib=_rss_mib("VmHWM"),
                      file_mib=(work / "m.ome.tif").stat().st_size / 2**20)
        _reset_peak()
        t0 = time.perf_counter()
        p.import_mask(sid, work / "m.ome.tif")
        result.update(import_s=time.perf_counter() - t0, import_peak_mib=_rss_mib("VmHWM"))
    p.close()
    print(json.dumps(result))


def _run(size: int, mode: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="wsimil-bench-labels-") as tmp:
        cmd = [sys.executable, __file__, "--child", str(size), "--mode", mode, "--out", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"child for {size}^2 {mode} failed:\n{proc.stderr}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10,000^2 and 40,000^2 instead of 20,000^2 and 100,000^2")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.mode, args.out)
        return 0

    sizes = (10_000, 40_000) if args.quick else (20_000, 100_000)
    print(f"label saving: brush stroke (r={RADIUS} label px, {LENGTH} px long) -> bytes on disk; labels at 4 µm/px; "
          f"median of {STROKES} strokes")
    print(f"{'slide':>8} {'labels':>13} {'save':>6} {'ms':>9} {'files':>7} {'MiB written':>12} "
          f"{'base MiB':>9} {'peak MiB':>9} {'paint ms':>9}")
    for size in sizes:
        res = {m: _run(size, m) for m in ("dirty", "full")}
        for m, r in res.items():
            h, w = r["label_shape"]
            print(f"{size:>8} {f'{h}x{w}':>13} {m:>6} {1e3 * r['save_s']:>9.1f} {r['files']:>7.1f} {r['mib']:>12.3f} "
                  f"{r['base_mib']:>9.0f} {r['peak_mib']:>9.0f} {1e3 * r['paint_s']:>9.1f}")
        d, f = res["dirty"], res["full"]
        print(f"{'':>8} full/dirty: time x{f['save_s'] / d['save_s']:.0f}, bytes written x{f['mib'] / max(d['mib'], 1e-9):.0f}, "
              f"extra peak memory {f['peak_mib'] - f['base_mib']:.0f} vs {d['peak_mib'] - d['base_mib']:.0f} MiB")
    big = _run(sizes[-1], "export")
    h, w = big["label_shape"]
    print(f"{h}x{w} labels ({h * w / 2**20:.0f} MiB as an array), process RSS before {big['base_mib']:.0f} MiB:")
    print(f"  export_mask (pyramidal OME-TIFF, {big['file_mib']:.2f} MiB): {big['export_s']:.2f} s, "
          f"peak RSS {big['export_peak_mib']:.0f} MiB")
    print(f"  import_mask of that file: {big['import_s']:.2f} s, peak RSS {big['import_peak_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
