"""Where the tissue is: a low-resolution boolean mask of a slide.

Patch grids, training and attention heat maps all need to skip glass, so the mask must be right
on the slides that go wrong in practice: faint stain, several sections, pen marks on the glass,
black scanner borders, dust and, now and then, a fluorescence scan handed to an H&E pipeline.
It is computed at a coarse resolution (about 8 µm/px by default) read from a coarse pyramid level,
so it costs a fraction of a second even for a 100,000 px slide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..errors import MissingMppError

if TYPE_CHECKING:  # pragma: no cover
    from .slide import Slide

#: µm/px of the mask when the slide's pixel size is known: coarse enough to be fast and to blur
#: nuclei and fibres into "tissue", fine enough that a 256 px patch at 0.5 µm/px spans 16 mask px.
DEFAULT_MASK_MPP = 8.0
#: µm/px assumed for the mask when the slide does not record its pixel size, only to scale the
#: size-based clean-up (minimum object area, hole size); the geometry stays in pixels.
ASSUMED_MASK_MPP = 8.0

#: Offset of the log score: the glass's own noise level, below which differences mean nothing.
_LOG_EPS = 0.01

Mode = Literal["auto", "brightfield", "fluorescence"]


@dataclass(frozen=True, eq=False)  # arrays inside: identity, not elementwise ==
class TissueMask:
    """A boolean tissue mask on a regular grid over level 0.

    Mask pixel (i, j) covers level-0 pixels [j*downsample, (j+1)*downsample) in x and the same in
    y, so any level-0 box maps to mask coordinates by one division, whatever level it came from.
    """

    mask: np.ndarray
    downsample: float
    mpp: float | None
    slide_shape: tuple[int, int]
    mode: str = "brightfield"
    threshold: float = float("nan")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    @property
    def tissue_fraction(self) -> float:
        """Share of the slide covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def area_um2(self) -> float | None:
        """Tissue area in µm², None when the pixel size is unknown."""
        return None if self.mpp is None else float(self.mask.sum()) * self.mpp**2

    def on_grid(self, shape: tuple[int, int], downsample: float) -> np.ndarray:
        """The mask at the centres of a grid of ``shape`` whose pixels are ``downsample`` level-0 px wide: the
        tissue under a label or ground-truth mask of another resolution (e.g. to paint "normal" on tissue and
        leave glass unlabelled, as a pathologist does)."""

        def index(n: int, limit: int) -> np.ndarray:
            return np.clip(((np.arange(n) + 0.5) * downsample / self.downsample).astype(np.int64), 0, limit - 1)

        m = self.mask
        return m[np.ix_(index(shape[0], m.shape[0]), index(shape[1], m.shape[1]))].astype(bool)

    @cached_property
    def _integral(self) -> np.ndarray:
        # Zero-padded summed-area table: bilinear interpolation of it gives the exact tissue area of
        # any axis-aligned box, including partly covered mask pixels at the box edges.
        table = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.float64)
        np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.float64), axis=1, out=table[1:, 1:])
        return table

    def _area_below(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Tissue area (in mask px) of [0, u) x [0, v) for fractional mask coordinates u (x), v (y)."""
        table = self._integral
        h, w = self.mask.shape
        u = np.clip(u, 0.0, w)
        v = np.clip(v, 0.0, h)
        u0 = np.minimum(np.floor(u).astype(np.int64), max(w - 1, 0))
        v0 = np.minimum(np.floor(v).astype(np.int64), max(h - 1, 0))
        fu, fv = u - u0, v - v0
        a = table[v0, u0]
        b = table[v0, u0 + 1]
        c = table[v0 + 1, u0]
        d = table[v0 + 1, u0 + 1]
        return a * (1 - fu) * (1 - fv) + b * fu * (1 - fv) + c * (1 - fu) * fv + d * fu * fv

    def fractions(self, coords: np.ndarray, size: float | tuple[float, float]) -> np.ndarray:
        """Tissue fraction of many level-0 boxes at once.

        ``coords`` is (N, 2) level-0 (x, y) top-left corners and ``size`` the box side (or (w, h))
        in level-0 px. Parts of a box outside the mask count as glass, so edge boxes are not
        favoured.
        """
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        sw, sh = (float(size), float(size)) if np.isscalar(size) else (float(size[0]), float(size[1]))
        if sw <= 0 or sh <= 0:
            raise ValueError(f"box size must be positive, got {size}")
        if self.mask.size == 0 or len(coords) == 0:
            return np.zeros(len(coords))
        x0 = coords[:, 0] / self.downsample
        y0 = coords[:, 1] / self.downsample
        x1 = x0 + sw / self.downsample
        y1 = y0 + sh / self.downsample
        area = (
            self._area_below(x1, y1) - self._area_below(x0, y1) - self._area_below(x1, y0) + self._area_below(x0, y0)
        )
        return np.clip(area / ((x1 - x0) * (y1 - y0)), 0.0, 1.0)

    def fraction(self, x: float, y: float, w: float, h: float) -> float:
        """Tissue fraction of one level-0 box (x, y, width, height)."""
        return float(self.fractions(np.array([[x, y]]), (w, h))[0])

    tissue_fraction_in_level0_box = fraction

    def to_level0(self, x: float, y: float) -> tuple[float, float]:
        """Level-0 (x, y) of mask column/row coordinates (for drawing the mask over the slide)."""
        return x * self.downsample, y * self.downsample


# --- reading the low-resolution image ---------------------------------------------------------


def _mask_downsample(slide: Slide, mpp: float | None, target_px: int, min_px: int, max_px: int) -> float:
    """Level-0 px per mask px: ``mpp`` µm/px when the slide's pixel size is known, else ``target_px``."""
    h, w = slide.level_shapes[0]
    long_side = max(h, w)
    if slide.mpp is None:
        if mpp is not None:
            raise MissingMppError(slide.path)
        return max(1.0, long_side / target_px)
    if mpp is not None:
        return max(1.0, mpp / slide.mpp)
    want = DEFAULT_MASK_MPP / slide.mpp
    if long_side / want < min_px:
        # A small slide (a region, a TMA core) would give a mask of a few dozen pixels; a finer one
        # is still cheap and keeps patch fractions meaningful.
        want = long_side / min_px
    # A very large slide is held to max_px: detection keeps about a dozen float planes of the mask.
    return max(1.0, want, long_side / max_px)


def _level_and_factor(slide: Slide, downsample: float, at_least: bool) -> tuple[int, int]:
    """A pyramid level and an integer block size that together give about ``downsample``.

    The level is the coarsest at least as fine as ``downsample`` (fewest tiles to decode). With
    ``at_least`` the block size rounds up, so the image is at most the requested size, and a coarser
    level that already gives that size is preferred; otherwise it rounds down, so the image is at
    least as fine as requested.
    """
    level = slide.best_level_for_downsample(downsample)
    level_ds = float(slide.downsamples[level])
    if not at_least:
        return level, max(1, int(np.floor(downsample / level_ds + 1e-6)))
    factor = max(1, int(np.ceil(downsample / level_ds - 1e-6)))
    total = level_ds * factor
    for coarser in range(level + 1, len(slide.downsamples)):
        if slide.downsamples[coarser] > total * 1.01:
            break
        level, factor = coarser, max(1, int(np.ceil(downsample / slide.downsamples[coarser] - 1e-6)))
    return level, factor


#: Pixels (rows, columns) of one block that :func:`read_low_res` reads and averages at a time (rounded to
#: whole multiples of the factor): about 12 MB of RGB, so a level is never held whole.
_BLOCK = (1024, 4096)


def read_low_res(slide: Slide, downsample: float, *, at_least: bool = False) -> tuple[np.ndarray, float]:
    """The whole slide at about ``downsample`` level-0 px per pixel, and the exact factor used.

    Reads a level at least as fine as needed, then averages whole ``factor``² blocks of it, a band of the
    level at a time on a few threads, so a big slide is never held at full resolution. ``at_least`` rounds the
    factor up (the image is at most the requested size) instead of down (at least as fine as requested).

    Why not dask (this was ``dask.array.coarsen``): every Flower site process (one per message) reads tissue
    masks, and importing ``dask.array`` (and ``distributed``, which dask imports to look for a client) cost
    it 0.3-0.6 s of CPU. The averages are the same numbers: each output pixel is the float32 mean of its own
    block, and for a factor up to 256 the block's sum of uint8 values is exact in float32, whatever the order
    of the additions (tested against dask on real slides).
    """
    from concurrent.futures import ThreadPoolExecutor

    level, factor = _level_and_factor(slide, downsample, at_least)
    h, w = slide.level_shapes[level]
    factor = max(1, min(factor, h, w))
    oh, ow = h // factor, w // factor  # whole blocks only: the excess rows and columns are left out
    bh, bw = max(1, _BLOCK[0] // factor) * factor, max(1, _BLOCK[1] // factor) * factor
    img = np.empty((oh, ow, 3), np.uint8)

    def one(y0: int, x0: int) -> None:
        y1, x1 = min(y0 + bh, oh * factor), min(x0 + bw, ow * factor)
        px = slide.read_level(level, y0, y1, x0, x1)
        if factor > 1:
            mean = np.mean(px.reshape((y1 - y0) // factor, factor, (x1 - x0) // factor, factor, 3, 1),
                           axis=(1, 3, 5), dtype=np.float32)
            px = np.clip(np.rint(mean), 0, 255).astype(np.uint8)
        img[y0 // factor : y1 // factor, x0 // factor : x1 // factor] = px

    blocks = [(y0, x0) for y0 in range(0, oh * factor, bh) for x0 in range(0, ow * factor, bw)]
    with ThreadPoolExecutor(max_workers=min(len(blocks), os.cpu_count() or 1) or 1) as pool:
        list(pool.map(lambda b: one(*b), blocks))  # list(): a block's error is raised here
    return img, float(slide.downsamples[level]) * factor


# --- detection -----------------------------------------------------------------------------------


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 0)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx * xx + yy * yy) <= r * r + r  # a slightly fuller disk: radius 1 is the whole 3x3 block


def _median3(img: np.ndarray) -> np.ndarray:
    """Separable 3x3 median (median of 3 along x, then along y): removes salt-and-pepper noise at a
    tenth of the cost of a true 3x3 median, which matters on 2048² masks."""

    def along(a: np.ndarray, axis: int) -> np.ndarray:
        p = np.pad(a, [(1, 1) if ax == axis else (0, 0) for ax in range(a.ndim)], mode="edge")
        n = a.shape[axis]
        lo = np.take(p, range(0, n), axis=axis)
        mid = np.take(p, range(1, n + 1), axis=axis)
        hi = np.take(p, range(2, n + 2), axis=axis)
        return np.maximum(np.minimum(lo, mid), np.minimum(np.maximum(lo, mid), hi))

    return along(along(img, 1), 0)


def _hue_degrees(r: np.ndarray, g: np.ndarray, b: np.ndarray, vmax: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        vmax == r, ((g - b) / safe) % 6.0, np.where(vmax == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    return np.where(chroma > 0, hue * 60.0, 0.0)


def _touching_border(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask)
    if n == 0:
        return np.zeros_like(mask)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    edge = edge[edge > 0]
    return np.isin(labels, edge)


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Remove connected components (8-connected) of fewer than ``min_px`` pixels."""
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    keep = np.bincount(labels.ravel()) >= min_px
    keep[0] = False
    return keep[labels]


def _clean(mask: np.ndarray, px_um: float, close_um: float, min_object_um2: float, max_hole_um2: float) -> np.ndarray:
    """Close small gaps, fill small holes, drop debris: sizes in µm so the result does not depend on the level."""
    from scipy import ndimage as ndi

    px_area = px_um * px_um
    radius = int(round(close_um / px_um))
    if radius >= 1:
        pad = radius + 1  # closing near the border must not erode tissue cut by the image edge
        padded = np.pad(mask, pad, mode="edge")
        mask = ndi.binary_closing(padded, structure=_disk(radius))[pad:-pad, pad:-pad]
    hole_px = int(max_hole_um2 / px_area)
    if hole_px >= 1:
        mask = ~_drop_small(~mask, hole_px + 1)
    obj_px = int(np.ceil(min_object_um2 / px_area))
    if obj_px > 1:
        mask = _drop_small(mask, obj_px)
    return mask


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    values = values[np.isfinite(values)]
    if values.size < 2 or values.min() == values.max():
        return float("inf")
    return float(threshold_otsu(values))


def detect_brightfield(
    rgb: np.ndarray,
    px_um: float,
    *,
    floor: float = 0.03,
    ceiling: float = 0.09,
    exclude_pen: bool = True,
    close_um: float = 16.0,
    min_object_um2: float = 20_000.0,
    max_hole_um2: float = 5_000.0,
) -> tuple[np.ndarray, float]:
    """Tissue in a bright-field (H&E, IHC) image at ``px_um`` µm/px; returns the mask and threshold.

    The score is colour distance from the slide's own glass colour: saturation above the glass's
    (stain is coloured, glass and dust are grey) and, at half weight, optical density (catches weak
    or unstained tissue that is grey but dense). Otsu on the log score picks the cut between glass and
    tissue, held within [floor, ceiling]: above the ceiling it would be splitting pale from dark
    tissue, below the floor it would be splitting JPEG noise on an empty slide. Pen ink (green, blue,
    black; red ink looks like eosin and is not caught), black borders and dark background corners
    are removed before and after the clean-up so closing cannot bring them back.
    """
    from scipy import ndimage as ndi

    # Channel planes: reductions over a length-3 last axis are ten times slower than elementwise ops.
    r, g, b = (rgb[..., c].astype(np.float32) for c in range(3))
    vmax = np.maximum(np.maximum(r, g), b)
    vmin = np.minimum(np.minimum(r, g), b)
    chroma = vmax - vmin
    sat = chroma / np.maximum(vmax, 1.0)

    # Black borders, black ink and very dark achromatic debris: dark and grey (dense hematoxylin is dark
    # but clearly coloured).
    dark = (vmax < 40) | ((vmax < 120) & (chroma < 0.3 * vmax))
    exclude = dark.copy()
    if exclude_pen:
        hue = _hue_degrees(r, g, b, vmax, chroma)
        # H&E and most IHC sit between purple (~250°) and red/brown (~40°); green, cyan and blue pen
        # ink falls in between. A minimum chroma keeps the hue of near-grey glass from counting.
        ink = (hue > 70) & (hue < 235) & (chroma >= 18) & (sat >= 0.1)
        exclude |= ink

    # The glass colour: bright, nearly grey pixels; pure white is usually filler for tiles the scanner
    # skipped rather than glass, so it is used only when there is nothing else.
    gray = (r + g + b) / 3.0
    glassy = ~exclude & (gray > 150) & (sat < 0.15)
    real = glassy & (vmin < 254)
    pool = real if real.sum() >= max(16, 0.005 * real.size) else glassy
    if pool.sum() >= 16:
        cut = np.percentile(gray[pool], 75)
        sel = pool & (gray >= cut)
        bg = np.array([np.median(r[sel]), np.median(g[sel]), np.median(b[sel])], np.float32)
    else:
        bg = np.full(3, 255.0, np.float32)
    bg_sat = float((bg.max() - bg.min()) / max(bg.max(), 1.0))

    # Optical density relative to the glass; log10 of the largest channel ratio = the densest channel.
    ratio = np.maximum(np.maximum((bg[0] + 1.0) / (r + 1.0), (bg[1] + 1.0) / (g + 1.0)), (bg[2] + 1.0) / (b + 1.0))
    od = np.log10(ratio).clip(0)
    score = _median3(np.maximum((sat - bg_sat).clip(0), 0.5 * od))

    # Dark, grey regions touching the image edge are scanner background (black corners, out-of-focus
    # slide edge), however big.
    dim = (gray < 0.6 * float(bg.mean())) & (sat < 0.2)
    exclude |= _touching_border(dim)
    if exclude.any():
        exclude = ndi.binary_dilation(exclude, structure=_disk(1))  # ink and border edges blend with glass

    # Otsu on the log: glass noise, faint stain and dense stain sit decades apart, and on linear values
    # Otsu would put its cut between faint and dense tissue.
    log_cut = _otsu(np.log(score[~exclude] + _LOG_EPS))
    threshold = float(np.clip(np.exp(log_cut) - _LOG_EPS if np.isfinite(log_cut) else ceiling, floor, ceiling))
    tissue = (score > threshold) & ~exclude
    tissue = _clean(tissue, px_um, close_um, min_object_um2, max_hole_um2) & ~exclude
    tissue = _clean(tissue, px_um, 0.0, min_object_um2, 0.0)
    return tissue, threshold


def detect_fluorescence(
    rgb: np.ndarray,
    px_um: float,
    *,
    close_um: float = 24.0,
    min_object_um2: float = 20_000.0,
    max_hole_um2: float = 20_000.0,
) -> tuple[np.ndarray, float]:
    """Tissue in a dark-field (fluorescence) image: anything clearly brighter than the dark background.

    Nuclear stains light up nuclei only, so brightness is smoothed over a few cells first. Its
    range spans two orders of magnitude (sparse stroma vs packed nuclei), so Otsu runs on the log:
    on linear values it would split dense from sparse tissue instead of tissue from background.
    The threshold stays a few grey levels above the background so an empty scan stays empty.
    """
    from scipy import ndimage as ndi

    r, g, b = (rgb[..., c].astype(np.float32) for c in range(3))
    bright = np.maximum(np.maximum(r, g), b)
    sigma = max(1.0, 10.0 / px_um)
    smooth = ndi.gaussian_filter(bright, sigma=sigma) if min(bright.shape) > 4 else bright
    background = float(np.percentile(smooth, 2))
    log_cut = _otsu(np.log1p(smooth))
    threshold = max(float(np.expm1(log_cut)) if np.isfinite(log_cut) else 255.0, background + 6.0)
    tissue = smooth > threshold
    tissue = _clean(tissue, px_um, close_um, min_object_um2, max_hole_um2)
    return tissue, threshold


def is_dark_field(rgb: np.ndarray) -> bool:
    """True for fluorescence-like images: most of the slide is dark, not bright glass."""
    return float(np.median(rgb.max(axis=-1))) < 80


def tissue_mask(
    slide: Slide,
    mpp: float | None = None,
    *,
    target_px: int = 2048,
    min_px: int = 512,
    max_px: int = 4096,
    mode: Mode = "auto",
    exclude_pen: bool = True,
    min_object_um2: float = 20_000.0,
    max_hole_um2: float | None = None,
) -> TissueMask:
    """Detect tissue on ``slide`` and return a low-resolution :class:`TissueMask`.

    ``mpp`` is the mask's resolution and needs the slide's pixel size. By default it is 8 µm/px,
    made finer for small slides so the mask has at least ``min_px`` on its long side and coarser for
    huge ones so it has at most ``max_px``. When the slide's pixel size is unknown the mask is at
    most ``target_px`` on its long side and the area limits assume 8 µm per mask pixel.
    ``mode`` is "brightfield" (glass is bright), "fluorescence" (background is dark) or "auto"
    (decided from the median brightness). ``min_object_um2`` drops debris and dust;
    ``max_hole_um2`` fills holes up to that size (default 5,000 µm² bright-field, 20,000 µm²
    fluorescence).
    """
    if mode not in ("auto", "brightfield", "fluorescence"):
        raise ValueError(f"mode must be 'auto', 'brightfield' or 'fluorescence', not {mode!r}")
    downsample = _mask_downsample(slide, mpp, target_px, min_px, max_px)
    rgb, downsample = read_low_res(slide, downsample, at_least=slide.mpp is None)
    mask_mpp = None if slide.mpp is None else slide.mpp * downsample
    px_um = mask_mpp if mask_mpp is not None else ASSUMED_MASK_MPP
    chosen = mode if mode != "auto" else ("fluorescence" if is_dark_field(rgb) else "brightfield")
    if chosen == "fluorescence":
        holes = 20_000.0 if max_hole_um2 is None else max_hole_um2
        mask, threshold = detect_fluorescence(rgb, px_um, min_object_um2=min_object_um2, max_hole_um2=holes)
    else:
        holes = 5_000.0 if max_hole_um2 is None else max_hole_um2
        mask, threshold = detect_brightfield(
            rgb, px_um, exclude_pen=exclude_pen, min_object_um2=min_object_um2, max_hole_um2=holes
        )
    return TissueMask(
        mask=mask, downsample=downsample, mpp=mask_mpp, slide_shape=tuple(slide.level_shapes[0]),
        mode=chosen, threshold=threshold,
    )


__all__ = [
    "TissueMask",
    "tissue_mask",
    "read_low_res",
    "detect_brightfield",
    "detect_fluorescence",
    "is_dark_field",
    "DEFAULT_MASK_MPP",
]
