"""Do the encoders see tumour? A linear probe on real labelled H&E patches, with wall times.

* PCam (lymph-node metastases, 96 px at ~0.97 µm/px): fit on ``train``, score on ``valid`` (other
  slides): patch AUC and balanced accuracy. The L2 strength is chosen by 5-fold CV on train.
* CRC-VAL-HE-7K (colorectal, 224 px at 0.5 µm/px, 10 tiles per class): tumour (TUM) against each
  other class, 5-fold cross-validation, fixed L2 strength (too few tiles to tune it).

The self-supervised encoders are trained on the PCam *train* patches with their labels unused
(cached in ``--cache``, so a rerun loads them) and the training time is reported.
The probe is a class-balanced L2 logistic regression fitted with L-BFGS on standardised features
(scikit-learn is not a dependency). The shared data live in ``../shared/data`` beside the checkout.

    python benchmarks/bench_ssl_probe.py                                  # all four encoders
    python benchmarks/bench_ssl_probe.py --encoders handcrafted-v2 --per-class 1000
    python benchmarks/bench_ssl_probe.py --simclr-epochs 20 --cache /tmp/ssl-cache
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("WSIMIL_SHARED_DATA",
                             Path(__file__).resolve().parents[1].parent / "shared" / "data"))
PCAM_MPP, CRC_MPP = 0.97, 0.5


# --- data ----------------------------------------------------------------------------------------

def load_pcam(split: str, per_class: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, cls in ((0, "normal"), (1, "tumor")):
        paths = sorted((SHARED / "pcam" / cls / split).glob("*.jpg"))
        if not paths:
            raise SystemExit(f"no PCam patches in {SHARED / 'pcam' / cls / split}")
        if per_class and per_class < len(paths):
            paths = [paths[i] for i in np.sort(rng.choice(len(paths), per_class, replace=False))]
        xs += [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        ys += [label] * len(paths)
    return np.stack(xs), np.array(ys)


def load_crc() -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    xs, ys = [], []
    for folder in sorted((SHARED / "crc_val_he_7k").iterdir()):
        for p in sorted(folder.glob("*.jpg")):
            xs.append(np.asarray(Image.open(p).convert("RGB")))
            ys.append(folder.name)
    return np.stack(xs), np.array(ys)


# --- probe ---------------------------------------------------------------------------------------

def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged)."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(score, np.float64)
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = np.cumsum(counts) - (counts - 1) / 2.0  # average rank of each distinct value
    r = ranks[inv]
    n1, n0 = y.sum(), (~y).sum()
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    return float(0.5 * (pred[y].mean() + (~pred[~y]).mean()))


def fit_logistic(x: np.ndarray, y: np.ndarray, lam: float):
    """Class-balanced L2 logistic regression on standardised ``x``; returns a scoring function."""
    import torch

    mu, sd = x.mean(0), x.std(0) + 1e-6
    X = torch.from_numpy(((x - mu) / sd).astype(np.float64))
    Y = torch.from_numpy(y.astype(np.float64))
    weight = torch.where(Y > 0, 0.5 / Y.mean(), 0.5 / (1 - Y.mean()))
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=300, tolerance_grad=1e-8, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, Y, reduction="none")
                ).mean() + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    W, B = w.detach().numpy(), float(b.detach())
    return lambda xx: ((xx - mu) / sd) @ W + B


def folds(y: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = np.empty(len(y), int)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        f[idx] = np.arange(len(idx)) % k
    return f


def cv_scores(x: np.ndarray, y: np.ndarray, lam: float, k: int = 5) -> np.ndarray:
    f = folds(y, k)
    s = np.empty(len(y))
    for i in range(k):
        s[f == i] = fit_logistic(x[f != i], y[f != i], lam)(x[f == i])
    return s


def pcam_probe(ftr: np.ndarray, ytr: np.ndarray, fva: np.ndarray, yva: np.ndarray,
               lams: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)) -> dict[str, float]:
    lam = max(lams, key=lambda v: auc(ytr, cv_scores(ftr, ytr, v)))
    s = fit_logistic(ftr, ytr, lam)(fva)
    return {"auc": auc(yva, s), "bacc": balanced_accuracy(yva, s > 0), "lam": lam}


def crc_probe(f: np.ndarray, labels: np.ndarray, lam: float = 0.1) -> dict[str, tuple[float, float]]:
    out = {}
    for c in sorted(set(labels) - {"TUM"}):
        sel = (labels == "TUM") | (labels == c)
        y = (labels[sel] == "TUM").astype(int)
        s = cv_scores(f[sel], y, lam)
        out[c] = (auc(y, s), balanced_accuracy(y, s > 0))
    return out


# --- encoders ------------------------------------------------------------------------------------

def encode(enc, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([enc.encode(x[i:i + batch]) for i in range(0, len(x), batch)])


def make_encoders(name: str, unlabelled: np.ndarray, args: argparse.Namespace
                  ) -> tuple[object, object, float]:
    """(encoder for PCam, encoder for CRC, training seconds)."""
    from napari_wsimil.features import build_encoder

    if name == "handcrafted":
        e = build_encoder("handcrafted")
        return e, e, 0.0
    if name == "handcrafted-v2":
        return build_encoder(name, mpp=PCAM_MPP), build_encoder(name, mpp=CRC_MPP), 0.0
    cache = Path(args.cache)
    t = time.perf_counter()

    def say(epoch: int, epochs: int, loss: float) -> None:
        print(f"  {name} epoch {epoch}/{epochs} loss {loss:.4f} ({time.perf_counter() - t:.0f} s)",
              flush=True)

    if name == "ssl-ae":
        from napari_wsimil.features.ssl import NAME, build_ssl_encoder, train_ssl_encoder
        from napari_wsimil.features.ssl_cache import cached_encoder

        settings = {"epochs": args.ae_epochs, "batch_size": 64, "width": 32, "lr": 1e-3, "seed": 0}

        def train(p, _entry):
            enc, losses = train_ssl_encoder(p, device=args.device, progress=say, **settings)
            return enc.module, losses

        enc = cached_encoder(cache, NAME, unlabelled, settings, train,
                             lambda path: build_ssl_encoder(path, device=args.device))
    elif name == "ssl-simclr":
        from dataclasses import replace

        from napari_wsimil.features.simclr import SimCLRSettings, simclr_encoder

        s = SimCLRSettings()
        s = replace(s, epochs=args.simclr_epochs, width=args.simclr_width,
                    augment=replace(s.augment, size=args.simclr_view))
        enc = simclr_encoder(unlabelled, cache, s, device=args.device, progress=say)
    else:
        raise SystemExit(f"unknown encoder {name}")
    return enc, enc, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoders", nargs="+",
                    default=["handcrafted", "handcrafted-v2", "ssl-ae", "ssl-simclr"])
    ap.add_argument("--per-class", type=int, default=0, help="PCam patches per class and split (0: all)")
    ap.add_argument("--cache", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "wsimil-ssl-probe"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ae-epochs", type=int, default=10)
    ap.add_argument("--simclr-epochs", type=int, default=15,
                    help="15 on PCam's 3,964 train patches: as many views as the default 8 on 8,000")
    ap.add_argument("--simclr-width", type=int, default=32)
    ap.add_argument("--simclr-view", type=int, default=64)
    args = ap.parse_args()
    if not (SHARED / "pcam").is_dir():
        raise SystemExit(f"the shared data are not in {SHARED}")

    xtr, ytr = load_pcam("train", args.per_class or None)
    xva, yva = load_pcam("valid", args.per_class or None)
    xcrc, ycrc = load_crc()
    print(f"PCam train {len(xtr)}, valid {len(xva)}; CRC {len(xcrc)} tiles")
    rows = []
    for name in args.encoders:
        e_pcam, e_crc, t_train = make_encoders(name, xtr, args)
        t = time.perf_counter()
        ftr, fva = encode(e_pcam, xtr), encode(e_pcam, xva)
        t_enc = (time.perf_counter() - t) / (len(xtr) + len(xva)) * 1e3
        t = time.perf_counter()
        p = pcam_probe(ftr, ytr, fva, yva)
        t_probe = time.perf_counter() - t
        c = crc_probe(encode(e_crc, xcrc, 16), ycrc)
        rows.append((name, p, c, t_train, t_enc, t_probe, ftr.shape[1]))
        print(f"{name:15s} dim {ftr.shape[1]:4d}  PCam valid AUC {p['auc']:.3f}  bal.acc {p['bacc']:.3f} "
              f"(L2 {p['lam']:g})  |  CRC TUM vs "
              + " ".join(f"{k} {a:.2f}/{b:.2f}" for k, (a, b) in c.items())
              + f"  |  train {t_train / 60:.1f} min, encode {t_enc:.2f} ms/patch, probe {t_probe:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
