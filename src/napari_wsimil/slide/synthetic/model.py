"""The procedural slide: ``SlideModel`` holds everything that defines one synthetic slide and draws any tile.

Layout (``layout``) and ground truth come from smooth fields (``fields``); pixels from periodic stromal
textures (``noise``), nuclei (``nuclei``) and a per-slide stain table (``stain``). See the package's docstring
for how a slide is built and what ``tumour_contrast``, ``mucinous_share`` and ``aggregate_share`` do.
``textured.TexturedSlide`` reuses a model's layout and ground truth and draws the tissue from real tiles.
"""

from __future__ import annotations

import math

import numpy as np

from napari_wsimil.slide.synthetic.fields import Cull, Field, Grid, blockwise, physical_grid
from napari_wsimil.slide.synthetic.layout import place_aggregates, place_mucin, place_tumour, sections
from napari_wsimil.slide.synthetic.noise import fibre_texture, grain_texture, smooth_noise
from napari_wsimil.slide.synthetic.nuclei import NucleusPop
from napari_wsimil.slide.synthetic.params import TILE, check_contrast, check_share, check_tumour_share
from napari_wsimil.slide.synthetic.stain import stain_lut
from napari_wsimil.slide.synthetic.truth import gt_downsample_for

MUCIN_EOSIN = 0.12  # mucin's eosin (stroma ~0.5, solid tumour's cytoplasm 0.42): pale
MUCIN_WASH = 14.0  # its faint haematoxylin tint (solid tumour 38): bluish-grey, not purple
MUCIN_CELLS = 0.15  # tumour nuclei in mucin, as a share of the solid pattern's
AGGREGATE_WASH = 12.0  # lymphoid aggregates' faint haematoxylin tint between the nuclei


