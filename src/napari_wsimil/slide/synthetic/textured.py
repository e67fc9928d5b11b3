"""Synthetic slides whose tissue is real labelled H&E: ``wsimil synth OUT --textures DIR``.

Why: the procedural look of ``model.SlideModel`` draws tumour that a colour statistic finds, so every method
scored on it looked perfect and then failed on real tissue. Here the generator keeps what it is good at
(tissue outlines, holes, tumour layout and the pixel-exact ground truth, all from ``SlideModel``) and fills
the tissue with real tiles from a labelled set (PCam, Kather's CRC sets, ...): tumour regions with the
tumour class, normal tissue with the others.

Where the tiles come from: ``texture_folders`` finds the classes and splits a folder holds (and which slide of
a cohort is drawn from which split), ``texture_pools`` decodes and evens out the tiles once per cohort. This
module draws a slide from them.

How a tile is rendered (``TexturedSlide``; every tile on its own, so tiles need no neighbours and memory does
not grow with the slide):

- Stamps: each layer (normal, tumour) is a jittered square lattice of stamps on a canvas at the tiles' own
  µm/px, spacing ``SPACING`` of the stamp size, so neighbours overlap. A stamp is a random square crop (``CROP``
  of the tile's side) of one pool tile, re-stained as this slide (HED amounts scaled and shifted a little per
  slide, and a little more per stamp), turned by a multiple of 90° and maybe flipped. Everything about a stamp
  comes from a hash of its global lattice index (as the procedural nuclei do), so the tiles either side of a
  border see the same stamps.
- Which tile: smooth fields (``LOOK_CELL_UM`` scale, with a finer octave) ask for a look — density and hue —
  and each stamp draws a tile at random among those near that look (``LOOK_SPREAD``): fat next to fat, dense
  lymphocytes next to dense lymphocytes, and with PCam neighbouring stamps share a tile about 1 % of the time.
  Each layer has its own look fields; tumour stamps are drawn from the denser 70 % of the tumour tiles
  (``TUMOUR_MIN_LOOK``), since PCam's least dense "tumour" tiles are fat with a few tumour cells at the centre
  (its label needs one tumour pixel in the centre 32 px) and a lesion filled with them would be fat under a
  tumour label. (A first version shared the look fields between layers, so tumour in fatty tissue was the
  fattiest tumour: on the 60-slide PCam cohort, lesions were then mostly fat and no method found them.)
  With several normal classes, one more smooth field per class picks which class fills where (the highest
  wins): patches of stroma, lymphocytes, mucosa, not confetti.
- Blending: each stamp has a Hann window times exp(smooth noise), sharpened (``MASK_NOISE``, ``MASK_SHARPEN``),
  so seams wander instead of following the lattice and cross-fades stay narrow; the stamps' mean colours blend
  linearly and their detail is divided by the root of the summed squared weights, which keeps the texture's
  contrast in the overlaps (Heitz & Neyret's variance-preserving blend), capped at the glass's colour (nothing
  is brighter than the light; the overshoot would outline seams in white areas). The canvas is resampled once per
  256-px tile (PIL bicubic, antialiased when shrinking, placed from global coordinates), not once per stamp.
- Tumour: the tumour layer replaces the normal one over a ramp ``FEATHER_UM`` µm wide centred on the ground
  truth's boundary (distance from the tumour field's zero); tissue then covers the generator's glass with the
  generator's opacity (outline, holes), and white in the tiles becomes the glass's colour. The ground truth,
  the tissue mask and the background are the procedural slide's.
- Memory: the pools, and a bounded cache of built stamps (``STAMP_CACHE_MIB``) for the neighbouring tiles.

Limits: a set with few tiles per class (Kather's 3, CRC-VAL's 10) repeats them visibly; a stamp whose tile
differs from all its neighbours still shows a roughly square outline; PCam labels a tile tumour when its
centre 32 px holds tumour, so some tumour stamps carry normal tissue at their edges.

Speed (``benchmarks/bench_synthesis.py --quick --looks-only --workers 2``, 2 cores shared with other jobs, load
~6): writing a 4096² malignant slide from PCam at 0.5 µm/px, all levels and JPEG included, takes about 105 ms per
megapixel against about 72 ms for the procedural look in the same run (x1.45; rendering alone x2.1), i.e. ~2 s
per 4096² slide. Loading the pools (decoding ~3600 PCam JPEGs, once per cohort) takes 3-5 s.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np

from napari_wsimil.errors import WsimilError
from napari_wsimil.slide.synthetic.fields import Field, physical_grid
from napari_wsimil.slide.synthetic.model import SlideModel
from napari_wsimil.slide.synthetic.noise import smooth_noise, splitmix
from napari_wsimil.slide.synthetic.params import TILE
from napari_wsimil.slide.synthetic.stain import restain
from napari_wsimil.slide.synthetic.texture_pools import MAX_SHRINK, Pools

#: Bumped whenever the same seed and tiles would render different slides (benchmark caches are keyed by it).
TEXTURES_VERSION = 3  # 3: validation slides draw from their own part of the held-out tiles (>= 8 of them)
SPACING = 0.68  # lattice spacing over the stamp's size: each stamp overlaps its neighbours by ~1/3
JITTER = 0.12  # lattice jitter either way, as a share of the spacing (every pixel stays covered)
FEATHER_UM = 2.0  # width of the tumour/normal blend across the ground truth's boundary
CLASS_CELL_UM = 250.0  # scale of the field that picks which normal class fills where
LOOK_CELL_UM = 300.0  # scale of the fields that pick which look (density, hue) of a class fills where
# Tumour stamps come from the denser 70 % of the tumour tiles: PCam calls a tile tumour when its centre 32 px
# hold one tumour pixel, so its least dense "tumour" tiles are fat or sinus with a few cells, and a lesion drawn
# from them would be ground truth over fat, which no pathologist would draw and no model could learn.
TUMOUR_MIN_LOOK = 0.3
FINE_OCTAVE = 0.4  # weight of those fields' finer octave (a quarter of the scale)
LOOK_SD = 1.0 / math.sqrt(1.0 + FINE_OCTAVE**2)  # brings the look fields back to unit SD, so all looks are used
STAMP_CACHE_MIB = 48  # built stamps kept for the neighbouring tiles
MASK_NOISE = 2.0  # how far the seams between stamps wander (SD of the log-weight noise)
MASK_SHARPEN = 2.0  # power of the blending masks: higher, narrower cross-fades
BLEND_KEEPS_CONTRAST = True  # variance-preserving blend of the detail (else plain weighted mean)
SLIDE_STAIN = 0.08  # per-slide stain jitter: haematoxylin and eosin amounts scaled by up to this, either way,
SLIDE_SHIFT = 0.02  # ... and shifted by up to this (optical density), like different staining runs
STAMP_STAIN = 0.04  # each stamp's haematoxylin and eosin amounts scaled by up to this more, either way


class TexturedSlide:
    """A ``SlideModel``'s layout and ground truth, its tissue filled with stamps of real tiles.

    Stamps are laid out and blended on a canvas at the tiles' own µm/px (global native coordinates), and each
    256-px tile of the slide is resampled from the part of that canvas under it: one resampling per tile,
    not one per stamp, and the canvas is the same whichever tile asks, so neighbouring tiles join without a
    seam. Thread-safe; ``render_tile`` is a pure function of the slide, its pools and the tile's position.
    """

    def __init__(self, model: SlideModel, pools: Pools):
        self.model = model
        self.pools = pools
        self.shape = model.shape
        self.gt_downsample = model.gt_downsample
        um = 1.0 / model.mpp
        self.k = model.mpp / pools.tile_mpp  # native (tile) pixels per slide pixel
        if self.k > MAX_SHRINK:
            raise WsimilError(f"texture tiles at {pools.tile_mpp:g} µm/px are too fine for a slide at "
                              f"{model.mpp:g} µm/px (more than {MAX_SHRINK:g}x smaller): use a finer --mpp")
        self.margin = 3 + math.ceil(2 * max(1.0, self.k))  # native px the resampling filter reaches
        c = self.size = pools.crop  # stamp side, native px
        self.spacing = max(1, round(SPACING * c))
        self.jitter = int(JITTER * self.spacing)
        self.feather_px = max(1.0, FEATHER_UM * um)
        rng = np.random.default_rng(np.random.SeedSequence([model.seed & (2**64 - 1), 0x7E47]))
        self.masks = _masks(rng, c)
        self.key = np.uint64(rng.integers(0, 2**63, dtype=np.int64))
        # this slide's staining run: haematoxylin and eosin amounts scaled and shifted a little
        self.stain_scale = 1.0 + rng.uniform(-SLIDE_STAIN, SLIDE_STAIN, 2)
        self.stain_shift = rng.uniform(-SLIDE_SHIFT, SLIDE_SHIFT, 2)
        self.white = model.lut[3 * 256].astype(np.float64)  # the glass's colour (see SlideModel.glass)
        self._white32 = self.white.astype(np.float32)
        # fields in native pixels: which normal class, and which look (density, hue) within a class
        nshape = (math.ceil(self.shape[0] * self.k) + 1, math.ceil(self.shape[1] * self.k) + 1)
        num = 1.0 / pools.tile_mpp

        def field(cell_um: float) -> Field:
            # a finer octave makes the borders between regions wander (argmax of smooth fields alone gives
            # nearly straight borders)
            return Field([(1.0, physical_grid(rng, nshape, cell_um * num, 1.5)),
                           (FINE_OCTAVE, physical_grid(rng, nshape, cell_um * num / 4, 1.5))])

        self.class_fields = [field(CLASS_CELL_UM) for _ in pools.normal] if len(pools.normal) > 1 else []
        # each layer its own look fields; the tumour layer draws from its denser tiles only (TUMOUR_MIN_LOOK)
        self.look_fields = [[field(LOOK_CELL_UM) for _ in range(2)] for _layer in range(2)]
        self._cache: OrderedDict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_cap = max(64, STAMP_CACHE_MIB * 2**20 // (c * c * 8 * 4))
        self._lock = threading.Lock()
        self._ones = np.ones(c * c, np.float32)

    # the layout and truth are the model's
    def ground_truth(self) -> np.ndarray:
        return self.model.ground_truth()

    def tissue_mask_gt(self) -> np.ndarray:
        return self.model.tissue_mask_gt()

    def render_tile(self, ty: int, tx: int) -> np.ndarray:
        """RGB uint8 tile (256, 256, 3) at tile row ``ty``, column ``tx`` of level 0."""
        m = self.model
        y0, x0 = ty * TILE, tx * TILE
        ys = np.arange(y0, y0 + TILE, dtype=np.float64)
        xs = np.arange(x0, x0 + TILE, dtype=np.float64)
        alpha = m.tissue_opacity(ys, xs, y0)
        if not alpha.any():
            return m.glass(y0, x0)
        share = m.tumour_share(ys, xs, self.feather_px)
        if share is not None and not share.any():
            share = None
        if share is None and alpha.min() >= 1.0:  # inside tissue, away from tumour: the layer as it is
            return self._layer(0, y0, x0, TILE, alpha)
        if alpha.min() >= 1.0:
            out = np.zeros((TILE, TILE, 3), np.float32)
        else:
            out = m.glass(y0, x0).astype(np.float32)
            out *= (1.0 - alpha)[..., None]
        layers = [(0, alpha if share is None else alpha * (1.0 - share))]
        if share is not None:
            layers.append((1, alpha * share))
        for layer, weight in layers:
            if weight.any():
                rgb = self._layer(layer, y0, x0, TILE, weight).astype(np.float32)
                rgb *= weight[..., None]
                out += rgb
        np.clip(out, 0.0, 255.0, out=out)
        out += 0.5
        return out.astype(np.uint8)

    # -- stamps ----------------------------------------------------------------------------------

    def _cells(self, layer: int, ny0: int, nx0: int, nh: int, nw: int):
        """Lattice cells whose stamp touches the native window: indices, top-left corners, 10 uniforms each."""
        s, c, j = self.spacing, self.size, self.jitter
        off = s // 2 - c // 2  # a cell's stamp, unjittered, is centred on the cell
        gy = np.arange((ny0 - c - off - j) // s, (ny0 + nh - off + j) // s + 1, dtype=np.int64)
        gx = np.arange((nx0 - c - off - j) // s, (nx0 + nw - off + j) // s + 1, dtype=np.int64)
        gy, gx = (a.ravel() for a in np.meshgrid(gy, gx, indexing="ij"))
        with np.errstate(over="ignore"):
            hsh = splitmix(self.key ^ splitmix(gy.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                                                 + gx.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
                                                 + np.uint64(0x5747 + layer)))
            u = np.empty((len(hsh), 10))
            for k in range(10):
                hsh = splitmix(hsh + np.uint64(0x632BE59BD9B4E019))
                u[:, k] = (hsh >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
        top = gy * s + off + np.rint((2 * u[:, 0] - 1) * j).astype(np.int64)
        left = gx * s + off + np.rint((2 * u[:, 1] - 1) * j).astype(np.int64)
        keep = (top < ny0 + nh) & (top + c > ny0) & (left < nx0 + nw) & (left + c > nx0)
        return gy[keep], gx[keep], top[keep], left[keep], u[keep]

    def _layer(self, layer: int, y0: int, x0: int, n: int, weight: np.ndarray) -> np.ndarray:
        """One layer (0 normal, 1 tumour) over the slide's n x n pixels at (y0, x0), uint8 RGB.

        Blends the stamps on the native canvas under those pixels and resamples
        (PIL's bicubic, antialiased when shrinking) with a box placed from global coordinates. Stamps whose
        footprint has no weight are skipped: they would only change pixels that the layer does not show.
        """
        from PIL import Image
        from scipy.special import ndtr

        k, mg = self.k, self.margin
        ny0, nx0 = math.floor(y0 * k) - mg, math.floor(x0 * k) - mg
        ny1, nx1 = math.ceil((y0 + n) * k) + mg, math.ceil((x0 + n) * k) + mg
        nh, nw = ny1 - ny0, nx1 - nx0
        gy, gx, top, left, u = self._cells(layer, ny0, nx0, nh, nw)
        c = self.size
        # which part of the weight each stamp can reach, in slide pixels (filter reach included)
        r0 = np.clip(np.floor((top - mg) / k).astype(np.int64) - y0, 0, n)
        r1 = np.clip(np.ceil((top + c + mg) / k).astype(np.int64) - y0, 0, n)
        c0 = np.clip(np.floor((left - mg) / k).astype(np.int64) - x0, 0, n)
        c1 = np.clip(np.ceil((left + c + mg) / k).astype(np.int64) - x0, 0, n)
        cy = (top + c / 2).astype(np.float64)
        cx = (left + c / 2).astype(np.float64)
        if layer == 0 and self.class_fields:
            cls = np.argmax(np.stack([f.points(cy, cx) for f in self.class_fields]), axis=0)
        else:
            cls = np.zeros(len(gy), np.intp)
        look = ndtr(np.stack([f.points(cy, cx) for f in self.look_fields[layer]], axis=1) * LOOK_SD)
        if layer == 1:
            look[:, 0] = TUMOUR_MIN_LOOK + (1.0 - TUMOUR_MIN_LOOK) * look[:, 0]
        mean_acc = np.zeros((nh, nw, 3), np.float32)
        detail = np.zeros((nh, nw, 3), np.float32)
        wsum = np.zeros((nh, nw), np.float32)
        w2sum = np.zeros((nh, nw), np.float32)
        everywhere = bool(weight.all())
        for i in range(len(gy)):
            if not everywhere and not weight[r0[i]:r1[i], c0[i]:c1[i]].any():
                continue  # (an empty slice has nothing either)
            d, mm, mask, mask2 = self._stamp(layer, int(gy[i]), int(gx[i]), int(cls[i]), look[i], u[i])
            ty0, tx0 = int(top[i]) - ny0, int(left[i]) - nx0
            a0, b0 = max(0, ty0), max(0, tx0)
            a1, b1 = min(nh, ty0 + c), min(nw, tx0 + c)
            src = np.s_[a0 - ty0:a1 - ty0, b0 - tx0:b1 - tx0]
            detail[a0:a1, b0:b1] += d[src]
            mean_acc[a0:a1, b0:b1] += mm[src]
            wsum[a0:a1, b0:b1] += mask[src]
            w2sum[a0:a1, b0:b1] += mask2[src]
        np.maximum(wsum, 1e-12, out=wsum)
        np.maximum(w2sum, 1e-24, out=w2sum)
        mean_acc /= wsum[..., None]
        detail /= (np.sqrt(w2sum) if BLEND_KEEPS_CONTRAST else wsum)[..., None]
        mean_acc += detail
        np.minimum(mean_acc, self._white32, out=mean_acc)  # nothing is brighter than the light: the blend's
        np.maximum(mean_acc, 0.0, out=mean_acc)  # kept contrast would otherwise outline seams in white areas
        mean_acc += 0.5
        canvas = mean_acc.astype(np.uint8)
        box = (x0 * k - nx0, y0 * k - ny0, (x0 + n) * k - nx0, (y0 + n) * k - ny0)
        return np.asarray(Image.fromarray(canvas).resize((n, n), Image.Resampling.BICUBIC, box=box))

    def _stamp(self, layer: int, gy: int, gx: int, cls: int, look: np.ndarray, u: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One lattice cell's stamp, ready to add: its weighted detail ((x - mean) * mask), weighted mean
        (mean * mask), its blending mask and the mask squared (float32). A random crop of a tile of the look
        asked for, stained as this slide with a little jitter of its own, turned and maybe flipped, with one
        of the slide's masks, itself turned. Cached, bounded."""
        key = (layer, gy, gx)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        pool = self.pools.tumour if layer == 1 else self.pools.normal[cls]
        tile = pool.pick(float(look[0]), float(look[1]), float(u[2]), float(u[3]))
        c = self.size
        oy = int(u[4] * (tile.shape[0] - c + 1))
        ox = int(u[5] * (tile.shape[1] - c + 1))
        stamp = tile[oy:oy + c, ox:ox + c]
        jitter = 2.0 * u[8:10] - 1.0
        d = restain(stamp, self.stain_scale * (1.0 + STAMP_STAIN * jitter), self.stain_shift, self.white)
        turn = int(u[6] * 8)
        d = np.rot90(d, turn & 3)
        if turn & 4:
            d = d[:, ::-1]
        d = np.ascontiguousarray(d)
        mean = (self._ones @ d.reshape(-1, 3)) * np.float32(1.0 / (c * c))  # (a matrix product: fast)
        d -= mean
        mask = np.ascontiguousarray(np.rot90(self.masks[int(u[7] * len(self.masks))],
                                             int(u[7] * 4 * len(self.masks)) & 3))
        d *= mask[..., None]
        hit = (d, mask[..., None] * mean, mask, mask * mask)
        with self._lock:
            self._cache[key] = hit
            while len(self._cache) > self._cache_cap:
                self._cache.popitem(last=False)
        return hit


def _masks(rng: np.random.Generator, c: int, n: int = 8) -> list[np.ndarray]:
    """Blending masks for stamps of side ``c``: a Hann window (zero at the edges, so each stamp fades out)
    times exp(smooth noise), sharpened. The noise makes the seams between stamps wander instead of following
    the lattice's straight lines, the sharpening keeps the cross-fades narrow (a wide cross-fade between two
    unrelated textures reads as a blurred double exposure). Every pixel stays covered: the lattice's spacing
    and jitter keep it inside its own cell's stamp, where the window is positive."""
    ramp = np.sin(np.pi * (np.arange(c) + 0.5) / c) ** 2
    hann = ramp[:, None] * ramp[None, :]
    out = []
    for _ in range(n):
        noise = smooth_noise(rng, (c, c), c / 8.0)
        m = (hann * np.exp(MASK_NOISE * np.clip(noise, -3.0, 3.0))) ** MASK_SHARPEN
        out.append((m / m.max()).astype(np.float32))
    return out
