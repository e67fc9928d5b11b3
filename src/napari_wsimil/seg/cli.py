"""The segmentation side of ``wsimil predict`` and ``wsimil evaluate``, and ``wsimil pretrain``.

``wsimil train --method pinchaud|hybrid|confkd`` goes through the shared ``train`` command
(:mod:`napari_wsimil.train.cli`); ``predict`` and ``evaluate`` notice a segmentation run or prediction and
come here.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _say(msg: str) -> None:
    print(msg, flush=True)


def _fmt(v: Any) -> str:
    import math

    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def cmd_predict_seg(args: argparse.Namespace) -> int:
    from ..infer.predict import SlidePrediction, write_predictions
    from ..project.atomic import write_text
    from ..train.cohort import load_cohort
    from .data import open_seg_slides
    from .predict import load_seg_run, map_slide, remove_zarr

    run = load_seg_run(args.run, device=args.device, weights=args.weights)
    cohort = load_cohort(args.cohort)
    classes = run.info.get("classes") or ["0", "1"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _say(f"{run.method}: mapping {len(cohort.slides)} slides at {run.mpp:g} µm/px -> {out / 'maps'}")
    preds = []
    for i, item in enumerate(cohort.slides, 1):
        slide, = open_seg_slides(cohort, [item], classes, with_labels=False)
        try:
            m = map_slide(run, slide, out, top_k=args.top_k)
        finally:
            slide.close()
        remove_zarr(m.zarr_path)  # the TIFF is the artefact; the zarr was the scratch space
        score = m.score_max if args.slide_score == "max" else m.score_topk
        preds.append(SlidePrediction(item.slide_id, [1.0 - score, score], None, None, None))
        _say(f"[{i}/{len(cohort.slides)}] {item.slide_id}: p(malignant) {score:.3f} "
             f"(max pixel {m.score_max:.3f}, top-{args.top_k} {m.score_topk:.3f})")
    write_predictions(preds, 2, out / "predictions.csv")
    write_text(out / "prediction.json", json.dumps(
        {"run": str(Path(args.run).resolve()), "cohort": str(Path(args.cohort).resolve()), "method": run.method,
         "kind": "segmentation", "classes": classes, "weights": args.weights, "slide_score": args.slide_score,
         "top_k": args.top_k, "mpp": run.mpp}, indent=1))
    _say(f"predictions: {out / 'predictions.csv'}")
    return 0


def report_segmentation(seg: dict[str, Any], say: Callable[[str], None]) -> None:
    if not seg:
        return
    say(f"segmentation on {seg['n_slides_with_truth']} slides with ground truth "
        f"({seg['n_malignant_with_truth']} with tumour, {seg['n_lesions']} lesions): "
        f"Dice {_fmt(seg['dice'])} (pooled {_fmt(seg['dice_pooled'])})  IoU {_fmt(seg['iou'])}  "
        f"FROC {_fmt(seg['froc'])}  benign pixels called tumour {_fmt(seg['benign_positive_fraction'])}")


__all__ = ["cmd_predict_seg", "report_segmentation"]
