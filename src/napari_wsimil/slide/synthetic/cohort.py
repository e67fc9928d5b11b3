"""Writing synthetic slides and cohorts: the pyramidal slide, its ground-truth mask and ``cohort.csv``.

What the CLI's ``wsimil synth`` and the demo call. A slide is drawn by ``model.SlideModel`` (procedural) or
``textured.TexturedSlide`` (real tiles in the same layout) and streamed tile by tile by
``tiff_writer.write_pyramid``, so memory does not depend on slide size.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

import numpy as np

from napari_wsimil.errors import WsimilError
from napari_wsimil.slide.synthetic.model import SlideModel
from napari_wsimil.slide.synthetic.params import (
    Progress,
    Size,
    check_contrast,
    check_mpp,
    check_share,
    check_tumour_share,
    parse_size,
)
from napari_wsimil.slide.synthetic.texture_folders import cohort_splits, tile_split_for
from napari_wsimil.slide.synthetic.texture_pools import Pools, open_textures, write_manifest
from napari_wsimil.slide.synthetic.textured import TexturedSlide
from napari_wsimil.slide.synthetic.truth import SlideTruth, gt_path_for

log = logging.getLogger(__name__)


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
    tumour_share: tuple[float, float] | None = None,
) -> SlideTruth:
    """Write one synthetic slide (pyramidal JPEG TIFF) and its ground-truth mask.

    ``size`` is an int (square) or (height, width) in level-0 pixels. ``progress(done, total)``
    counts written tiles. ``tumour_contrast`` in [0, 1] makes tumour harder to tell from normal
    tissue below 1; ``mucinous_share`` in [0, 1] draws that share of the tumour in the mucinous pattern;
    ``aggregate_share`` in [0, 1) covers that share of the tissue with lymphoid aggregates (see the
    package docstring). ``textures`` (pools from ``texture_pools.open_textures``) fills the tissue with real
    tiles instead of drawing it, with the same layout and ground truth (see ``textured``). The same
    arguments always give byte-identical files.
    """
    from napari_wsimil.slide.tiff_writer import write_image_pyramid, write_pyramid

    shape = parse_size(size)
    mpp = check_mpp(mpp)
    path = Path(path)
    gt_path = gt_path_for(path) if gt_path is None else Path(gt_path)
    model = SlideModel(shape, seed, malignant, mpp, tumour_contrast=tumour_contrast,
                       mucinous_share=mucinous_share, aggregate_share=aggregate_share, tumour_share=tumour_share)
    render_tile = model.render_tile
    what = "napari-wsimil synthetic slide"
    if textures is not None:
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
    tumour_share: tuple[float, float] | None = None,
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
    ``tumour_share`` (low, high; default 0.005-0.08) is the range each malignant slide's tumour share of its
    tissue is drawn from (log-uniform); it changes the layout only, so it goes with textures too.

    ``textures`` (a folder of labelled tiles, one folder per class) fills the tissue with real H&E: tumour
    with the tumour class (``tumour_class``, else the folder whose name contains "tum"), normal tissue with the
    others, resampled from ``tile_mpp`` (else the images' resolution tags). Such a cohort has a ``split`` column,
    stratified by label (``split``: "all", the default, 55 / 15 / 30 % train / val / test; "train": train and
    val only; "test": test only); train slides are drawn from training tiles, val and test slides from their
    own parts of the held-out tiles (a quarter, and the rest; a set with fewer than 8 held-out tiles per class
    keeps them all for test, and its val slides share the training tiles). Its CSV adds ``split``,
    ``textures`` (the source folder) and ``texture_tiles`` (``train``, ``val`` or ``held-out``);
    ``textures.json`` beside it lists the tile files of each split. Every problem with the folder is reported
    before anything is written; see ``textured``.
    """
    if isinstance(n_slides, bool) or not isinstance(n_slides, (int, np.integer)) or n_slides < 1:
        raise WsimilError(f"the number of slides must be a whole number of at least 1, got {n_slides!r}")
    if not (0.0 <= float(malignant_fraction) <= 1.0):
        raise WsimilError(f"the malignant fraction must be between 0 and 1, got {malignant_fraction!r}")
    shape = parse_size(size)
    mpp = check_mpp(mpp)
    tumour_contrast = check_contrast(tumour_contrast)
    mucinous_share = check_share(mucinous_share)
    aggregate_share = check_share(aggregate_share, "lymphoid aggregates' share", top=0.5)
    check_tumour_share(tumour_share)
    n = int(n_slides)
    n_malignant = int(math.floor(n * float(malignant_fraction) + 0.5))
    labels = np.zeros(n, np.int64)
    labels[:n_malignant] = 1
    np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0407])).shuffle(labels)

    tex = None
    if textures is not None:  # everything about the textures is checked before anything is written
        if tumour_contrast != 1.0 or mucinous_share or aggregate_share:
            raise WsimilError("textures fill the tissue with real tiles: they cannot be combined with tumour "
                              "contrast, a mucinous share or lymphoid aggregates, which are procedural looks")
        splits = cohort_splits(labels, int(seed), "all" if split is None else split)
        tex = open_textures(textures, splits=[tile_split_for(s) for s in splits],
                               tumour_class=tumour_class, tile_mpp=tile_mpp, mpp=mpp)
        shared = [c.name for c in (tex.layout.tumour, *tex.layout.normal) if c.val_shared]
        if shared and "val" in splits:
            log.warning("validation slides share the training tiles of %s: too few held-out tiles to spare some "
                        "for validation, so validation cannot show a model that memorised its tiles",
                        ", ".join(shared))
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
        pools = None if tex is None else tex.pools[tile_split_for(splits[i])]
        truth = synthesize_slide(out / f"{slide_id}.tiff", shape, slide_seed, bool(labels[i]), mpp,
                                 workers=workers, tumour_contrast=tumour_contrast, mucinous_share=mucinous_share,
                                 aggregate_share=aggregate_share, textures=pools, tumour_share=tumour_share)
        log.info("%s: %s, tumour %.2f %% of tissue", slide_id, "malignant" if labels[i] else "benign",
                 100 * truth.tumour_fraction)
        row = [slide_id, truth.path.name, int(labels[i]), truth.gt_mask.name, truth.gt_downsample]
        if pools is not None:
            row += [splits[i], pools.source, pools.split]
        rows.append(row)
        if progress is not None:
            progress(i + 1, n)

    if tex is not None:
        write_manifest(out / "textures.json", tex, {r[0]: (r[5], r[7]) for r in rows})
    csv_path = out / "cohort.csv"
    tmp = csv_path.with_name(f"cohort.csv.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    return csv_path
