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

Modules, each importing only those listed before it:

- ``params``: the tile size and the checks of user input; ``noise``: seeded smooth noise, stromal textures and
  the cell hash; ``stain``: the stain table and H&E colour deconvolution; ``fields``: grids and fields;
  ``truth``: where the ground truth goes and at which downsample; ``nuclei``: nucleus sprites and populations;
  ``layout``: where sections, tumour, mucin and aggregates are.
- ``model``: ``SlideModel``, the procedural slide.
- ``texture_folders``, ``texture_pools``, ``textured``: slides whose tissue is real labelled tiles
  (``wsimil synth --textures``).
- ``cohort``: ``synthesize_slide`` and ``synthesize_cohort``; ``sample_cache``: the cached sample's helpers.

This package's namespace re-exports the public API, and holds the cached sample slide (``sample_slide_path``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from napari_wsimil.errors import WsimilError
from napari_wsimil.slide.synthetic.cohort import synthesize_cohort, synthesize_slide
from napari_wsimil.slide.synthetic.fields import PHYSICAL_PERIOD
from napari_wsimil.slide.synthetic.model import (
    AGGREGATE_WASH,
    MUCIN_CELLS,
    MUCIN_EOSIN,
    MUCIN_WASH,
    SlideModel,
)
from napari_wsimil.slide.synthetic.nuclei import TONED_DARK, TONED_SIZE
from napari_wsimil.slide.synthetic.params import TILE, Progress, Size
from napari_wsimil.slide.synthetic.sample_cache import file_lock, pyramid_ok
from napari_wsimil.slide.synthetic.texture_folders import (
    COHORT_SPLITS,
    HELD_OUT,
    TRAIN,
    VAL,
    TextureClass,
    TextureLayout,
    cohort_splits,
    scan_textures,
    tile_split_for,
)
from napari_wsimil.slide.synthetic.texture_pools import Pool, Pools, TextureSet, open_textures, write_manifest
from napari_wsimil.slide.synthetic.textured import TEXTURES_VERSION, TexturedSlide
from napari_wsimil.slide.synthetic.truth import GT_MAX_SIDE, SlideTruth, gt_downsample_for, gt_path_for

__all__ = [
    "AGGREGATE_WASH", "COHORT_SPLITS", "GT_MAX_SIDE", "HELD_OUT", "MUCIN_CELLS", "MUCIN_EOSIN",
    "MUCIN_WASH", "PHYSICAL_PERIOD", "SAMPLE_SEED", "SAMPLE_SIZE", "SAMPLE_VERSION", "TEXTURES_VERSION",
    "TILE", "TONED_DARK", "TONED_SIZE", "TRAIN", "VAL", "Pool", "Pools", "Progress", "Size", "SlideModel",
    "SlideTruth", "TextureClass", "TextureLayout", "TextureSet", "TexturedSlide", "cohort_splits",
    "gt_downsample_for", "gt_path_for", "open_textures", "sample_slide_path", "scan_textures",
    "synthesize_cohort", "synthesize_slide", "tile_split_for", "write_manifest",
]

log = logging.getLogger(__name__)

# The cached sample slide is defined here rather than in a module of its own: ``sample_slide_path`` reads
# ``SAMPLE_SIZE`` from this namespace when called, so setting ``napari_wsimil.slide.synthetic.SAMPLE_SIZE``
# (as the tests do, for a small sample) takes effect.
SAMPLE_SIZE = 8192
SAMPLE_SEED = 20240607
#: Bumped when the renderer changes, so that cached samples are regenerated (benchmarks key caches by it).
SAMPLE_VERSION = 2


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
    path = base / f"sample-v{SAMPLE_VERSION}-{SAMPLE_SIZE}.tiff"
    with file_lock(base / ".sample.lock"):
        if not (pyramid_ok(path, (SAMPLE_SIZE, SAMPLE_SIZE)) and pyramid_ok(gt_path_for(path))):
            log.info("generating the sample slide %s", path)
            synthesize_slide(path, SAMPLE_SIZE, SAMPLE_SEED, malignant=True)
    return path
