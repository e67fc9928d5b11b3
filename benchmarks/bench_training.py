"""Seconds per MIL training epoch on CPU: the engine against a bare forward/backward/Adam loop.

100 bags × 5,000 patches × 1,024 features (the issue's size; --quick: 20 × 2,000). The baseline runs the
same model over the same bags with nothing else (no sampler, losses beyond the method's, metrics or
checkpoints), so the ratio is the engine's overhead. Run: python benchmarks/bench_training.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402


def cohort(n_bags: int, n_patches: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for i in range(n_bags):
        f = rng.normal(size=(n_patches, dim)).astype(np.float32)
        y = i % 2
        if y:
            f[: max(1, n_patches // 50), :8] += 2.0  # a few tumour patches
        feats.append(f)
        labels.append(y)
    return feats, labels


def main(argv: list[str] | None = None) -> int:
    import torch

    from napari_wsimil.mil import BagDataset, build
    from napari_wsimil.train import make_config, train

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args(argv)
    n_bags, n_patches = (20, 2000) if args.quick else (100, 5000)
    feats, labels = cohort(n_bags, n_patches, 1024)
    data = BagDataset.from_arrays(feats, labels)
    rows = []
    for name in ("abmil", "clam-sb"):
        config = make_config(name, epochs=args.epochs, device="cpu", early_stopping=False)
        method = build(name, data, None, config)
        with tempfile.TemporaryDirectory() as run:
            t = time.perf_counter()
            for _ in train(method, run):
                pass
            engine = (time.perf_counter() - t) / args.epochs

        model = method.build_model()
        opt = torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=1e-5)
        t = time.perf_counter()
        for _ in range(args.epochs):
            for i in range(len(data)):
                bag = data[i]
                out = model(bag.features, label=bag.label)
                loss = torch.nn.functional.cross_entropy(out.logits[None], torch.tensor([bag.label]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        bare = (time.perf_counter() - t) / args.epochs
        rows.append([name, f"{n_bags}x{n_patches}", engine, bare, engine / bare])
    print(f"\nCPU ({torch.get_num_threads()} threads), seconds per epoch (ratio = engine / bare loop, same run)")
    print(table(rows, ["method", "bags x patches", "engine s/epoch", "bare s/epoch", "ratio"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
