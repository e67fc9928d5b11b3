"""Seeded noise: smooth Gaussian noise, periodic stromal textures, and the hash that places nuclei and stamps.

Why here: the layout fields, the procedural appearance and the textured renderer all draw from these, and
the same seed must give the same draws whichever renderer asks.
"""

from __future__ import annotations

import numpy as np


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float,
                 periodic: bool = False) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (sigma in grid cells).

    ``periodic`` keeps the FFT's wrap-around, so the result tiles seamlessly; otherwise opposite
    edges are kept independent. The grids of ``fields``, the layout's sections and lobulation and the
    textured renderer's blending masks are all made of it.
    """
    h, w = shape
    pad = 0 if periodic else int(3 * sigma) + 1
    white = rng.standard_normal((h + 2 * pad, w + 2 * pad))
    fy = np.fft.fftfreq(white.shape[0])[:, None]
    fx = np.fft.rfftfreq(white.shape[1])[None, :]
    filt = np.exp(-2 * (np.pi * sigma) ** 2 * (fy * fy + fx * fx))
    out = np.fft.irfft2(np.fft.rfft2(white) * filt, s=white.shape)[pad:pad + h, pad:pad + w]
    sd = out.std()
    return (out - out.mean()) / (sd if sd > 0 else 1.0)


def fibre_texture(rng: np.random.Generator, period: int, angle: float, um: float) -> np.ndarray:
    """Periodic stromal texture: wavy collagen fibres along ``angle``, with clefts. Values ~0.2-1.

    Periodic, so the model stores one ``period``-sized pattern per slide and any tile reads its window."""
    fy = np.fft.fftfreq(period).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(period).astype(np.float32)[None, :]
    filt = np.zeros((period, period // 2 + 1), np.float32)
    for along, across, wt, dang in [(45.0, 3.0, 1.0, -0.1), (25.0, 1.8, 0.6, 0.15)]:
        cos, sin = np.float32(np.cos(angle + dang)), np.float32(np.sin(angle + dang))
        # Gaussian filter exp(-2 pi^2 (f_par^2 L_par^2 + f_perp^2 L_perp^2)), in float32 for speed
        k_par, k_perp = (np.float32(np.pi * np.sqrt(2) * length * um) for length in (along, across))
        q = np.square((fx * cos + fy * sin) * k_par)
        q += np.square((fy * cos - fx * sin) * k_perp)
        f = np.exp(-q)
        filt += np.float32(wt / np.sqrt(np.sum(f * f, dtype=np.float64))) * f  # equal variance, then weighted
    white = rng.standard_normal((period, period), dtype=np.float32)
    out = np.fft.irfft2(np.fft.rfft2(white) * filt, s=(period, period))
    out /= out.std()
    return np.clip(0.68 + 0.22 * out, 0.12, 1.0).astype(np.float32)


def grain_texture(rng: np.random.Generator, period: int, um: float) -> np.ndarray:
    """Periodic fine isotropic texture, zero-mean, for cytoplasm granularity and breaking repeats."""
    f2 = np.fft.fftfreq(period)[:, None] ** 2 + np.fft.rfftfreq(period)[None, :] ** 2
    filt = np.exp(-2 * np.pi**2 * f2 * (0.8 * um) ** 2)
    white = rng.standard_normal((period, period), dtype=np.float32)
    n = np.fft.irfft2(np.fft.rfft2(white) * filt.astype(np.float32), s=(period, period))
    return (n / n.std()).astype(np.float32)


def splitmix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays: a hash whose bits look random.

    Shared because every per-cell draw (the procedural nuclei's cells, the textured slide's stamps) is a
    hash of the cell's global index, so the tiles either side of a border draw the same thing.
    """
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
