"""A fast colour and texture baseline encoder, no network and no weights.

Why: it runs anywhere in milliseconds per batch, gives a first model before any deep encoder is
available, and is a sanity check (a MIL model that cannot beat stain histograms is not learning
morphology). Features, all vectorised over the batch (76 dims):

* HED stain channels (colour deconvolution, :func:`skimage.color.rgb2hed`): mean, std and a
  10-bin histogram of haematoxylin and eosin, mean and std of the residual channel (26);
* HSV: mean/std of saturation and value, circular mean of hue, 8-bin saturation histogram (13);
* grey level: mean, std, gradient magnitude mean/std and an 8-bin gradient histogram (12);
* rotation-invariant uniform LBP (8 neighbours on a square ring) at radius 1 and 2, 10-bin
  histograms each (20);
* fraction of near-white and of dark pixels, and the mean H/E ratio (3), grey entropy (1), stain
  co-occurrence H×E correlation (1).
"""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2hed

from .encoder_base import Encoder

# Fixed histogram ranges (not per batch) so that features compare across batches and slides.
_H_RANGE = (0.0, 0.15)
_E_RANGE = (0.0, 0.10)
#: Edges of the 8 gradient-magnitude bins (grey levels, 0-1, per pixel). Public because
#: :mod:`.handcrafted_v2` bins its gradients the same way (its ``_GRAD_LUT`` is built from these).
GRAD_EDGES = np.array([0.0, 0.01, 0.02, 0.04, 0.06, 0.09, 0.13, 0.2, np.inf], np.float32)


