"""End-to-end feature extraction speed against the encoder's forward pass alone.

For each encoder: (a) ``extract_features`` on a synthetic slide (reading, decoding, resizing, encoding,
all overlapped by the PatchReader threads) and (b) the encoder alone on the same batches already in
memory. The ratio (a)/(b) in patches/s says how much of the encoder's speed survives I/O; the target
is >= 0.8 (reading must hide behind compute).

    python benchmarks/bench_features.py --quick          # small slide, CPU-friendly
    python benchmarks/bench_features.py --device cuda    # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _bench(slide_path: Path, encoder_name: str, patch: int, mpp: float, batch: int, device: str,
           workers: int, repeats: int) -> dict:
    from napari_wsimil.features import build_encoder, extract_features
    from napari_wsimil.slide import PatchReader, open_slide, patch_grid

    slide = open_slide(slide_path)
    grid = patch_grid(slide, patch, mpp, min_tissue=0.0)  # every patch: a fixed, known amount of work
    enc = build_encoder(encoder_name, device=device)
    with PatchReader(slide, grid, batch_size=batch, num_workers=workers) as reader:
        batches = [p for _, p in reader]
    enc.encode(batches[0])  # warm-up (cuDNN autotune, allocator, thread pools)
    if enc.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()

    best_fwd = best_e2e = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            enc.encode(b)
        best_fwd = min(best_fwd, time.perf_counter() - t0)
        slide = open_slide(slide_path)  # fresh tile cache: end to end includes decoding
        t0 = time.perf_counter()
        bag = extract_features(slide, enc, batch_size=batch, grid=grid, num_workers=workers,
                               device=enc.device)
        best_e2e = min(best_e2e, time.perf_counter() - t0)
        assert len(bag) == len(grid)
    n = len(grid)
    return {"encoder": encoder_name, "device": enc.device, "patches": n, "patch": patch, "batch": batch,
            "workers": workers, "forward_patches_per_s": round(n / best_fwd, 1),
            "end_to_end_patches_per_s": round(n / best_e2e, 1), "ratio": round(best_fwd / best_e2e, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small slide and few repeats (a minute on a CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--encoders", default="handcrafted,resnet18")
    ap.add_argument("--size", type=int, default=None, help="slide side in level-0 px")
    ap.add_argument("--patch", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    from napari_wsimil.slide.synthetic import synthesize_slide

    size = args.size or (2048 if args.quick else 8192)
    repeats = 2 if args.quick else 3
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.tif"
        synthesize_slide(path, size, seed=0, malignant=True)
        for name in args.encoders.split(","):
            try:
                import torch

                torch.manual_seed(0)
                torch.set_num_threads(max(1, torch.get_num_threads()))
            except ImportError:
                pass
            row = _bench(path, name, args.patch, 0.5, args.batch, args.device, args.workers, repeats)
            rows.append(row)
            print(f"{row['encoder']:>12} on {row['device']:<5} {row['patches']:>5} patches of "
                  f"{row['patch']} px: forward {row['forward_patches_per_s']:>8.1f}/s  "
                  f"end-to-end {row['end_to_end_patches_per_s']:>8.1f}/s"
                  f"  ratio {row['ratio']:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
