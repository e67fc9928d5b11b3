"""Synthetic H&E-like whole-slide images with pixel-exact tumour ground truth.

Why synthetic: weakly supervised methods are judged by whether they find the tumour that only a
slide-level label pointed at. Real cohorts with region annotations are large and licensed; a cohort
generated here is any size, reproducible from one seed, and its ground truth is exact, because the
tumour map that is written as ground truth is the same field that decided which pixels look malignant.

How a slide is built (all deterministic from the seed):

- Layout: tissue sections, holes and tumour regions are smooth scalar fields stored on small coarse
  grids (at most ~1000 cells a side) and read anywhere by Catmull-Rom interpolation. A pixel is
  tissue where the tissue field is positive, tumour where the tumour field is positive as well.
- Pixels: any 256x256 tile is rendered on its own from those fields, periodic stain textures, and
  nuclei. Nuclei sit on a fixed global jittered grid of cells; each cell's nucleus (position, shape,
  whether present) comes from a hash of the cell's global index, so the tiles either side of a
  border draw the same nucleus and no seam appears. Colour follows Beer-Lambert absorption of
  haematoxylin and eosin, so a nucleus over stroma turns purple rather than grey.
- Ground truth: the tumour and tissue fields sampled at the centre of every ``gt_downsample`` block,
  a uint8 mask (1 = tumour, 0 = else) written next to the slide as ``<stem>_gt.tiff``.
- Difficulty: ``tumour_contrast`` (1 by default, the original look) scales how far tumour departs from
  normal tissue. Below 1 the tumour nuclei are fewer, smaller and paler, normal stromal nuclei stay
  among them, the pale cytoplasm only partly replaces the stroma and the haematoxylin wash fades; at 0
  tumour looks exactly like normal tissue. The ground truth does not change with it.
- Heterogeneity: ``mucinous_share`` (0 by default, the original look) draws that share of the tumour
  area in a second pattern, as in tumours with mucinous areas: pale, faintly basophilic mucin with a
  few floating tumour cells and no stroma. It is *paler and less cellular* than normal tissue, where the
  solid pattern is darker and more cellular, so a model that learnt "tumour = dense and dark" from slide
  labels misses it, while pixel labels that include it teach both. Which parts are mucinous is a
  smooth ~60 µm-scale field of its own seed, so layout and ground truth are the same at every share.
- Mimics: ``aggregate_share`` (0 by default) adds lymphoid aggregates to *every* slide, benign or
  malignant, covering that share of the tissue: round, very dense clusters of small dark lymphocytes
  with a faint haematoxylin wash, like the germinal centres that attract false positives in lymph
  nodes. They are dense and dark like the solid tumour but are normal tissue in the ground truth, so
  telling them from tumour needs more than "dense and dark". Their own seed again: the rest is unchanged.

Memory does not depend on slide size (coarse grids are capped or periodic, tiles are streamed by
``tiff_writer.write_pyramid``); time is linear in area, about 60 ms of CPU per megapixel (all levels,
JPEG included) for a slide one third covered by tissue.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_wsimil.errors import WsimilError

if TYPE_CHECKING:  # pragma: no cover
    from napari_wsimil.slide.textures import Pools

log = logging.getLogger(__name__)

TILE = 256
GT_MAX_SIDE = 2048  # ground-truth masks are at most this many pixels a side
SAMPLE_SIZE = 8192
SAMPLE_SEED = 20240607
_SAMPLE_VERSION = 2  # bump when the renderer changes so cached samples are regenerated

Size = int | tuple[int, int] | Sequence[int]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SlideTruth:
    """What a synthetic slide contains, for checking what a model found.

    ``tumour_fraction`` is tumour area over tissue area, both counted on the ground-truth grid;
    ``tissue_fraction`` is tissue area over slide area.
    """

    path: Path
    gt_mask: Path
    gt_downsample: int
    malignant: bool
    tumour_fraction: float
    tissue_fraction: float
    shape: tuple[int, int]
    mpp: float
    seed: int


# ------------------------------------------------------------------------------------- public API


def gt_path_for(slide_path: str | os.PathLike[str]) -> Path:
    """Where the ground-truth mask of a synthetic slide is written: ``<stem>_gt.tiff`` beside it."""
    p = Path(slide_path)
    return p.with_name(f"{p.stem}_gt.tiff")


def gt_downsample_for(shape: tuple[int, int]) -> int:
    """Power of two >= 8 that keeps the ground-truth mask within GT_MAX_SIDE pixels a side.

    Fine enough to score 256-px patches (8 to 32 mask pixels across one), small enough to hold.
    """
    ds = 8
    while max(shape) / ds > GT_MAX_SIDE:
        ds *= 2
    return ds


def synthesize_slide(
    path: str | os.PathLike[str],
    size: Size,
    seed: int,
    malignant: bool,
    mpp: float = 0.5,
    *,
    gt_path: str | os.PathLike[str] | None = None,
    quality: int = 90,
    workers: int | None = None,
    progress: Progress | None = None,
    tumour_contrast: float = 1.0,
    mucinous_share: float = 0.0,
    aggregate_share: float = 0.0,
    textures: Pools | None = None,
) -> SlideTruth:
    """Write one synthetic slide (pyramidal JPEG TIFF) and its ground-truth mask.

    ``size`` is an int (square) or (height, width) in level-0 pixels. ``progress(done, total)``
    counts written tiles. ``tumour_contrast`` in [0, 1] makes tumour harder to tell from normal
    tissue below 1; ``mucinous_share`` in [0, 1] draws that share of the tumour in the mucinous pattern;
    ``aggregate_share`` in [0, 1) covers that share of the tissue with lymphoid aggregates (see the
    module docstring). ``textures`` (pools from ``textures.open_textures``) fills the tissue with real tiles
    instead of drawing it, with the same layout and ground truth (see ``slide/textures.py``). The same
    arguments always give byte-identical files.
    """
    from napari_wsimil.slide.tiff_writer import write_image_pyramid, write_pyramid

    shape = _parse_size(size)
    mpp = _check_mpp(mpp)
    path = Path(path)
    gt_path = gt_path_for(path) if gt_path is None else Path(gt_path)
    model = SlideModel(shape, seed, malignant, mpp, tumour_contrast=tumour_contrast,
                       mucinous_share=mucinous_share, aggregate_share=aggregate_share)
    render_tile = model.render_tile
    what = "napari-wsimil synthetic slide"
    if textures is not None:
        from napari_wsimil.slide.textures import TexturedSlide

        render_tile = TexturedSlide(model, textures).render_tile
        what += f" ({textures.split} tiles of {textures.source})"
    n_tissue = int(model.tissue_mask_gt().sum(dtype=np.int64))
    mask = model.ground_truth()
    n_gt = mask.size
    tumour_fraction = float(mask.sum(dtype=np.int64)) / n_tissue if n_tissue else 0.0
    ds = model.gt_downsample
    # the mask goes first so that it is not held while the (long) slide is written
    write_image_pyramid(
        gt_path, mask, mpp=mpp * ds,
        description=f"napari-wsimil ground truth; 1=tumour 0=else; downsample={ds}; mpp={mpp * ds:g}",
    )
    del mask
    write_pyramid(
        path, shape, render_tile, mpp=mpp, description=f"{what}; mpp={mpp:g}",
        quality=quality, workers=workers, progress=progress,
    )
    return SlideTruth(path, gt_path, ds, bool(malignant), tumour_fraction, n_tissue / n_gt, shape, mpp,
                      int(seed))


def synthesize_cohort(
    out_dir: str | os.PathLike[str],
    n_slides: int,
    seed: int = 0,
    size: Size = 4096,
    mpp: float = 0.5,
    malignant_fraction: float = 0.5,
    progress: Progress | None = None,
    *,
    workers: int | None = None,
    tumour_contrast: float = 1.0,
    mucinous_share: float = 0.0,
    aggregate_share: float = 0.0,
    textures: str | os.PathLike[str] | None = None,
    tumour_class: str | None = None,
    tile_mpp: float | None = None,
    split: str | None = None,
) -> Path:
    """Write ``n_slides`` slides, their masks and ``cohort.csv`` into ``out_dir``; return the CSV path.

    ``cohort.csv`` has the columns ``slide_id,path,label,gt_mask,gt_downsample``; ``label`` is 1 for
    malignant, 0 for benign; ``path`` and ``gt_mask`` are relative to the CSV's folder (POSIX
    separators), so the cohort folder can be moved or shared as a whole. Which slides are malignant
    is a seeded shuffle; ``round(n_slides * malignant_fraction)`` of them are (halves round up).
    ``progress(done, total)`` is called after each slide. ``tumour_contrast`` (0-1, default 1) is
    passed to every slide: lower values make the tumour harder to tell from normal tissue, with the
    same layout and ground truth. ``mucinous_share`` (0-1, default 0) is the share of every tumour drawn
    in the mucinous pattern, also with the same layout and ground truth; ``aggregate_share`` (0-1, default
    0) the share of every slide's tissue covered by lymphoid aggregates (normal tissue that mimics tumour).

    ``textures`` (a folder of labelled tiles, one folder per class) fills the tissue with real H&E: tumour
    with the tumour class (``tumour_class``, else the folder whose name contains "tum"), normal tissue with the
    others, resampled from ``tile_mpp`` (else the images' resolution tags). Such a cohort has a ``split`` column,
    stratified by label (``split``: "all", the default, 55 / 15 / 30 % train / val / test; "train": train and
    val only; "test": test only); train and val slides are drawn from training tiles, test slides from
    held-out tiles. Its CSV adds ``split``, ``textures`` (the source folder) and ``texture_tiles`` (``train`` or
    ``held-out``); ``textures.json`` beside it lists the tile files of each split. Every problem with the
    folder is reported before anything is written; see ``slide/textures.py``.
    """
    if isinstance(n_slides, bool) or not isinstance(n_slides, (int, np.integer)) or n_slides < 1:
        raise WsimilError(f"the number of slides must be a whole number of at least 1, got {n_slides!r}")
    if not (0.0 <= float(malignant_fraction) <= 1.0):
        raise WsimilError(f"the malignant fraction must be between 0 and 1, got {malignant_fraction!r}")
    shape = _parse_size(size)
    mpp = _check_mpp(mpp)
    tumour_contrast = _check_contrast(tumour_contrast)
    mucinous_share = _check_share(mucinous_share)
    aggregate_share = _check_share(aggregate_share, "lymphoid aggregates' share", top=0.5)
    n = int(n_slides)
    n_malignant = int(math.floor(n * float(malignant_fraction) + 0.5))
    labels = np.zeros(n, np.int64)
    labels[:n_malignant] = 1
    np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0407])).shuffle(labels)

    tex = None
    if textures is not None:  # everything about the textures is checked before anything is written
        from napari_wsimil.slide import textures as tx

        if tumour_contrast != 1.0 or mucinous_share or aggregate_share:
            raise WsimilError("textures fill the tissue with real tiles: they cannot be combined with tumour "
                              "contrast, a mucinous share or lymphoid aggregates, which are procedural looks")
        splits = tx.cohort_splits(labels, int(seed), "all" if split is None else split)
        tex = tx.open_textures(textures, splits=[tx.tile_split_for(s) for s in splits],
                               tumour_class=tumour_class, tile_mpp=tile_mpp, mpp=mpp)
    elif tumour_class is not None or tile_mpp is not None or split is not None:
        raise WsimilError("a tumour class, tile µm/px or split only apply to textured cohorts: "
                          "add --textures DIR")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WsimilError(f"cannot create the cohort folder {out}: {exc.strerror or exc}") from exc

    header = ["slide_id", "path", "label", "gt_mask", "gt_downsample"]
    if tex is not None:
        header += ["split", "textures", "texture_tiles"]
    rows = []
    for i in range(n):
        slide_id = f"slide_{i:03d}"
        slide_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1, np.uint64)[0])
        pools = None if tex is None else tex.pools[tx.tile_split_for(splits[i])]
        truth = synthesize_slide(out / f"{slide_id}.tiff", shape, slide_seed, bool(labels[i]), mpp,
                                 workers=workers, tumour_contrast=tumour_contrast, mucinous_share=mucinous_share,
                                 aggregate_share=aggregate_share, textures=pools)
        log.info("%s: %s, tumour %.2f %% of tissue", slide_id, "malignant" if labels[i] else "benign",
                 100 * truth.tumour_fraction)
        row = [slide_id, truth.path.name, int(labels[i]), truth.gt_mask.name, truth.gt_downsample]
        if pools is not None:
            row += [splits[i], pools.source, pools.split]
        rows.append(row)
        if progress is not None:
            progress(i + 1, n)

    if tex is not None:
        tx.write_manifest(out / "textures.json", tex, {r[0]: (r[5], r[7]) for r in rows})
    csv_path = out / "cohort.csv"
    tmp = csv_path.with_name(f"cohort.csv.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    return csv_path


def sample_slide_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of a small malignant sample slide, generated on first use and cached.

    The cache is ``cache_dir``, else ``$NAPARI_WSIMIL_CACHE/sample``, else
    ``$XDG_CACHE_HOME/napari-wsimil/sample`` (``~/.cache/...``). A missing or damaged file is
    regenerated; a lock file makes a second process wait for the first rather than write the same
    slide twice, and files only appear complete (written under a temporary name, then moved).
    The ground truth sits beside it (see ``gt_path_for``).
    """
    if cache_dir is None:
        env = os.environ.get("NAPARI_WSIMIL_CACHE")
        if env:
            base = Path(env).expanduser() / "sample"
        else:
            xdg = os.environ.get("XDG_CACHE_HOME")
            base = (Path(xdg) if xdg else Path.home() / ".cache") / "napari-wsimil" / "sample"
    else:
        base = Path(cache_dir).expanduser()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WsimilError(f"cannot create the sample cache folder {base}: {exc.strerror or exc}") from exc
    path = base / f"sample-v{_SAMPLE_VERSION}-{SAMPLE_SIZE}.tiff"
    with _file_lock(base / ".sample.lock"):
        if not (_pyramid_ok(path, (SAMPLE_SIZE, SAMPLE_SIZE)) and _pyramid_ok(gt_path_for(path))):
            log.info("generating the sample slide %s", path)
            synthesize_slide(path, SAMPLE_SIZE, SAMPLE_SEED, malignant=True)
    return path


# ------------------------------------------------------------------------------------ slide model


class SlideModel:
    """Everything that defines one synthetic slide; ``render_tile`` draws any tile from it alone.

    Thread-safe after construction (rendering only reads the model). ``tumour_contrast`` (0-1) scales
    how different tumour looks from normal tissue; 1 is the original look, bit for bit, and the
    layout, the random draws and the ground truth are the same at every contrast. ``mucinous_share``
    (0-1) is the share of the tumour drawn in the mucinous pattern and ``aggregate_share`` (0-0.5) the share
    of the tissue covered by lymphoid aggregates; 0 is the original look, bit for bit, for both.
    """

    def __init__(self, shape: tuple[int, int], seed: int, malignant: bool, mpp: float = 0.5, *,
                 tumour_contrast: float = 1.0, mucinous_share: float = 0.0, aggregate_share: float = 0.0):
        self.contrast = _check_contrast(tumour_contrast)
        self.mucinous_share = _check_share(mucinous_share)
        self.aggregate_share = _check_share(aggregate_share, "lymphoid aggregates' share", top=0.5)
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
        pot = _sections(rng, self.shape, cell, k)
        scale_px = 0.36 * L / k  # converts the potential (1 at a section's centre, 0 at its edge) to ~px
        pot += 0.16 * _smooth_noise(rng, pot.shape, 4.0) + 0.06 * _smooth_noise(rng, pot.shape, 1.5)
        self.tissue_grid = _Grid(pot, cell, self.shape)
        rough_cell = 40 * um
        self.rough = _physical_grid(rng, self.shape, rough_cell, 1.0)
        self.tissue = _Field([(scale_px, self.tissue_grid), (6 * um, self.rough)])
        # lumens and clefts: white holes inside tissue where 30 µm-scale noise is high
        hole_cell = 30 * um
        hole_grid = _physical_grid(rng, self.shape, hole_cell, 1.2, offset=-2.4)
        self.holes = _Field([(-0.8 * hole_cell, hole_grid)])
        self._holes_possible = _Cull(hole_grid, -1.0 / (0.8 * hole_cell))  # where the ramp drops below 1
        # regional variation: fibre orientation mix and stromal cellularity
        reg_cell = 150 * um
        self.orient = _Field([(1.2, _physical_grid(rng, self.shape, reg_cell, 1.5))])
        self.cellularity = _Field([(1.0, _physical_grid(rng, self.shape, reg_cell, 1.5))])

        # textures, nuclei, stain
        self.tex_a_angle = float(rng.uniform(0, np.pi))
        self.tex_b_angle = self.tex_a_angle + float(rng.uniform(0.35, 0.65)) * np.pi
        self.tex_a = _Texture(_fibres(rng, 1024, self.tex_a_angle, um))
        self.tex_b = _Texture(_fibres(rng, 896, self.tex_b_angle, um))
        self.tex_n = _Texture(_grain(rng, 768, um))  # fine, isotropic; also the tumour cytoplasm
        self.noise = _Texture(rng.integers(-2, 3, size=(640, 640)).astype(np.int16))
        self.lut = _stain_lut(rng)
        self.normal = _NucleusPop.normal(rng, um, pop=0)
        # two overlapping tumour populations: crowded, overlapping nuclei, as in carcinoma
        self.tumour_pops = (_NucleusPop.tumour(rng, um, pop=1), _NucleusPop.tumour(rng, um, pop=2))
        if self.contrast < 1.0:  # derived from the same sprites, no random draw: the rest stays the same
            self.tumour_pops = tuple(p.toned_down(self.contrast) for p in self.tumour_pops)
        self.margin = max(p.reach for p in (self.normal, *self.tumour_pops))

        self.tumour: _Field | None = None
        self._tumour_possible: _Cull | None = None
        self.target_fraction = 0.0
        self.mucin: _Field | None = None
        if self.malignant:
            self._place_tumour(rng, pot, cell, scale_px)
            if self.mucinous_share > 0.0:
                self._place_mucin()
        self.aggregate: _Field | None = None
        self._aggregate_possible: _Cull | None = None
        if self.aggregate_share > 0.0:
            self._place_aggregates(pot, cell, scale_px)

    # -- layout ----------------------------------------------------------------------------------

    def _place_tumour(self, rng: np.random.Generator, pot: np.ndarray, cell: float, scale_px: float) -> None:
        """1-3 tumour regions inside tissue, irregular, sized to a target share of the tissue area."""
        um = self._um
        inside = pot * scale_px  # approximate distance into tissue, px
        tissue_area = float((inside > 0).sum()) * cell * cell
        target = float(np.exp(rng.uniform(np.log(0.005), np.log(0.08))))
        n = int(rng.integers(1, 4))
        shares = rng.dirichlet(np.full(n, 2.0))
        sigmas = np.sqrt(target * tissue_area * shares / (2 * np.pi * np.log(2)))
        sigmas = np.maximum(sigmas, 20 * um)  # a region is at least a few nuclei across
        ys, xs = (np.arange(s) * cell + cell / 2 for s in pot.shape)
        centres = []
        for s in sigmas:
            ok = np.argwhere(inside > 2.2 * s)
            if len(ok) == 0:
                ok = np.argwhere(inside >= inside.max() * 0.8)
            iy, ix = ok[rng.integers(len(ok))]
            centres.append((ys[iy], xs[ix]))
        centres_a = np.array(centres, np.float64)

        tcell, gy, gx = _bump_axes(self.shape, sigmas)
        field = np.zeros((len(gy), len(gx)), np.float32)
        for (cy, cx), s in zip(centres_a, sigmas):
            e = rng.uniform(0.6, 1.0)  # elongation
            a = rng.uniform(0, np.pi)
            dy = gy[:, None] - cy
            dx = gx[None, :] - cx
            u = (dy * np.cos(a) + dx * np.sin(a)) / (s / np.sqrt(e))
            v = (-dy * np.sin(a) + dx * np.cos(a)) / (s * np.sqrt(e))
            bump = np.exp(-0.5 * (u * u + v * v)).astype(np.float32)
            field = np.maximum(field, bump * float(rng.uniform(0.85, 1.0)))
        # multiplicative lobulation: irregular, with satellite nodules, and zero far from every region
        field *= 1.0 + 0.55 * _smooth_noise(rng, field.shape, 1.5)
        grid = _Grid(field, tcell, self.shape)
        # ~px of boundary displacement per unit of field: 1/(slope of a gaussian at half maximum)
        slope_px = float(np.median(sigmas)) / 0.59
        thr = self._tissue_quantile(_Field([(slope_px, grid), (4 * um, self.rough)]), 1 - target)
        self.tumour = _Field([(slope_px, grid), (4 * um, self.rough)], offset=-thr)
        self.target_fraction = target
        # cull: tumour pixels (ramp > 0, i.e. field > -1/0.35) need the grid term above this level
        rough_max = float(np.abs(self.rough.v).max()) * 1.3
        self._tumour_possible = _Cull(grid, (thr - 1.5 - 4 * um * rough_max) / slope_px)

    def _place_mucin(self) -> None:
        """Which parts of the tumour are mucinous: a smooth field thresholded so that ``mucinous_share``
        of the tumour area (on the ground-truth grid) is above 0. Its own random stream, so the rest of
        the slide is the same as without it."""
        assert self.tumour is not None
        um = self._um
        rng = np.random.default_rng(np.random.SeedSequence([self.seed & (2**64 - 1), 0x3C1D]))
        cell = 60 * um
        grid = _physical_grid(rng, self.shape, cell, 1.5)
        gain = cell / 2  # unit SD over a cell -> about a pixel of boundary displacement per unit
        gy, gx = self._gt_axes()
        tumour = self.ground_truth().astype(bool)
        vals = (grid.sample(gy, gx) * np.float32(gain))[tumour]
        if self.mucinous_share >= 1.0 or not vals.size:
            thr = -np.inf if self.mucinous_share >= 1.0 else np.inf
        else:
            thr = float(np.quantile(vals, 1.0 - self.mucinous_share))
        self.mucin = _Field([(gain, grid)], offset=-thr if np.isfinite(thr) else (1e9 if thr < 0 else -1e9))

    def _place_aggregates(self, pot: np.ndarray, cell: float, scale_px: float) -> None:
        """Round lymphoid aggregates inside tissue covering ``aggregate_share`` of it, on every slide.

        Its own random stream (the slide's other draws are unchanged), and its own lymphocyte population."""
        um = self._um
        rng = np.random.default_rng(np.random.SeedSequence([self.seed & (2**64 - 1), 0xA66E]))
        self.lymph = _NucleusPop.lymphocyte(rng, um, pop=3)
        inside = pot * scale_px
        tissue_area = float((inside > 0).sum()) * cell * cell
        n = int(rng.integers(3, 7))
        # bumps whose half-maximum discs together hold ~1.5x the target area, at least 25 µm across
        sigmas = np.full(n, np.sqrt(1.5 * self.aggregate_share * tissue_area / n / (2 * np.pi * np.log(2))))
        sigmas *= rng.uniform(0.7, 1.3, n)
        sigmas = np.maximum(sigmas, 12 * um)
        ys, xs = (np.arange(k) * cell + cell / 2 for k in pot.shape)
        tcell, gy, gx = _bump_axes(self.shape, sigmas)
        field = np.zeros((len(gy), len(gx)), np.float32)
        for s in sigmas:
            ok = np.argwhere(inside > 1.5 * s)
            if len(ok) == 0:
                ok = np.argwhere(inside >= inside.max() * 0.8)
            iy, ix = ok[rng.integers(len(ok))]
            d2 = (gy[:, None] - ys[iy]) ** 2 + (gx[None, :] - xs[ix]) ** 2
            field = np.maximum(field, np.exp(-0.5 * d2 / (s * s)).astype(np.float32))
        grid = _Grid(field, tcell, self.shape)
        slope_px = float(np.median(sigmas)) / 0.59
        thr = self._tissue_quantile(_Field([(slope_px, grid)]), 1 - self.aggregate_share)
        self.aggregate = _Field([(slope_px, grid)], offset=-thr)
        self._aggregate_possible = _Cull(grid, (thr - 3.0) / slope_px)

    def _tissue_quantile(self, field: _Field, q: float) -> float:
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
        return _blocks(gy, gx, lambda ys, xs: self.tissue.sample(ys, xs) > 0)

    def ground_truth(self) -> np.ndarray:
        """Tumour mask (uint8, 1 = tumour) at ``gt_downsample``: the render fields at block centres."""
        gy, gx = self._gt_axes()
        if self.tumour is None:
            return np.zeros((len(gy), len(gx)), np.uint8)
        tumour = self.tumour

        def block(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
            return (self.tissue.sample(ys, xs) > 0) & (tumour.sample(ys, xs) > 0)

        return _blocks(gy, gx, block)

    # -- the layout for other renderers (slide/textures.py) ----------------------------------------

    def tissue_opacity(self, ys: np.ndarray, xs: np.ndarray, row_key: int | None = None) -> np.ndarray:
        """Tissue's opacity over the glass (0-1, float32) on rows ``ys`` x columns ``xs``: the outline and
        the holes, soft over ~2 px, exactly as ``render_tile`` blends them. ``row_key`` as in ``_Grid.sample``
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


# ------------------------------------------------------------------------------- fields and grids


_POWERS = np.arange(4.0)
# rows: coefficients of 1, t, t^2, t^3; columns: the 4 taps (Catmull-Rom spline, tension 0.5)
_CATMULL_ROM = np.array([[0.0, 1.0, 0.0, 0.0],
                         [-0.5, 0.0, 0.5, 0.0],
                         [1.0, -2.5, 2.0, -0.5],
                         [-0.5, 1.5, -1.5, 0.5]])


class _Grid:
    """A smooth scalar field stored on a coarse grid of square cells covering the slide.

    Read by separable Catmull-Rom interpolation: C1-continuous, so thresholded boundaries are smooth
    curves rather than polygons, and the same value comes out whichever tile asks. Past the grid's
    edge a plain grid repeats its edge value; a ``periodic`` one wraps around, which lets textures
    defined in micrometres (holes, edge roughness) use a grid of fixed size on any slide size.
    """

    def __init__(self, values: np.ndarray, cell: float, shape: tuple[int, int], periodic: bool = False):
        self.cell = float(cell)
        self.shape = shape
        self.periodic = periodic
        self.v = np.ascontiguousarray(values, np.float32)
        # row weights of the last few tile rows: tiles are rendered row by row, so all tiles of a
        # row share them (read and written by several threads; entries are immutable, races benign)
        self._row_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _wrap(self, idx: np.ndarray, axis: int) -> np.ndarray:
        n = self.v.shape[axis]
        return idx % n if self.periodic else np.minimum(np.maximum(idx, 0), n - 1)

    def _taps(self, p: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        g = np.minimum(np.maximum(p, 0.0), limit - 1.0)
        g *= 1.0 / self.cell
        g += 0.5 / self.cell - 0.5
        i = np.floor(g)
        t = g - i
        powers = t[:, None] ** _POWERS
        return i.astype(np.intp) - 1, powers @ _CATMULL_ROM  # grid index of the first of 4 taps

    def _matrix(self, p: np.ndarray, limit: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
        i, w = self._taps(p, limit)
        lo = int(i.min())
        span = int(i.max()) - lo + 4
        mat = np.zeros((len(p), span), np.float32)
        mat[np.arange(len(p))[:, None], (i - lo)[:, None] + np.arange(4)] = w
        return self._wrap(np.arange(lo, lo + span), axis), mat

    def sample(self, ys: np.ndarray, xs: np.ndarray, row_key: int | None = None) -> np.ndarray:
        """Values on the outer product of pixel rows ``ys`` and columns ``xs`` (float32).

        ``row_key`` (a tile's first row) lets the tiles of one row reuse the row weights.
        """
        cached = None if row_key is None else self._row_cache.get(row_key)
        if cached is None:
            cached = self._matrix(ys, self.shape[0], 0)
            if row_key is not None:
                if len(self._row_cache) >= 8:
                    self._row_cache.clear()
                self._row_cache[row_key] = cached
        ry, my = cached
        rx, mx = self._matrix(xs, self.shape[1], 1)
        return _matmul(my @ self.v[np.ix_(ry, rx)], mx.T)

    def points(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Values at the points (ys[i], xs[i]) (float64)."""
        iy, wy = self._taps(np.asarray(ys, np.float64), self.shape[0])
        ix, wx = self._taps(np.asarray(xs, np.float64), self.shape[1])
        r = np.arange(4)
        vals = self.v[self._wrap(iy[:, None] + r, 0)[:, :, None], self._wrap(ix[:, None] + r, 1)[:, None, :]]
        return np.einsum("ni,nij,nj->n", wy, vals, wx)


class _Field:
    """A weighted sum of grids plus an offset, in units where 1 is about one pixel of displacement."""

    def __init__(self, terms: list[tuple[float, _Grid]], offset: float = 0.0):
        self.terms = terms
        self.offset = float(offset)

    def sample(self, ys: np.ndarray, xs: np.ndarray, row_key: int | None = None) -> np.ndarray:
        out = None
        for c, g in self.terms:
            v = g.sample(ys, xs, row_key)
            v *= np.float32(c)
            out = v if out is None else out + v
        assert out is not None
        if self.offset:
            out += np.float32(self.offset)
        return out

    def points(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return sum(c * g.points(ys, xs) for c, g in self.terms) + self.offset


class _Texture:
    """A periodic 2-D pattern, padded so that any tile's window is one contiguous slice."""

    def __init__(self, pattern: np.ndarray):
        self.period = pattern.shape[0]
        self.data = np.pad(pattern, ((0, TILE), (0, TILE)), mode="wrap")

    def window(self, y0: int, x0: int) -> np.ndarray:
        oy, ox = y0 % self.period, x0 % self.period
        return self.data[oy:oy + TILE, ox:ox + TILE]


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b, cut into row blocks small enough that OpenBLAS stays on the calling thread.

    Tile-sized products (256x12 @ 12x256) are just over OpenBLAS's threading threshold; threading them
    from several render workers on a busy machine made each 100x slower. Large products (ground-truth
    strips, computed once) are left whole, where threads pay off.
    """
    m, k = a.shape
    n = b.shape[1]
    if m * n * k < 200_000 or m * n * k > 20_000_000:
        return a @ b
    step = max(1, 200_000 // (n * k))
    out = np.empty((m, n), np.result_type(a, b))
    for s in range(0, m, step):
        np.matmul(a[s:s + step], b, out=out[s:s + step])
    return out


def _blocks(gy: np.ndarray, gx: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Evaluate a boolean field on the grid gy x gx in 256 x 256 blocks, so the interpolation
    matrices stay small whatever the slide size (a whole row of a 60k slide would need ~20 MB)."""
    out = np.zeros((len(gy), len(gx)), np.uint8)
    for r in range(0, len(gy), 256):
        for c in range(0, len(gx), 256):
            out[r:r + 256, c:c + 256] = fn(gy[r:r + 256], gx[c:c + 256])
    return out


def _window_max(a: np.ndarray, r: int, mode: str = "edge") -> np.ndarray:
    """Maximum over the (2r+1)^2 neighbourhood (np.pad ``mode`` past the edges), separably."""
    h, w = a.shape
    padded = np.pad(a, ((r, r), (0, 0)), mode=mode)
    out = a.copy()
    for d in range(2 * r + 1):
        np.maximum(out, padded[d:d + h], out=out)
    padded = np.pad(out, ((0, 0), (r, r)), mode=mode)
    for d in range(2 * r + 1):
        np.maximum(out, padded[:, d:d + w], out=out)
    return out


class _Cull:
    """Which coarse cells of a grid could interpolate to a value >= ``lower``: a per-tile shortcut.

    Catmull-Rom output exceeds the largest of its 4x4 taps by at most 0.14x their range (its
    negative lobes sum to about -0.13), so testing max + 0.15 * (max - min) over a 5x5 window, then
    growing by one cell, never misses a pixel where the value could reach ``lower``.
    """

    def __init__(self, grid: _Grid, lower: float):
        mode = "wrap" if grid.periodic else "edge"
        hi = _window_max(grid.v, 2, mode)
        span = _window_max(-grid.v, 2, mode)  # -min
        span += hi  # max - min
        span *= 0.15
        span += hi
        self.ok = _window_max(span >= lower, 1, mode)
        self.grid = grid

    def any_near(self, y0: float, y1: float, x0: float, x1: float) -> bool:
        """Whether rows [y0, y1) x columns [x0, x1) (level-0 px) may reach the level."""
        g = self.grid
        H, W = g.shape
        iy0, iy1 = (int(np.floor((min(max(v, 0), H - 1) + 0.5) / g.cell - 0.5)) for v in (y0, y1))
        ix0, ix1 = (int(np.floor((min(max(v, 0), W - 1) + 0.5) / g.cell - 0.5)) for v in (x0, x1))
        rows = g._wrap(np.arange(iy0 - 1, iy1 + 3), 0)
        cols = g._wrap(np.arange(ix0 - 1, ix1 + 3), 1)
        return bool(self.ok[np.ix_(rows, cols)].any())


PHYSICAL_PERIOD = 512  # cells: micrometre-scale noise repeats after 512 cells (>= 15 mm), never seen


def _physical_grid(rng: np.random.Generator, shape: tuple[int, int], cell: float, sigma: float,
                   offset: float = 0.0) -> _Grid:
    """Smooth noise at a scale fixed in micrometres, on a periodic grid of bounded size, so its
    memory does not grow with the slide."""
    gh, gw = (min(n, PHYSICAL_PERIOD) for n in _grid_shape(shape, cell))
    return _Grid(_smooth_noise(rng, (gh, gw), sigma, periodic=True) + offset, cell, shape, periodic=True)


def _bump_axes(shape: tuple[int, int], sigmas: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Cell size and cell-centre coordinates of a grid fine enough for the narrowest of ``sigmas`` (three
    cells per sigma) and at most ~1024 cells a side."""
    tcell = max(float(sigmas.min()) / 3.0, max(shape) / 1024)
    gh, gw = _grid_shape(shape, tcell)
    return tcell, (np.arange(gh) + 0.5) * tcell - 0.5, (np.arange(gw) + 0.5) * tcell - 0.5


def _grid_shape(shape: tuple[int, int], cell: float) -> tuple[int, int]:
    return max(1, math.ceil(shape[0] / cell)), max(1, math.ceil(shape[1] / cell))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float,
                  periodic: bool = False) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (sigma in grid cells).

    ``periodic`` keeps the FFT's wrap-around, so the result tiles seamlessly; otherwise opposite
    edges are kept independent.
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


def _sections(rng: np.random.Generator, shape: tuple[int, int], cell: float, k: int) -> np.ndarray:
    """Max of k elliptical potentials (1 at a centre, 0 on the rim) laid out along the long axis."""
    H, W = shape
    gh, gw = _grid_shape(shape, cell)
    gy = (np.arange(gh) + 0.5) * cell
    gx = (np.arange(gw) + 0.5) * cell
    long_is_x = W >= H
    length, short = (W, H) if long_is_x else (H, W)
    band = length / k
    pot = np.full((gh, gw), -1.0)
    for j in range(k):
        c_long = band * (j + 0.5) + rng.uniform(-0.06, 0.06) * band
        c_short = short * (0.5 + rng.uniform(-0.08, 0.08))
        a = 0.42 * min(band, 1.6 * short) * rng.uniform(0.75, 1.0)  # along the long axis
        b = 0.40 * short * rng.uniform(0.65, 1.0)
        ang = rng.uniform(-0.35, 0.35)
        cy, cx = (c_short, c_long) if long_is_x else (c_long, c_short)
        dy = gy[:, None] - cy
        dx = gx[None, :] - cx
        if long_is_x:
            u, v = dx * np.cos(ang) + dy * np.sin(ang), -dx * np.sin(ang) + dy * np.cos(ang)
        else:
            u, v = dy * np.cos(ang) + dx * np.sin(ang), -dy * np.sin(ang) + dx * np.cos(ang)
        pot = np.maximum(pot, 1.0 - np.sqrt((u / a) ** 2 + (v / b) ** 2))
    return pot


# ------------------------------------------------------------------------------- appearance banks


def _fibres(rng: np.random.Generator, period: int, angle: float, um: float) -> np.ndarray:
    """Periodic stromal texture: wavy collagen fibres along ``angle``, with clefts. Values ~0.2-1."""
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


def _grain(rng: np.random.Generator, period: int, um: float) -> np.ndarray:
    """Periodic fine isotropic texture, zero-mean, for cytoplasm granularity and breaking repeats."""
    f2 = np.fft.fftfreq(period)[:, None] ** 2 + np.fft.rfftfreq(period)[None, :] ** 2
    filt = np.exp(-2 * np.pi**2 * f2 * (0.8 * um) ** 2)
    white = rng.standard_normal((period, period), dtype=np.float32)
    n = np.fft.irfft2(np.fft.rfft2(white) * filt.astype(np.float32), s=(period, period))
    return (n / n.std()).astype(np.float32)


def _stain_lut(rng: np.random.Generator) -> np.ndarray:
    """(65536, 3) uint8 colour for (eosin level, haematoxylin level), Beer-Lambert, per-slide stain.

    Eosin level 200 gives stroma about RGB (230, 150, 190), haematoxylin level 255 over glass about
    (80, 60, 150); each slide's stain strengths vary by +-15 % like real batches.
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


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


TONED_SIZE = 0.62  # tumour nuclei at contrast 0: this linear size (about a normal nucleus's area) ...
TONED_DARK = 0.8  # ... and this share of their haematoxylin density
MUCIN_EOSIN = 0.12  # mucin's eosin (stroma ~0.5, solid tumour's cytoplasm 0.42): pale
MUCIN_WASH = 14.0  # its faint haematoxylin tint (solid tumour 38): bluish-grey, not purple
MUCIN_CELLS = 0.15  # tumour nuclei in mucin, as a share of the solid pattern's
AGGREGATE_WASH = 12.0  # lymphoid aggregates' faint haematoxylin tint between the nuclei


class _NucleusPop:
    """One population of nuclei on a global jittered grid of square cells.

    A cell holds at most one nucleus; its window (sprite) fits in ``2 * radius + 1`` px and the cell
    is that wide, so nuclei of cells with the same (row, column) parity never share a pixel: drawing
    them in four parity passes with a gather-max-scatter is exact without ``np.maximum.at``.
    """

    def __init__(self, kind: str, radius: int, bank: np.ndarray, pop: int, p_max: float, n_orient: int = 0):
        self.kind = kind
        self.p_max = p_max  # the highest chance that a cell holds a nucleus
        self.radius = radius
        self.win = 2 * radius + 1
        self.cell = self.win
        self.bank = bank.reshape(len(bank), -1)
        self.n_sprites = len(bank)
        self.pop = np.uint64(pop)
        self.n_orient = n_orient
        self.reach = 2 * radius + self.cell  # how far outside a tile a drawn pixel's cell may start

    @classmethod
    def normal(cls, rng: np.random.Generator, um: float, pop: int) -> _NucleusPop:
        """Spindle fibroblast nuclei in 16 orientation bins (4 variants each), then 16 lymphocytes."""
        r = max(4, round(5 * um))
        sprites = []
        n_orient = 16
        for b in range(n_orient):
            for _ in range(4):
                ang = (b + rng.uniform(-0.5, 0.5)) * np.pi / n_orient
                sprites.append(_sprite(rng, r, rng.uniform(0.72, 0.85) * r, rng.uniform(1.0, 1.5) * um, ang,
                                       rng.uniform(0.55, 0.8), lobes=0.05, grain=0.15, rim=0.0, nucleoli=0))
        for _ in range(16):
            rad = rng.uniform(1.6, 2.1) * um
            sprites.append(_sprite(rng, r, rad, rad * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi),
                                   rng.uniform(0.8, 0.95), lobes=0.04, grain=0.1, rim=0.0, nucleoli=0))
        return cls("normal", r, np.stack(sprites), pop, 0.28, n_orient)

    @classmethod
    def lymphocyte(cls, rng: np.random.Generator, um: float, pop: int) -> _NucleusPop:
        """Small, round, dark lymphocyte nuclei on a tight grid (about 6 µm cells): packed aggregates."""
        r = max(3, round(2.5 * um))
        sprites = []
        for _ in range(16):
            rad = min(rng.uniform(1.7, 2.2) * um, r - 0.5)
            sprites.append(_sprite(rng, r, rad, rad * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi),
                                   rng.uniform(0.85, 1.0), lobes=0.04, grain=0.1, rim=0.0, nucleoli=0))
        return cls("lymph", r, np.stack(sprites), pop, 0.85)

    @classmethod
    def tumour(cls, rng: np.random.Generator, um: float, pop: int) -> _NucleusPop:
        """Large, pleomorphic, hyperchromatic or vesicular nuclei with nucleoli."""
        r = max(6, round(6 * um))
        sprites = []
        for _ in range(64):
            a = rng.uniform(0.5, 0.75) * r  # lobes reach at most 1.3 a < r
            sprites.append(_sprite(rng, r, a, a * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi),
                                   rng.uniform(0.75, 1.0), lobes=0.1, grain=0.3, rim=0.35,
                                   nucleoli=int(rng.integers(0, 3))))
        return cls("tumour", r, np.stack(sprites), pop, 0.8)

    def toned_down(self, contrast: float) -> _NucleusPop:
        """This population with its nuclei shrunk and paled towards normal ones as ``contrast`` falls
        from 1 to 0 (at 0: about the area and darkness of a normal nucleus). Same cells, same draws."""
        c = float(contrast)
        scale = TONED_SIZE + (1.0 - TONED_SIZE) * c  # linear size: 0.62^2 ~ normal area / tumour area
        dark = TONED_DARK + (1.0 - TONED_DARK) * c
        w, r = self.win, self.radius
        yy, xx = np.mgrid[0:w, 0:w].astype(np.float64)
        sy, sx = (yy - r) / scale + r, (xx - r) / scale + r  # where each output pixel reads the sprite
        y0, x0 = np.floor(sy).astype(np.intp), np.floor(sx).astype(np.intp)
        fy, fx = sy - y0, sx - x0
        sprites = self.bank.reshape(-1, w, w).astype(np.float64)
        padded = np.pad(sprites, ((0, 0), (1, 2), (1, 2)))  # zero outside: indices -1 ... w+1 allowed
        yi, xi = np.clip(y0, -1, w) + 1, np.clip(x0, -1, w) + 1

        def at(dy: int, dx: int) -> np.ndarray:
            return padded[:, yi + dy, xi + dx]

        out = ((1 - fy) * (1 - fx) * at(0, 0) + (1 - fy) * fx * at(0, 1)
               + fy * (1 - fx) * at(1, 0) + fy * fx * at(1, 1))
        bank = np.clip(np.rint(out * dark), 0, 255).astype(np.uint8)
        return _NucleusPop(self.kind, self.radius, bank, int(self.pop), self.p_max, self.n_orient)

    def candidates(self, key: np.uint64, y0: int, x0: int):
        """Cells whose nucleus could touch the tile at (y0, x0): indices, centres, 4 uniforms each."""
        c, r = self.cell, self.radius
        gy = np.arange((y0 - r) // c, (y0 + TILE - 1 + r) // c + 1, dtype=np.int64)
        gx = np.arange((x0 - r) // c, (x0 + TILE - 1 + r) // c + 1, dtype=np.int64)
        gy, gx = np.meshgrid(gy, gx, indexing="ij")
        gy, gx = gy.ravel(), gx.ravel()
        with np.errstate(over="ignore"):
            h = _splitmix(key ^ _splitmix(gy.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                                          + gx.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
                                          + self.pop))
            u = np.empty((len(h), 4))
            for j in range(4):
                h = _splitmix(h + np.uint64(0x632BE59BD9B4E019))
                u[:, j] = (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
        cy = gy * c + (u[:, 1] * c).astype(np.int64)
        cx = gx * c + (u[:, 2] * c).astype(np.int64)
        return gy, gx, cy, cx, u

    def choose(self, u: np.ndarray, w_a: np.ndarray, ang_a: float, ang_b: float) -> np.ndarray:
        """Spindle nuclei follow the local fibre direction; one in five is a round lymphocyte."""
        frac = (u[:, 3] * 5.0) % 1.0  # a second uniform from the same draw
        ang = np.where(frac < w_a, ang_a, ang_b) % np.pi
        b = (np.rint(ang / np.pi * self.n_orient).astype(np.intp) % self.n_orient)
        variant = (u[:, 3] * 4 * 5).astype(np.intp) % 4
        spindle = b * 4 + variant
        lymph = self.n_orient * 4 + (u[:, 3] * 16 * 25).astype(np.intp) % 16
        return np.where(u[:, 3] < 0.2, lymph, spindle)

    def draw(self, canvas: np.ndarray, stride: int, oy: int, ox: int, gy: np.ndarray, gx: np.ndarray,
             cy: np.ndarray, cx: np.ndarray, sprite: np.ndarray) -> None:
        w, r = self.win, self.radius
        offs = (np.arange(w)[:, None] * stride + np.arange(w)[None, :]).ravel()
        base = (cy - r - oy) * stride + (cx - r - ox)
        parity = (gy & 1) * 2 + (gx & 1)
        for p in range(4):
            sel = parity == p
            if not sel.any():
                continue
            idx = base[sel][:, None] + offs[None, :]
            canvas[idx] = np.maximum(canvas[idx], self.bank[sprite[sel]])


def _sprite(rng: np.random.Generator, r: int, a: float, b: float, angle: float, dark: float, *,
            lobes: float, grain: float, rim: float, nucleoli: int) -> np.ndarray:
    """One nucleus as haematoxylin density (uint8) in a (2r+1)^2 window: an irregular ellipse with
    chromatin texture, an optional darker rim (vesicular nuclei) and nucleoli, slightly blurred."""
    n = 2 * r + 1
    yy, xx = np.mgrid[0:n, 0:n] - float(r)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    phi = np.arctan2(v, u)
    wobble = 1.0 + sum(rng.uniform(0, lobes) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    q = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble
    inside = np.clip((1.0 - q) * min(a, b) + 0.5, 0.0, 1.0)
    tex = 1.0 - grain + grain * rng.uniform(0.0, 1.0, (n, n))
    d = inside * tex * (1.0 - rim + rim * np.clip((q - 0.55) / 0.35, 0.0, 1.0))
    for _ in range(nucleoli):
        ny, nx = rng.uniform(-0.4, 0.4, 2) * min(a, b)
        d = np.maximum(d, np.clip(1.6 - np.hypot(yy - ny, xx - nx), 0.0, 1.0) * inside)
    d = np.pad(d, 1)
    d = 0.25 * d[:-2] + 0.5 * d[1:-1] + 0.25 * d[2:]  # [1 2 1]/4 blur: a scan is never razor-sharp
    d = 0.25 * d[:, :-2] + 0.5 * d[:, 1:-1] + 0.25 * d[:, 2:]
    d[[0, -1], :] = 0
    d[:, [0, -1]] = 0
    return np.clip(np.rint(d * dark * 255), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ misc


def _check_share(share: float, what: str = "mucinous share", top: float = 1.0) -> float:
    try:
        value = float(share)
    except (TypeError, ValueError):
        raise WsimilError(f"the {what} must be a number between 0 and {top:g}, got {share!r}") from None
    if not (0.0 <= value <= top):
        raise WsimilError(f"the {what} must be between 0 and {top:g}, got {share!r}")
    return value


def _check_contrast(contrast: float) -> float:
    try:
        value = float(contrast)
    except (TypeError, ValueError):
        raise WsimilError(f"tumour contrast must be a number between 0 and 1, got {contrast!r}") from None
    if not (0.0 <= value <= 1.0):
        raise WsimilError(f"tumour contrast must be between 0 and 1, got {contrast!r}")
    return value


def _parse_size(size: Size) -> tuple[int, int]:
    try:
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            shape = (int(size), int(size))
        else:
            h, w = size  # type: ignore[misc]
            shape = (int(h), int(w))
    except (TypeError, ValueError):
        raise WsimilError(f"slide size must be a number of pixels or (height, width), got {size!r}") from None
    if min(shape) < TILE:
        raise WsimilError(f"slide size must be at least {TILE} pixels a side, got {shape[0]} x {shape[1]}")
    if max(shape) > 2**20:
        raise WsimilError(f"slide size {shape[0]} x {shape[1]} is larger than this generator supports (2^20)")
    return shape


def _check_mpp(mpp: float) -> float:
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise WsimilError(f"pixel size (µm per pixel) must be a number, got {mpp!r}") from None
    if not (0.05 <= value <= 10.0):
        raise WsimilError(f"pixel size must be between 0.05 and 10 µm per pixel, got {mpp!r}")
    return value


def _pyramid_ok(path: Path, shape: tuple[int, int] | None = None) -> bool:
    """Whether a cached file is complete: it opens, has the expected size, and its last tiles decode."""
    if not path.is_file():
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            pages = list(tf.pages)
            if not pages or (shape is not None and tuple(pages[0].shape[:2]) != shape):
                return False
            end = max(o + c for p in pages for o, c in zip(p.dataoffsets, p.databytecounts))
            if end > path.stat().st_size:
                return False
            pages[-1].asarray()
        return True
    except Exception:  # any failure to read means "regenerate"; the reason does not matter here
        return False


class _file_lock:
    """Exclusive advisory lock on a file (POSIX); elsewhere a no-op, atomic renames still keep files whole."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = None

    def __enter__(self) -> _file_lock:
        try:
            import fcntl
        except ImportError:
            return self
        self.fh = open(self.path, "a+")
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            import fcntl

            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
