"""The weak-segmentation family: Pinchaud, Hybrid Supervision and ConfKD train a U-Net on slide pixels
and show tumour probability.

How each step goes (:class:`~napari_wsimil.train.family.MethodFamily`):
- **prepare** (:mod:`.pipeline`): tissue masks and pixel labels of the slides, the method's patch loader;
- **live layer**: the mapping worker's latest probability maps of training slides, the checkpoint's
  maps of the others;
- **predict**: ``predictions.csv``, ``maps/<slide>.tif`` and, with ``masks``, tumour masks and outlines
  cut at the run's operating threshold;
- **corrections**: painted pixels are pixel labels, which every method here learns from: the run
  continues, re-reading the paint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError
from ..infer.metrics import format_metric as _f
from ..train.family import MapMaker, MethodFamily, PredictRequest, Report, TruthItem
from ..train.registry import MethodInfo
from ..train.run import PreparedRun, RunSpec
from .configs import ConfKDConfig, HybridConfig, PinchaudConfig

DEFAULT_MPP = 1.0  # Pinchaud trains at 1 µm/px
DEFAULT_PATCH = 128


def _quiet(_msg: str) -> None:
    pass


class SegmentationFamily(MethodFamily):
    """Weak pixel segmentation on slide patches (see the module doc)."""

    name = "segmentation"
    live_layer = "probability"
    uses_encoder = False
    default_mpp = DEFAULT_MPP
    default_patch = DEFAULT_PATCH

    def prepare(self, spec: RunSpec, report: Report | None = None) -> PreparedRun:
        from .pipeline import prepare_seg_run

        return prepare_seg_run(spec, report)

    def live_maps(self, prepared: PreparedRun, watch: Sequence[str]) -> MapMaker:
        from .live import seg_maps

        return seg_maps(prepared, list(watch))

    # ------------------------------------------------------------------------------------ prediction
    def predict(self, request: PredictRequest, report: Report | None = None) -> dict[str, Any]:
        from ..infer.predictions import SlidePrediction, write_predictions
        from ..io.atomic import write_text
        from ..train.cohort import load_cohort
        from .data import open_seg_slides
        from .operating_point import describe, read_operating_point
        from .predict import load_seg_run, map_slide, remove_zarr

        say = report or _quiet
        opts = request.options
        slide_score, top_k = opts.get("slide_score", "max"), int(opts.get("top_k", 8))
        run = load_seg_run(request.run, device=request.device, weights=request.weights)
        point = read_operating_point(request.run) if request.weights == "best" else None
        threshold = float(point["threshold"]) if point else 0.5
        cohort = load_cohort(request.cohort).only(request.options.get("slides"))  # one slide: a cluster task
        classes = run.info.get("classes") or ["0", "1"]
        out = Path(request.out)
        out.mkdir(parents=True, exist_ok=True)
        say(f"{run.method}: mapping {len(cohort.slides)} slides at {run.mpp:g} µm/px -> {out / 'maps'}")
        say(describe(point) if point else "tumour masks at p ≥ 0.5: the run has no operating threshold for its "
            "best weights ('wsimil calibrate' sets one)")
        preds = []
        for i, item in enumerate(cohort.slides, 1):
            t0 = time.perf_counter()
            slide, = open_seg_slides(cohort, [item], classes, with_labels=False)
            try:
                m = map_slide(run, slide, out, top_k=top_k, extra={"threshold": threshold},
                              ome_zarr=bool(opts.get("ome_zarr")))
            finally:
                slide.close()
            masks = ""
            if opts.get("masks"):
                from .masks import write_tumour_mask, write_tumour_outlines

                write_tumour_mask(m.zarr_path, out / "masks" / f"{item.slide_id}.ome.tif", slide, run.mpp,
                                  threshold, {"method": run.method, "run": str(Path(request.run).resolve())})
                _, n = write_tumour_outlines(m.zarr_path, out / "masks" / f"{item.slide_id}.geojson", slide,
                                             run.mpp, threshold)
                masks = f"; {n} tumour region{'s' if n != 1 else ''} at p ≥ {threshold:.3f}"
            remove_zarr(m.zarr_path)  # the TIFF is the artefact; the zarr was the scratch space
            score = m.score_max if slide_score == "max" else m.score_topk
            preds.append(SlidePrediction(item.slide_id, [1.0 - score, score], None, None, None,
                                         seconds=time.perf_counter() - t0))
            say(f"[{i}/{len(cohort.slides)}] {item.slide_id}: p(malignant) {score:.3f} "
                f"(max pixel {m.score_max:.3f}, top-{top_k} {m.score_topk:.3f}){masks}")
        write_predictions(preds, 2, out / "predictions.csv")
        meta = {"run": str(Path(request.run).resolve()), "cohort": str(Path(request.cohort).resolve()),
                "family": self.name, "method": run.method, "kind": "segmentation", "classes": classes,
                "weights": request.weights, "slide_score": slide_score, "top_k": top_k, "mpp": run.mpp,
                "threshold": threshold, "operating_point": point}
        write_text(out / "prediction.json", json.dumps(meta, indent=1))
        say(f"predictions: {out / 'predictions.csv'}")
        return meta

    def evaluate(self, pred_dir: Path, truth: list[TruthItem], meta: dict[str, Any],
                 threshold: float | None = None) -> tuple[str, dict[str, Any]] | None:
        from .evaluation import segmentation_metrics

        if not truth or not (Path(pred_dir) / "maps").is_dir():
            return None
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise WsimilError(f"--threshold is a probability in (0, 1], got {threshold}")
        # the run's own threshold may be above 1: no stored level kept benign tissue within operating_fpr
        # (operating_point.threshold_for_fpr's level 256), so nothing is called tumour; Dice at 0.5 is reported too
        t = threshold if threshold is not None else meta.get("threshold", 0.5)
        if not t > 0.0:
            raise WsimilError(f"the recorded threshold {t} is not a probability above 0: predict again")
        return "segmentation", segmentation_metrics(truth, Path(pred_dir) / "maps", threshold=float(t))

    def report(self, name: str, metrics: dict[str, Any], say: Report) -> None:
        seg = metrics
        if not seg:
            return
        say(f"segmentation on {seg['n_slides_with_truth']} slides with ground truth "
            f"({seg['n_malignant_with_truth']} with tumour, {seg['n_lesions']} lesions): "
            f"Dice {_f(seg['dice'])} (pooled {_f(seg['dice_pooled'])}: precision "
            f"{_f(seg.get('precision_pooled'))}, recall {_f(seg.get('recall_pooled'))})  IoU {_f(seg['iou'])}  "
            f"FROC {_f(seg['froc'])}  benign pixels called tumour {_f(seg['benign_positive_fraction'])}  "
            f"(tumour at p ≥ {seg['threshold']:.3f}" + (f"; Dice at 0.5: {_f(seg['dice_at_0.5'])})"
                                                         if "dice_at_0.5" in seg else ")"))

    # ------------------------------------------------------------------------ the interactive loop
    @staticmethod
    def _map_path(run_dir: Path, slide_id: str) -> Path:
        """The run's map of ``slide_id`` (the mapping worker's, or made now with the best checkpoint)."""
        from ..io.raster_store import exists
        from .live import checkpoint_map

        path = Path(run_dir) / "maps" / f"{slide_id}.zarr"
        if not exists(path) and checkpoint_map(Path(run_dir), slide_id, 0) is None:
            raise WsimilError(f"slide {slide_id} is not in the run's cohort")
        return path

    def slide_map(self, run_dir: Path, slide_id: str, source: Path, weights: str = "best") -> Any:
        from .live import checkpoint_map

        state = json.loads((Path(run_dir) / "last.json").read_text())
        m = checkpoint_map(Path(run_dir), slide_id, int(state.get("epoch", 0)), weights=weights, source=source)
        if m is None:
            raise WsimilError(f"slide {slide_id} is not in the run's cohort")
        return m

    def patch_scores(self, run_dir: Path, slide_id: str, source: Path) -> Any:
        from ..train.run import read_run_info
        from .pseudo import map_patch_scores

        return map_patch_scores(self._map_path(run_dir, slide_id), int(read_run_info(run_dir)["patch"]))

    def pseudo_labels(self, run_dir: Path, project: Any, slide_id: str, tumour: int, normal: int,
                      high: float = 0.7, low: float = 0.3) -> np.ndarray:
        """Pixel-level, from the run's probability map, saved as ``PROJECT/pseudo_labels/<run>/<slide>.zarr``."""
        from .pseudo import write_pseudo_labels

        self._map_path(run_dir, slide_id)
        return write_pseudo_labels(project, Path(run_dir), slide_id, tumour, normal, high, low)[1]

    def operating_threshold(self, run_dir: Path) -> float | None:
        from .operating_point import read_operating_point

        point = read_operating_point(Path(run_dir))
        return float(point["threshold"]) if point else None


FAMILY = SegmentationFamily()
METHODS = [MethodInfo("pinchaud", PinchaudConfig, FAMILY), MethodInfo("hybrid", HybridConfig, FAMILY),
           MethodInfo("confkd", ConfKDConfig, FAMILY)]

__all__ = ["DEFAULT_MPP", "DEFAULT_PATCH", "FAMILY", "METHODS", "SegmentationFamily"]