def _hist(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Per-image normalised histograms of ``values`` (B, n) over [lo, hi], outliers in the end bins."""
    b = values.shape[0]
    idx = np.clip(((values - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)
    return bin_fractions(idx, bins, b)


def bin_fractions(idx: np.ndarray, bins: int, b: int) -> np.ndarray:
    """Per-image histograms of bin indices: ``idx`` (B, n) of ints in [0, bins) → (B, bins) float32
    fractions of each image's n values (``b`` is B). One ``bincount`` for the whole batch.

    Public because :mod:`.handcrafted_v2` builds its histograms with it (the same binning as v1)."""
    flat = (idx + np.arange(b)[:, None] * bins).ravel()
    counts = np.bincount(flat, minlength=b * bins).reshape(b, bins).astype(np.float32)
    return counts / max(idx.shape[1], 1)


def _riu2_table() -> np.ndarray:
    """Map each 8-bit neighbour pattern to its rotation-invariant uniform code: the number of set
    bits when the ring has at most two 0/1 transitions, else 9 (the "non-uniform" bin)."""
    codes = np.arange(256)
    bits = (codes[:, None] >> np.arange(8)) & 1
    transitions = (bits != np.roll(bits, 1, axis=1)).sum(1)
    return np.where(transitions <= 2, bits.sum(1), 9).astype(np.uint8)


_RIU2 = _riu2_table()


def lbp_hist(grey: np.ndarray, r: int, stride: int = 1) -> np.ndarray:
    """Rotation-invariant uniform LBP histograms, 10 bins, for a batch (B, H, W) of uint8.

    The 8 neighbours lie on the square ring at distance ``r`` (no interpolation, unlike skimage's
    circle: same information, a fraction of the time). Codes are taken at every ``stride``-th pixel;
    the neighbours stay at full resolution, so the texture scale does not change.

    Public because :mod:`.handcrafted_v2` takes its LBP texture features with it (at µm radii).
    """
    end = grey.shape[1] - r, grey.shape[2] - r
    c = grey[:, r:end[0]:stride, r:end[1]:stride]
    offsets = [(-r, -r), (-r, 0), (-r, r), (0, r), (r, r), (r, 0), (r, -r), (0, -r)]  # a ring, in order
    code = np.zeros(c.shape, np.uint8)
    for i, (dy, dx) in enumerate(offsets):
        nb = grey[:, r + dy:end[0] + dy:stride, r + dx:end[1] + dx:stride]
        code |= (nb >= c).view(np.uint8) << np.uint8(i)
    return bin_fractions(_RIU2[code].reshape(len(grey), -1), 10, len(grey))


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (radians), saturation and value of float RGB (..., 3): skimage's rgb2hsv, 10x faster."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    s = np.where(v > 0, delta / np.maximum(v, 1e-8), 0.0)
    d = np.maximum(delta, 1e-8)
    h = np.where(v == r, (g - b) / d, np.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = np.where(delta > 0, h, 0.0) * (np.pi / 3)
    return h.astype(np.float32), s.astype(np.float32), v.astype(np.float32)


def handcrafted_features(patches: np.ndarray, stride: int = 2) -> np.ndarray:
    """(B, P, P, 3) uint8 → (B, 76) float32. ``stride`` subsamples pixels for the colour statistics
    and where texture codes are taken (they are averages: every other pixel gives nearly the same
    numbers 4× faster); gradients and LBP neighbours stay at full resolution, so texture keeps its scale."""
    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[-1] != 3:
        raise ValueError(f"expected (B, P, P, 3) RGB patches, got shape {patches.shape}")
    b = len(patches)
    if b == 0:
        return np.zeros((0, HandcraftedEncoder.dim), np.float32)
    rgb = patches[:, ::stride, ::stride].astype(np.float32) / 255.0
    n = rgb.shape[1] * rgb.shape[2]
    hed = rgb2hed(rgb.reshape(b, n, 3)).astype(np.float32)  # (B, n, 3)
    hh, ee, dd = hed[..., 0], hed[..., 1], hed[..., 2]
    hue, sat, val = _hsv(rgb.reshape(b, n, 3))

    grey = patches.astype(np.float32) @ np.array([0.2125, 0.7154, 0.0721], np.float32) / 255.0  # (B, P, P)
    grey8 = (grey * 255.0 + 0.5).astype(np.uint8)
    # forward differences at full resolution, taken at every ``stride``-th pixel
    c = grey[:, :-1:stride, :-1:stride]
    gy = grey[:, 1::stride, :-1:stride] - c
    gx = grey[:, :-1:stride, 1::stride] - c
    grad = np.sqrt(gx * gx + gy * gy).reshape(b, -1)
    grad_idx = np.clip(np.searchsorted(GRAD_EDGES, grad, side="right") - 1, 0, 7)
    g_flat = grey[:, ::stride, ::stride].reshape(b, -1)
    g_hist = _hist(g_flat, 0.0, 1.0, 16)
    entropy = -(g_hist * np.log(g_hist + 1e-12)).sum(1, keepdims=True)

    def mean_std(a: np.ndarray) -> list[np.ndarray]:
        return [a.mean(1, keepdims=True), a.std(1, keepdims=True)]

    hc, ec = hh - hh.mean(1, keepdims=True), ee - ee.mean(1, keepdims=True)
    corr = (hc * ec).mean(1, keepdims=True) / (hh.std(1, keepdims=True) * ee.std(1, keepdims=True) + 1e-8)
    parts = [
        *mean_std(hh), *mean_std(ee), *mean_std(dd),
        _hist(hh, *_H_RANGE, 10), _hist(ee, *_E_RANGE, 10),
        *mean_std(sat), *mean_std(val),
        np.arctan2(np.sin(hue).mean(1), np.cos(hue).mean(1))[:, None] / np.pi,
        _hist(sat, 0.0, 1.0, 8),
        *mean_std(g_flat), *mean_std(grad), bin_fractions(grad_idx, 8, b),
        lbp_hist(grey8, 1, stride), lbp_hist(grey8, 2, stride),
        ((val > 0.9) & (sat < 0.1)).mean(1, keepdims=True),  # near-white share
        (g_flat < 0.3).mean(1, keepdims=True),
        np.log((hh.mean(1, keepdims=True) + 1e-3) / (ee.mean(1, keepdims=True) + 1e-3)),
        entropy, corr,
    ]
    return np.concatenate(parts, axis=1).astype(np.float32)


class HandcraftedEncoder(Encoder):
    """Colour (HED, HSV) and texture (gradient, LBP) statistics; see the module docstring."""

    name = "handcrafted"
    version = "1"
    dim = 76

    def __init__(self, stride: int = 2, device: str = "cpu"):
        self.stride = int(stride)
        self.device = "cpu"
        if self.stride != 2:
            self.version = f"1+stride{self.stride}"

    def to(self, device: str) -> HandcraftedEncoder:
        return self  # numpy only

    def encode(self, patches: np.ndarray) -> np.ndarray:
        return handcrafted_features(patches, self.stride)


__all__ = ["GRAD_EDGES", "HandcraftedEncoder", "bin_fractions", "handcrafted_features", "lbp_hist"]
