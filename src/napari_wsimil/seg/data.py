"""Slides as the segmentation trainers see them: tissue, slide label, painted pixels, patches at a µm/px.

A patch is ``size`` px at ``mpp`` µm/px centred on a level-0 point, so the same physical field of view is
read whatever scanner made the slide. Pixel labels come from the same places as MS-CLAM's tile labels (a
project's painted pixels, boxes and polygons; a cohort CSV's ``pixel_labels`` mask and ``annotations``),
read at every patch pixel's centre and mapped to 0 (benign) / 1 (malignant) / -1 (unknown) by class name.
Nothing is loaded whole: patches are read through the slide's tile cache, labels through chunked lookups.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError


class SegDataError(WsimilError):
    """A slide or its labels cannot be used for segmentation training."""


@dataclass(eq=False)
class SegSlide:
    """One slide: ``label`` 0 benign / 1 malignant (None: unlabelled, prediction only)."""

    slide_id: str
    path: Path
    label: int | None
    slide_mpp: float
    shape0: tuple[int, int]  # (h, w) level 0
    tissue: Any  # TissueMask
    labels: Any = None  # TileLabelSource with the painted pixels / annotations, or None
    id_to_class: Mapping[int, int] = field(default_factory=dict)
    exhaustive: bool = False
    _slide: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def annotated(self) -> bool:
        return self.labels is not None and not self.labels.empty

    def open(self) -> Any:
        """The slide, opened once and shared by the reader threads (its tile cache is thread-safe)."""
        with self._lock:
            if self._slide is None:
                from ..slide import open_slide

                self._slide = open_slide(self.path, mpp=self.slide_mpp)
            return self._slide

    def close(self) -> None:
        with self._lock:
            if self._slide is not None:
                self._slide.close()
                self._slide = None

    def downsample(self, mpp: float) -> float:
        """Level-0 px per px at ``mpp``."""
        return float(mpp) / self.slide_mpp

    def map_shape(self, mpp: float) -> tuple[int, int]:
        d = self.downsample(mpp)
        return int(np.ceil(self.shape0[0] / d - 1e-9)), int(np.ceil(self.shape0[1] / d - 1e-9))

    def read(self, x0: float, y0: float, size: int | tuple[int, int], mpp: float) -> np.ndarray:
        """RGB (h, w, 3) uint8 with top-left at level-0 (x0, y0); outside the slide is white glass."""
        w, h = (size, size) if isinstance(size, int) else size
        return self.open().read_region((x0, y0), (int(w), int(h)), mpp=mpp)

    def tissue_at(self, x0: float, y0: float, size: int, mpp: float) -> np.ndarray:
        """(size, size) bool: tissue under each pixel centre of the patch."""
        from ..slide.mask_sampling import patch_samples

        d = self.downsample(mpp)
        vals = patch_samples(np.array([[x0, y0]]), size * d, self.tissue.mask, self.tissue.downsample, size)
        return vals.reshape(size, size).astype(bool)

    def pixel_labels_at(self, x0: float, y0: float, size: int, mpp: float, benign_fill: bool = True) -> np.ndarray:
        """(size, size) int8 of 0/1 where something painted or drawn says so, -1 elsewhere.

        Benign slides need no paint: every tissue pixel of a benign slide is benign."""
        return self._labels(np.array([[x0, y0]]), size, mpp, benign_fill)[0].reshape(size, size)

    def centre_labels(self, points: np.ndarray, mpp: float, benign_fill: bool = True) -> np.ndarray:
        """(N,) int8: :meth:`pixel_labels_at` of a 1-pixel patch at each level-0 (x, y) in ``points`` (the
        class under each point, -1 where nothing says), in a few reads of the masks instead of one per point
        (4096 points of :meth:`labelled_points` cost 1.5 s of CPU one by one, in every site process)."""
        return self._labels(np.asarray(points, dtype=np.float64).reshape(-1, 2), 1, mpp, benign_fill)[:, 0]

    def _labels(self, corners: np.ndarray, size: int, mpp: float, benign_fill: bool) -> np.ndarray:
        """(N, size²) int8: the labels of the size × size patches whose level-0 corners are ``corners`` (0/1
        where paint, drawings or a benign slide's tissue say so, -1 elsewhere), all read in one pass."""
        from ..slide.mask_sampling import patch_samples
        from ..train.tile_labels import annotation_samples

        out = np.full((len(corners), size * size), -1, np.int8)
        if not len(corners):
            return out
        size0 = size * self.downsample(mpp)
        if self.label == 0 and benign_fill:
            out[patch_samples(corners, size0, self.tissue.mask, self.tissue.downsample, size).astype(bool)] = 0
        if not self.annotated:
            return out
        vals = np.zeros(out.shape, np.uint8)
        if self.labels.lookup is not None:
            vals = patch_samples(corners, size0, self.labels.lookup, float(self.labels.downsample or 1.0),
                                 size).astype(np.uint8)
        if self.labels.annotations:
            ann = annotation_samples(corners, size0, self.labels.annotations, self.labels.class_ids or {}, size)
            vals = np.where(ann > 0, ann, vals)
        lut = np.full(256, -1, np.int8)  # mask class id -> 0/1, -1 for ids that say neither (0 too unless exhaustive)
        for cid, cls in self.id_to_class.items():
            lut[int(cid)] = int(cls)
        if self.exhaustive:
            lut[0] = 0
        mapped = lut[vals]
        return np.where(mapped >= 0, mapped, out).astype(np.int8)

    def labelled_points(self, mpp: float, max_points: int = 4096,
                        rng: np.random.Generator | None = None) -> np.ndarray:
        """Level-0 (x, y) of up to ``max_points`` painted label pixels whose class maps to 0/1: where
        patches with strong labels are centred. Read chunk by chunk from the label store's saved chunks."""
        if not self.annotated:
            return np.zeros((0, 2))
        rng = rng or np.random.default_rng(0)
        pts = []
        if self.labels.lookup is not None:
            pts.append(_painted_points(self.labels.lookup, float(self.labels.downsample or 1.0),
                                       set(self.id_to_class), max_points, rng))
        for ann in self.labels.annotations or ():
            cid = (self.labels.class_ids or {}).get(ann.class_name)
            if cid is None or cid not in self.id_to_class:
                continue
            import shapely

            x0, y0, x1, y1 = ann.geometry.bounds
            cand = np.column_stack([rng.uniform(x0, x1, 256), rng.uniform(y0, y1, 256)])
            pts.append(cand[shapely.contains_xy(ann.geometry, cand[:, 0], cand[:, 1])])
        allp = np.concatenate(pts) if pts else np.zeros((0, 2))
        if len(allp) > max_points:
            allp = allp[rng.choice(len(allp), max_points, replace=False)]
        return allp


def _painted_points(lookup: Callable[..., np.ndarray] | np.ndarray, downsample: float, ids: set[int],
                    max_points: int, rng: np.random.Generator) -> np.ndarray:
    """Level-0 centres of painted label pixels with a class in ``ids``, read in 512-row bands."""
    from ..slide.mask_sampling import lookup_shape

    shape = lookup.shape if isinstance(lookup, np.ndarray) else lookup_shape(lookup)
    if shape is None:
        return np.zeros((0, 2))
    h, w = shape
    found = []
    idx = np.fromiter(ids, np.int64) if ids else np.zeros(0, np.int64)
    for y0 in range(0, h, 512):
        rows = np.arange(y0, min(h, y0 + 512))
        band = lookup[np.ix_(rows, np.arange(w))] if isinstance(lookup, np.ndarray) else lookup(rows, np.arange(w))
        r, c = np.nonzero(np.isin(band, idx))
        if len(r):
            found.append(np.column_stack([(c + 0.5) * downsample, (rows[r] + 0.5) * downsample]))
    if not found:
        return np.zeros((0, 2))
    pts = np.concatenate(found)
    if len(pts) > max_points:
        pts = pts[rng.choice(len(pts), max_points, replace=False)]
    return pts


def open_seg_slides(cohort: Any, items: Sequence[Any], classes: Sequence[str], *, mapping: str | None = None,
                    exhaustive: bool = False, with_labels: bool = True,
                    report: Callable[[str], None] | None = None,
                    tissue_cache: Path | None = None) -> list[SegSlide]:
    """:class:`SegSlide` records for cohort ``items``: tissue masks, slide labels and painted pixels.

    Segmentation is benign (class index 0) against malignant (1); ``classes`` must have two entries.
    Errors name the slide: no pixel size, no tissue, unreadable masks. With ``tissue_cache`` (a folder),
    the tissue masks are kept there and read back next time (:mod:`~napari_wsimil.slide.tissue_cache`:
    a federated site opens its slides again for every message)."""
    from ..slide import open_slide
    from ..slide.tissue import tissue_mask
    from ..train.cohort_labels import DrawingSources

    say = report or (lambda _m: None)
    if len(classes) != 2:
        raise SegDataError(f"pixel segmentation separates benign from malignant: it needs exactly two slide "
                           f"classes, got {', '.join(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    sources = DrawingSources(cohort, items, classes, mapping)
    out = []
    try:
        for s in items:
            mpp = sources.slide_mpp(s)
            try:
                with open_slide(s.path, mpp=mpp) as sl:
                    if sl.mpp is None:
                        raise SegDataError(f"{s.slide_id}: the slide does not record its pixel size (µm/px); set "
                                           "it in the project, or give it in the cohort CSV's mpp column")
                    if tissue_cache is not None:
                        from ..slide.tissue_cache import cached_tissue_mask

                        tissue = cached_tissue_mask(sl, s.path, tissue_cache)
                    else:
                        tissue = tissue_mask(sl)
                    slide_mpp, shape0 = float(sl.mpp), tuple(sl.level_shapes[0])
            except SegDataError:
                raise
            except WsimilError as exc:
                raise SegDataError(f"{s.slide_id}: {exc}") from exc
            if not tissue.mask.any():
                raise SegDataError(f"no tissue found on {s.slide_id}: drop it from the cohort or check the scan")
            labels = sources.source(s) if with_labels else None
            if labels is not None and labels.empty:
                labels = None
            label = index[s.label] if s.label is not None and s.label in index else None
            out.append(SegSlide(s.slide_id, Path(s.path), label, slide_mpp, shape0, tissue, labels,
                                dict(sources.id_to_class), exhaustive))
            if labels is not None:
                say(f"{s.slide_id}: painted pixel labels found")
    except BaseException:
        sources.close()
        raise
    sources.close(masks=False)  # the slides' label lookups read the CSV masks for the whole run
    return out


__all__ = ["SegDataError", "SegSlide", "open_seg_slides"]
