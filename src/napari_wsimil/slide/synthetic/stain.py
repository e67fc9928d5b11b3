"""Colour: the procedural slide's Beer-Lambert stain table and the H&E colour deconvolution of real tiles.

Why one module: both describe stain as optical density (Beer-Lambert); the textured renderer re-stains real
tiles with the deconvolution (``restain``), the pools measure and even out their tiles with it, and the
procedural renderer looks its colours up in ``stain_lut``.
"""

from __future__ import annotations

import numpy as np

# Ruifrok & Johnston's H&E-DAB stain vectors (as in skimage.color), rows normalised: OD = hed @ RGB_FROM_HED.
# Public because the pools (look, featureless tiles, stain normalisation) and ``restain`` both use them.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
OD_LUT = -np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)  # uint8 -> optical density


def stain_lut(rng: np.random.Generator) -> np.ndarray:
    """(65536, 3) uint8 colour for (eosin level, haematoxylin level), Beer-Lambert, per-slide stain.

    Eosin level 200 gives stroma about RGB (230, 150, 190), haematoxylin level 255 over glass about
    (80, 60, 150); each slide's stain strengths vary by +-15 % like real batches. The model draws one per
    slide and the textured renderer takes its glass colour from it, so both backgrounds agree.
    """
    white = rng.uniform(236.0, 246.0)
    od_e = -np.log(np.array([230.0, 150.0, 190.0]) / 242.0) * rng.uniform(0.85, 1.15)
    od_h = -np.log(np.array([80.0, 60.0, 150.0]) / 242.0) * rng.uniform(0.85, 1.15)
    od_e = od_e * (1 + rng.normal(0, 0.04, 3))
    od_h = od_h * (1 + rng.normal(0, 0.04, 3))
    e = np.arange(256)[:, None, None] / 200.0
    h = np.arange(256)[None, :, None] / 255.0
    rgb = white * np.exp(-(e * od_e + h * od_h))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(65536, 3)


def restain(rgb: np.ndarray, scale: np.ndarray, shift: np.ndarray, white: np.ndarray) -> np.ndarray:
    """Scale the haematoxylin and eosin amounts of a uint8 RGB image by ``scale`` (2) and add ``shift`` (2, in
    optical density), seen through a light of colour ``white`` (3, what blank glass looks like): a different
    staining run, not a colour cast, since stains are linear in optical density (Beer-Lambert). Colour
    deconvolution makes that a 3x3 map of OD, OD' = OD @ M + b, and then
    I'_c = (white_c + 1) exp(-b_c) prod_j ((I_j + 1) / 256) ** M_jc - 1: nine 256-entry tables and two products
    per pixel, no logarithm or exponential per pixel. Returns float32 RGB, unrounded, within 0-255."""
    alpha = np.array([scale[0], scale[1], 1.0])
    beta = np.array([shift[0], shift[1], 0.0])
    m = (HED_FROM_RGB * alpha[None, :]) @ RGB_FROM_HED  # OD' = OD @ m + b
    b = beta @ RGB_FROM_HED
    base = (np.arange(256, dtype=np.float64) + 1.0) / 256.0
    # tables[j, c][v] = ((v + 1) / 256) ** m[j, c], the factor input channel j contributes to output c
    tables = (base[None, None, :] ** m[:, :, None]).astype(np.float32)
    tables[0] *= ((np.asarray(white, np.float64) + 1.0) * np.exp(-b)).astype(np.float32)[:, None]
    out = np.empty(rgb.shape, np.float32)
    idx = [rgb[..., j].astype(np.intp) for j in range(3)]
    for c in range(3):
        ch = np.take(tables[0, c], idx[0])
        ch *= np.take(tables[1, c], idx[1])
        ch *= np.take(tables[2, c], idx[2])
        out[..., c] = ch
    out -= 1.0
    np.clip(out, 0.0, 255.0, out=out)
    return out
