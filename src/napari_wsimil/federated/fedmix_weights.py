"""FedMix's adaptive aggregation: w_i ∝ |D_i| / Σ|D| + λ · L_i^β / Σ_j L_j^β, normalised to sum to 1.

|D_i| is the number of images that passed the site's selection and L_i its last local loss. The loss term is
why FedMix is not FedAvg: a site the global model fits badly (a high loss) pulls harder, so a site with weak
labels and few selected images is not drowned out by a site with many painted pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .protocol import Arrays


def adaptive_weights(selected: Sequence[float], losses: Sequence[float], lam: float, beta: float) -> np.ndarray:
    """The sites' aggregation weights (sum 1). A term whose total is 0 (no site selected anything, or every
    loss is 0) contributes nothing; if both are 0 the sites are weighted equally."""
    n = np.asarray(selected, np.float64)
    loss = np.asarray(losses, np.float64)
    if n.shape != loss.shape or n.ndim != 1 or not len(n):
        raise ValueError("one number of selected images and one local loss per site")
    if (n < 0).any() or (loss < 0).any() or not np.isfinite(n).all() or not np.isfinite(loss).all():
        raise ValueError("selected images and local losses are finite and non-negative")
    w = np.zeros_like(n)
    if n.sum() > 0:
        w += n / n.sum()
    lb = loss ** float(beta)
    if lb.sum() > 0:
        w += float(lam) * lb / lb.sum()
    if not w.sum() > 0:
        return np.full(len(n), 1.0 / len(n))
    return w / w.sum()


def weighted_average(arrays: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
    """Σ w_k θ_k per tensor, in float64, cast back to each tensor's dtype (integer counters such as batch
    norm's ``num_batches_tracked`` are rounded)."""
    if len(arrays) != len(weights) or not arrays:
        raise ValueError("one weight per update")
    keys = list(arrays[0])
    out: Arrays = {}
    for k in keys:
        acc = sum(float(w) * np.asarray(a[k], np.float64) for a, w in zip(arrays, weights))
        dtype = np.asarray(arrays[0][k]).dtype
        out[k] = (np.rint(acc) if np.issubdtype(dtype, np.integer) else acc).astype(dtype)
    return out


__all__ = ["adaptive_weights", "weighted_average"]