class SlideModel:
    """Everything that defines one synthetic slide; ``render_tile`` draws any tile from it alone.

    Thread-safe after construction (rendering only reads the model). ``tumour_contrast`` (0-1) scales
    how different tumour looks from normal tissue; 1 is the original look, bit for bit, and the
    layout, the random draws and the ground truth are the same at every contrast. ``mucinous_share``
    (0-1) is the share of the tumour drawn in the mucinous pattern and ``aggregate_share`` (0-0.5) the share
    of the tissue covered by lymphoid aggregates; 0 is the original look, bit for bit, for both.
    ``tumour_share`` (low, high; kept as ``tumour_share_range``) is the range a malignant slide's tumour
    share of the tissue is drawn from (None: 0.5-8 %, the original, bit for bit).
    """

    def __init__(self, shape: tuple[int, int], seed: int, malignant: bool, mpp: float = 0.5, *,
                 tumour_contrast: float = 1.0, mucinous_share: float = 0.0, aggregate_share: float = 0.0,
                 tumour_share: tuple[float, float] | None = None):
        self.contrast = check_contrast(tumour_contrast)
        self.mucinous_share = check_share(mucinous_share)
        self.aggregate_share = check_share(aggregate_share, "lymphoid aggregates' share", top=0.5)
        self.tumour_share_range = check_tumour_share(tumour_share)
        self.shape = (int(shape[0]), int(shape[1]))
        self.seed = int(seed)
        self.malignant = bool(malignant)
        self.mpp = float(mpp)
        self.gt_downsample = gt_downsample_for(self.shape)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed & (2**64 - 1), 0x51DE]))
        self.key = np.uint64(rng.integers(0, 2**63, dtype=np.int64))
        um = 1.0 / self.mpp  # pixels per micrometre
        self._um = um
        H, W = self.shape
        L = max(H, W)

        # tissue sections: ellipses along the long axis, roughened by slide-scale and 40 µm-scale noise
        k = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
        cell = L / 128
        pot = sections(rng, self.shape, cell, k)
        scale_px = 0.36 * L / k  # converts the potential (1 at a section's centre, 0 at its edge) to ~px
        pot += 0.16 * smooth_noise(rng, pot.shape, 4.0) + 0.06 * smooth_noise(rng, pot.shape, 1.5)
        self.tissue_grid = Grid(pot, cell, self.shape)
        rough_cell = 40 * um
        self.rough = physical_grid(rng, self.shape, rough_cell, 1.0)
        self.tissue = Field([(scale_px, self.tissue_grid), (6 * um, self.rough)])
        # lumens and clefts: white holes inside tissue where 30 µm-scale noise is high
        hole_cell = 30 * um
        hole_grid = physical_grid(rng, self.shape, hole_cell, 1.2, offset=-2.4)
        self.holes = Field([(-0.8 * hole_cell, hole_grid)])
        self._holes_possible = Cull(hole_grid, -1.0 / (0.8 * hole_cell))  # where the ramp drops below 1
        # regional variation: fibre orientation mix and stromal cellularity
        reg_cell = 150 * um
        self.orient = Field([(1.2, physical_grid(rng, self.shape, reg_cell, 1.5))])
        self.cellularity = Field([(1.0, physical_grid(rng, self.shape, reg_cell, 1.5))])

        # textures, nuclei, stain
        self.tex_a_angle = float(rng.uniform(0, np.pi))
        self.tex_b_angle = self.tex_a_angle + float(rng.uniform(0.35, 0.65)) * np.pi
        self.tex_a = _Texture(fibre_texture(rng, 1024, self.tex_a_angle, um))
        self.tex_b = _Texture(fibre_texture(rng, 896, self.tex_b_angle, um))
        self.tex_n = _Texture(grain_texture(rng, 768, um))  # fine, isotropic; also the tumour cytoplasm
        self.noise = _Texture(rng.integers(-2, 3, size=(640, 640)).astype(np.int16))
        self.lut = stain_lut(rng)
        self.normal = NucleusPop.normal(rng, um, pop=0)
        # two overlapping tumour populations: crowded, overlapping nuclei, as in carcinoma
        self.tumour_pops = (NucleusPop.tumour(rng, um, pop=1), NucleusPop.tumour(rng, um, pop=2))
        if self.contrast < 1.0:  # derived from the same sprites, no random draw: the rest stays the same
            self.tumour_pops = tuple(p.toned_down(self.contrast) for p in self.tumour_pops)
        self.margin = max(p.reach for p in (self.normal, *self.tumour_pops))

        self.tumour: Field | None = None
        self._tumour_possible: Cull | None = None
        self.target_fraction = 0.0
        self.mucin: Field | None = None
        if self.malignant:
            self._place_tumour(rng, pot, cell, scale_px)
            if self.mucinous_share > 0.0:
                self._place_mucin()
        self.aggregate: Field | None = None
        self._aggregate_possible: Cull | None = None
        if self.aggregate_share > 0.0:
            self._place_aggregates(pot, cell, scale_px)

    # -- layout ----------------------------------------------------------------------------------

    def _place_tumour(self, rng: np.random.Generator, pot: np.ndarray, cell: float, scale_px: float) -> None:
        """1-3 tumour regions inside tissue, irregular, sized to a target share of the tissue area."""
        self.tumour, self.target_fraction, self._tumour_possible = place_tumour(
            rng, pot, cell, scale_px, self.shape, self._um, self.rough, self._tissue_quantile,
            self.tumour_share_range)

    def _place_mucin(self) -> None:
        """Which parts of the tumour are mucinous (``mucinous_share`` of its area), from a random stream
        of its own, so the rest of the slide is the same as without it."""
        assert self.tumour is not None
        self.mucin = place_mucin(self.seed, self.shape, self._um, self._gt_axes(), self.ground_truth(),
                                 self.mucinous_share)

    def _place_aggregates(self, pot: np.ndarray, cell: float, scale_px: float) -> None:
        """Round lymphoid aggregates inside tissue covering ``aggregate_share`` of it, on every slide.

        Its own random stream (the slide's other draws are unchanged), and its own lymphocyte population."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed & (2**64 - 1), 0xA66E]))
        self.lymph = NucleusPop.lymphocyte(rng, self._um, pop=3)
        self.aggregate, self._aggregate_possible = place_aggregates(
            rng, pot, cell, scale_px, self.shape, self._um, self.aggregate_share, self._tissue_quantile)

    def _tissue_quantile(self, field: Field, q: float) -> float:
        """The ``q`` quantile of ``field`` over tissue, on a grid of at most ~512 points a side: the threshold
        that leaves ``1 - q`` of the tissue above it (inf without tissue)."""
        H, W = self.shape
        ds = self.gt_downsample
        step = max(1, math.ceil(max(H, W) / ds / 512))
        qy = (np.arange(0, math.ceil(H / ds), step) + 0.5) * ds - 0.5
        qx = (np.arange(0, math.ceil(W / ds), step) + 0.5) * ds - 0.5
        tis = self.tissue.sample(qy, qx) > 0
        vals = field.sample(qy, qx)[tis]
        return float(np.quantile(vals, q)) if vals.size else float("inf")

    def _near_aggregate(self, y0: float, y1: float, x0: float, x1: float) -> bool:
        return self._aggregate_possible is not None and self._aggregate_possible.any_near(y0, y1, x0, x1)

    def _near_tumour(self, y0: float, y1: float, x0: float, x1: float) -> bool:
        return self._tumour_possible is not None and self._tumour_possible.any_near(y0, y1, x0, x1)

    def _gt_axes(self) -> tuple[np.ndarray, np.ndarray]:
        ds = self.gt_downsample
        H, W = self.shape
        return (np.arange(math.ceil(H / ds)) + 0.5) * ds - 0.5, (np.arange(math.ceil(W / ds)) + 0.5) * ds - 0.5

    def tissue_mask_gt(self) -> np.ndarray:
        """Tissue (1) vs background (0) on the ground-truth grid; holes count as tissue."""
        gy, gx = self._gt_axes()
        return blockwise(gy, gx, lambda ys, xs: self.tissue.sample(ys, xs) > 0)

    def ground_truth(self) -> np.ndarray:
        """Tumour mask (uint8, 1 = tumour) at ``gt_downsample``: the render fields at block centres."""
        gy, gx = self._gt_axes()
        if self.tumour is None:
            return np.zeros((len(gy), len(gx)), np.uint8)
        tumour = self.tumour

        def block(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
            return (self.tissue.sample(ys, xs) > 0) & (tumour.sample(ys, xs) > 0)

        return blockwise(gy, gx, block)

    # -- the layout for other renderers (textured.py) ----------------------------------------

    def tissue_opacity(self, ys: np.ndarray, xs: np.ndarray, row_key: int | None = None) -> np.ndarray:
        """Tissue's opacity over the glass (0-1, float32) on rows ``ys`` x columns ``xs``: the outline and
        the holes, soft over ~2 px, exactly as ``render_tile`` blends them. ``row_key`` as in ``Grid.sample``
        (only for the 256 rows of a tile starting there)."""
        alpha = _ramp(self.tissue.sample(ys, xs, row_key), 0.5)
        if alpha.any() and self._holes_possible.any_near(ys[0], ys[-1] + 1, xs[0], xs[-1] + 1):
            alpha *= _ramp(self.holes.sample(ys, xs, row_key), 0.5)
        return alpha

    def tumour_share(self, ys: np.ndarray, xs: np.ndarray, feather_px: float) -> np.ndarray | None:
        """How much of each pixel is tumour (0-1, float32) on consecutive rows ``ys`` x columns ``xs``: a ramp
        ``feather_px`` wide centred on the ground truth's boundary (the tumour field's zero); None where no
        tumour can be near. The field is divided by its gradient (central differences, one pixel beyond the
        window so that every window agrees) to measure the distance in pixels: the ramp is as narrow where the
        field is shallow as where it is steep, and the rendered boundary follows the ground truth."""
        if self.tumour is None or not self._near_tumour(ys[0], ys[-1] + 1, xs[0], xs[-1] + 1):
            return None
        f = self.tumour.sample(np.arange(ys[0] - 1, ys[-1] + 2), np.arange(xs[0] - 1, xs[-1] + 2))
        gy = f[2:, 1:-1] - f[:-2, 1:-1]
        gx = f[1:-1, 2:] - f[1:-1, :-2]
        grad = np.hypot(gy, gx)
        grad *= 0.5
        np.maximum(grad, 1e-4, out=grad)
        dist = f[1:-1, 1:-1] / grad
        return _ramp(dist, 1.0 / max(float(feather_px), 1e-3))

    def glass(self, y0: int, x0: int) -> np.ndarray:
        """The empty glass (RGB uint8) of the tile whose first pixel is (y0, x0): the faintest tint plus sensor
        noise, the same pixels ``render_tile`` draws outside tissue."""
        idx = (self.noise.window(y0, x0) + 3).astype(np.intp)
        idx *= 256
        return np.take(self.lut, idx, axis=0)

    # -- rendering -------------------------------------------------------------------------------

    def render_tile(self, ty: int, tx: int) -> np.ndarray:
        """RGB uint8 tile (256, 256, 3) at tile row ``ty``, column ``tx`` of level 0."""
        T = TILE
        y0, x0 = ty * T, tx * T
        ys = np.arange(y0, y0 + T, dtype=np.float64)
        xs = np.arange(x0, x0 + T, dtype=np.float64)
        noise = self.noise.window(y0, x0)
        tis = self.tissue.sample(ys, xs, y0)
        m = self.margin
        near_tumour = self._near_tumour(y0 - m, y0 + T + m, x0 - m, x0 + T + m)
        near_aggregate = self._near_aggregate(y0 - m, y0 + T + m, x0 - m, x0 + T + m)
        canvas, any_nuclei = self._nuclei(y0, x0, near_tumour, near_aggregate)
        if not any_nuclei and float(tis.max()) < -1.0:
            idx = (noise + 3).astype(np.intp) * 256  # background: the faintest tint, plus sensor noise
            return np.take(self.lut, idx, axis=0)

        alpha = _ramp(tis, 0.5)
        if self._holes_possible.any_near(y0, y0 + T, x0, x0 + T):
            alpha *= _ramp(self.holes.sample(ys, xs, y0), 0.5)
        w = _ramp(self.orient.sample(ys, xs, y0), 1.0)
        ta = self.tex_a.window(y0, x0)
        tb = self.tex_b.window(y0, x0)
        grain = self.tex_n.window(y0, x0)
        stroma = ta - tb
        stroma *= w
        stroma += tb
        stroma += 0.12 * grain
        hbg = None
        tumour_px = None  # the tumour ramp, kept when aggregates need it (the wash below reuses its buffer)
        if near_tumour:
            assert self.tumour is not None
            at = _ramp(self.tumour.sample(ys, xs, y0), 0.35)
            if at.any():
                # tumour: pale, granular cytoplasm instead of fibres, and a haematoxylin wash
                cyto = 0.25 * grain
                cyto += 0.42
                cyto -= stroma
                wash: float | np.ndarray = 38.0 * self.contrast
                if self.mucin is None:  # (this order keeps earlier cohorts bit for bit)
                    cyto *= at
                    if self.contrast < 1.0:
                        cyto *= self.contrast  # only partly: some fibres show through
                else:
                    if self.contrast < 1.0:
                        cyto *= self.contrast
                    # mucinous parts: pale, faintly basophilic mucin instead of stroma or cytoplasm
                    b = _ramp(self.mucin.sample(ys, xs, y0), 0.35)
                    mucin = 0.08 * grain
                    mucin += MUCIN_EOSIN
                    mucin -= stroma
                    mucin -= cyto
                    mucin *= b
                    cyto += mucin  # cyto*(1-b) + (mucin - stroma)*b
                    wash = wash + (MUCIN_WASH - wash) * b
                    cyto *= at
                stroma += cyto
                if near_aggregate:
                    tumour_px = at.copy()
                hbg = at
                hbg *= alpha
                hbg *= wash
        if near_aggregate:
            assert self.aggregate is not None
            ag = _ramp(self.aggregate.sample(ys, xs, y0), 0.35)
            if tumour_px is not None:
                ag *= 1.0 - tumour_px  # tumour wins where they meet
            if ag.any():
                # scant cytoplasm: fibres fade to a pale background behind the packed nuclei
                fade = 0.30 + 0.1 * grain
                fade -= stroma
                fade *= 0.6 * ag
                stroma += fade
                wash_ag = ag * alpha * AGGREGATE_WASH
                hbg = wash_ag if hbg is None else hbg + wash_ag
        nuc = canvas[m:m + T, m:m + T].astype(np.float32)
        e = nuc * -0.5
        e += 200.0
        e *= stroma
        e *= alpha
        e += noise
        e += 3.0
        if hbg is not None:
            nuc += hbg
        np.minimum(nuc, 255.0, out=nuc)
        np.clip(e, 0.0, 255.0, out=e)
        idx = e.astype(np.intp)
        idx *= 256
        idx += nuc.astype(np.intp)
        return np.take(self.lut, idx, axis=0)

    def _nuclei(self, y0: int, x0: int, near_tumour: bool, near_aggregate: bool = False
                ) -> tuple[np.ndarray, bool]:
        """Canvas (tile plus margin) holding the haematoxylin density of nuclei, uint8.

        Candidates are culled by their presence draw against the highest probability they could
        have before any field is evaluated, so most cells cost only a hash.
        """
        m = self.margin
        size = TILE + 2 * m
        canvas = np.zeros(size * size, np.uint8)
        drawn = False
        H, W = self.shape
        pops = (self.normal, *self.tumour_pops) if near_tumour else (self.normal,)
        if near_aggregate:
            pops = (*pops, self.lymph)
        for pop in pops:
            gy, gx, cy, cx, u = pop.candidates(self.key, y0, x0)
            sel = u[:, 0] < pop.p_max
            if not sel.any():
                continue
            gy, gx, cy, cx, u = gy[sel], gx[sel], cy[sel], cx[sel], u[sel]
            py = np.minimum(np.maximum(cy, 0), H - 1).astype(np.float64)
            px = np.minimum(np.maximum(cx, 0), W - 1).astype(np.float64)
            a = _ramp(self.tissue.points(py, px), 0.5)
            sel = a > 0
            if not sel.any():
                continue
            gy, gx, cy, cx, u, py, px, a = gy[sel], gx[sel], cy[sel], cx[sel], u[sel], py[sel], px[sel], a[sel]
            a *= _ramp(self.holes.points(py, px), 0.5)
            at = np.zeros_like(a)
            if near_tumour:
                assert self.tumour is not None
                at = _ramp(self.tumour.points(py, px), 0.35) * a
            ag = None
            if near_aggregate:
                assert self.aggregate is not None
                ag = _ramp(self.aggregate.points(py, px), 0.35) * (a - at)  # tumour wins where they meet
            if pop.kind == "lymph":
                assert ag is not None
                p = ag * pop.p_max
                sprite = np.minimum((u[:, 3] * pop.n_sprites).astype(np.intp), pop.n_sprites - 1)
            elif pop.kind == "tumour":
                p = at * pop.p_max
                if self.mucin is not None:  # only a few cells float in the mucin
                    p *= 1.0 - (1.0 - MUCIN_CELLS) * _ramp(self.mucin.points(py, px), 0.35)
                if self.contrast < 1.0:
                    p *= self.contrast  # fewer tumour nuclei ...
                sprite = np.minimum((u[:, 3] * pop.n_sprites).astype(np.intp), pop.n_sprites - 1)
            else:
                dens = np.tanh(self.cellularity.points(py, px))
                dens *= 0.39 * pop.p_max
                dens += 0.61 * pop.p_max
                if self.contrast < 1.0:
                    at *= self.contrast  # ... and normal ones left among them
                p = a * (1.0 - at) * dens
                if ag is not None:
                    p *= 1.0 - ag  # the aggregate's lymphocytes replace the stromal nuclei
                sprite = pop.choose(u, _ramp(self.orient.points(py, px), 1.0), self.tex_a_angle, self.tex_b_angle)
            keep = u[:, 0] < p
            if not keep.any():
                continue
            drawn = True
            pop.draw(canvas, size, y0 - m, x0 - m, gy[keep], gx[keep], cy[keep], cx[keep], sprite[keep])
        return canvas.reshape(size, size), drawn


def _ramp(v: np.ndarray, gain: float) -> np.ndarray:
    """clip(v * gain + 0.5, 0, 1) in place: a soft step a few pixels wide where v crosses 0."""
    v *= gain
    v += 0.5
    np.maximum(v, 0.0, out=v)
    np.minimum(v, 1.0, out=v)
    return v


class _Texture:
    """A periodic 2-D pattern, padded so that any tile's window is one contiguous slice."""

    def __init__(self, pattern: np.ndarray):
        self.period = pattern.shape[0]
        self.data = np.pad(pattern, ((0, TILE), (0, TILE)), mode="wrap")

    def window(self, y0: int, x0: int) -> np.ndarray:
        oy, ox = y0 % self.period, x0 % self.period
        return self.data[oy:oy + TILE, ox:ox + TILE]
