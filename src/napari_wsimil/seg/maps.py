"""Probability maps: computed fully convolutionally on large tiles, kept on disk, summarised for sampling.

A map is the malignant probability of every pixel at the working µm/px, stored as uint8 (p · 255) in a
chunked zarr array (``<maps>/<slide_id>.zarr``, the same durable store as the project's pixel labels), so
a map of a 100,000 px slide never sits in memory and napari can show it while it is being written.

Tiles are read with a margin of context on every side (the net's receptive field) and only their centre
is kept, so the tiled map equals the map of the whole image computed at once, up to batch-norm being in
eval mode. Tiles without tissue are skipped (left 0). Each map also yields a small
:class:`SamplingGrid`: per block of ``block`` map pixels, the sum over tissue pixels of Q^α and of Q,
which is what dynamic sampling needs, and all it keeps in memory per slide.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import SegSlide


@dataclass(frozen=True)
class SamplingGrid:
    """Block sums over one slide's map: ``weights`` Σ tissue·Q^α and ``q_sum`` Σ tissue·Q per block of
    ``block`` px at ``mpp``; ``version`` counts maps published, ``epoch`` the weights they came from
    (0: no map yet, the tissue-only default)."""

    weights: np.ndarray
    q_sum: np.ndarray
    tissue: np.ndarray  # tissue pixels per block
    block: int
    mpp: float
    epoch: int
    version: int = 0

    @property
    def total_q(self) -> float:
        return float(self.q_sum.sum())


def tissue_blocks(slide: SegSlide, mpp: float, block: int) -> np.ndarray:
    """Tissue pixel count per block (from the low-resolution tissue mask, pixel centres)."""
    from ..slide.mask_sampling import patch_samples

    h, w = slide.map_shape(mpp)
    gh, gw = -(-h // block), -(-w // block)
    d = slide.downsample(mpp)
    s = min(block, 16)  # 16x16 samples per block are plenty for a mask at ~8 µm/px
    ys, xs = np.meshgrid(np.arange(gh) * block * d, np.arange(gw) * block * d, indexing="ij")
    corners = np.column_stack([xs.ravel(), ys.ravel()])
    vals = patch_samples(corners, block * d, slide.tissue.mask, slide.tissue.downsample, s)
    return (vals.astype(bool).mean(1) * block * block).reshape(gh, gw)


def default_grid(slide: SegSlide, mpp: float, block: int, q_default: float = 0.5, alpha: float = 2.0
                 ) -> SamplingGrid:
    """Before a slide is mapped: a uniform Q (``q_default``) over its tissue."""
    t = tissue_blocks(slide, mpp, block)
    return SamplingGrid(t * q_default ** alpha, t * q_default, t, block, mpp, epoch=0, version=0)


def tissue_tile(slide: SegSlide, mpp: float, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """The tissue mask (bool, (h, w)) under the map tile at (``y0``, ``x0``): each map pixel takes the
    low-resolution mask pixel under its centre. Public because maps are not alone in keeping tissue pixels
    only: :func:`~.operating_point.benign_histogram` counts the benign tissue of each tile with it too."""
    d = slide.downsample(mpp)
    m = slide.tissue.mask
    rows = np.clip(((np.arange(y0, y0 + h) + 0.5) * d / slide.tissue.downsample).astype(np.int64), 0, m.shape[0] - 1)
    cols = np.clip(((np.arange(x0, x0 + w) + 0.5) * d / slide.tissue.downsample).astype(np.int64), 0, m.shape[1] - 1)
    return m[np.ix_(rows, cols)]


def iter_tiles(slide: SegSlide, mpp: float, tile: int) -> Iterator[tuple[int, int, int, int]]:
    """(y0, x0, h, w) of the map tiles that hold tissue, row by row."""
    h, w = slide.map_shape(mpp)
    t = tissue_blocks(slide, mpp, tile)
    for ty in range(t.shape[0]):
        for tx in range(t.shape[1]):
            if t[ty, tx] > 0:
                y0, x0 = ty * tile, tx * tile
                yield y0, x0, min(tile, h - y0), min(tile, w - x0)


def predict_tile(net: Any, slide: SegSlide, mpp: float, y0: int, x0: int, h: int, w: int, margin: int,
                 device: Any, multiple: int = 16) -> np.ndarray:
    """Malignant probability (h, w) float32 of one map tile, from a read with ``margin`` px of context
    (rounded up so the input is a multiple of ``multiple``, as the U-Net needs)."""
    import torch

    d = slide.downsample(mpp)
    H = -(-(h + 2 * margin) // multiple) * multiple
    W = -(-(w + 2 * margin) // multiple) * multiple
    rgb = slide.read((x0 - margin) * d, (y0 - margin) * d, (W, H), mpp)
    x = torch.from_numpy(np.array(rgb, copy=True)).to(device).permute(2, 0, 1)[None].float().div_(255)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = net(x)
        if isinstance(logits, tuple):  # two-decoder nets: the caller picks; default the last (student)
            logits = logits[-1]
        p = torch.softmax(logits.float(), 1)[0, 1, margin:margin + h, margin:margin + w]
    return p.cpu().numpy()


def open_map(path: Path, slide: SegSlide, mpp: float, attrs: dict | None = None, create: bool = True) -> Any:
    """The zarr map of ``slide`` at ``path`` (a :class:`~napari_wsimil.io.raster_store.LabelStore`)."""
    from ..io.raster_store import LabelStore, exists
    from ..project.pixel_labels import LabelGeometry

    if exists(path):
        store = LabelStore.open(path)
        if store.shape == slide.map_shape(mpp):
            return store
        import shutil

        shutil.rmtree(path)
    if not create:
        return None
    geometry = LabelGeometry(slide.downsample(mpp), float(mpp), slide.map_shape(mpp))
    return LabelStore.create(path, geometry, {"kind": "wsimil probability map", "value": "uint8 = p * 255",
                                              "slide_id": slide.slide_id, "mpp": float(mpp),
                                              "downsample": slide.downsample(mpp), **(attrs or {})})


def inference_net(net: Any) -> Any:
    """``net`` with batch norm folded into its convolutions when it is a torch module in eval mode (the
    same maps, ~15 % faster: see :func:`~.nets.fold_batch_norm`); anything else as it is."""
    from torch import nn

    from .nets import fold_batch_norm

    if isinstance(net, nn.Module) and not net.training:
        return fold_batch_norm(net)
    return net


def _block_sum(a: np.ndarray, block: int) -> np.ndarray:
    return a.reshape(a.shape[0] // block, block, a.shape[1] // block, block).sum((1, 3))


def _grid(net: Any) -> int:
    """Tiles must start and end on the U-Net's pooling grid (2^(depth-1) px) to match whole-image output."""
    depth = getattr(net, "depth", 4)
    return 2 ** (int(depth) - 1)


def compute_map(net: Any, slide: SegSlide, mpp: float, *, tile: int = 512, margin: int = 32, device: Any = "cpu",
                out: Path | None = None, block: int = 64, alpha: float = 2.0, epoch: int = 0,
                should_stop: Callable[[], bool] | None = None,
                on_tile: Callable[[int, int, np.ndarray], None] | None = None) -> SamplingGrid | None:
    """Map ``slide`` with ``net`` (in eval mode) tile by tile; write it to ``out`` (zarr) when given.

    ``tile`` must be a multiple of ``block``. Returns the slide's :class:`SamplingGrid`, or None when
    ``should_stop()`` turned true part-way (the map on disk is then part old, part new: still a map)."""
    if tile % block:
        raise ValueError(f"tile ({tile}) must be a multiple of block ({block})")
    net = inference_net(net)
    h, w = slide.map_shape(mpp)
    gh, gw = -(-h // block), -(-w // block)
    weights = np.zeros((gh, gw))
    q_sum = np.zeros((gh, gw))
    tis = np.zeros((gh, gw))
    store = open_map(out, slide, mpp) if out is not None else None
    for y0, x0, th, tw in iter_tiles(slide, mpp, tile):
        if should_stop is not None and should_stop():
            return None
        p = predict_tile(net, slide, mpp, y0, x0, th, tw, margin, device, multiple=_grid(net))
        t = tissue_tile(slide, mpp, y0, x0, th, tw)
        p = np.where(t, p, 0.0).astype(np.float32)
        if store is not None:
            store.array[y0:y0 + th, x0:x0 + tw] = np.round(p * 255).astype(np.uint8)
        if on_tile is not None:
            on_tile(y0, x0, p)
        by, bx = y0 // block, x0 // block
        pad_h, pad_w = -th % block, -tw % block
        q = np.pad(p, ((0, pad_h), (0, pad_w)))
        tt = np.pad(t, ((0, pad_h), (0, pad_w))).astype(np.float64)
        qa = np.where(tt > 0, np.power(q, alpha, dtype=np.float64) if alpha else 1.0, 0.0)
        nb_y, nb_x = q.shape[0] // block, q.shape[1] // block
        weights[by:by + nb_y, bx:bx + nb_x] = _block_sum(qa, block)
        q_sum[by:by + nb_y, bx:bx + nb_x] = _block_sum(q.astype(np.float64), block)
        tis[by:by + nb_y, bx:bx + nb_x] = _block_sum(tt, block)
    return SamplingGrid(weights, q_sum, tis, block, mpp, epoch=epoch, version=1)


@dataclass
class MapTiming:
    """What a mapping pass cost: megapixels of map written per second of wall time."""

    megapixels: float
    seconds: float

    @property
    def mpx_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else float("nan")


def timed_map(net: Any, slide: SegSlide, mpp: float, **kw: Any) -> tuple[SamplingGrid | None, MapTiming]:
    """:func:`compute_map` and its throughput (map pixels over tissue tiles, per second)."""
    t0 = time.perf_counter()
    n = [0]

    def count(_y: int, _x: int, p: np.ndarray) -> None:
        n[0] += p.size

    grid = compute_map(net, slide, mpp, on_tile=count, **kw)
    return grid, MapTiming(n[0] / 1e6, time.perf_counter() - t0)


__all__ = [
    "MapTiming",
    "SamplingGrid",
    "compute_map",
    "default_grid",
    "iter_tiles",
    "open_map",
    "predict_tile",
    "timed_map",
    "tissue_blocks",
    "tissue_tile",
]
