"""Inference with a trained run: slide probabilities, per-patch attention and slide-level metrics.

    from napari_wsimil.infer import load_run, predict_bag, slide_metrics
    run = load_run("runs/abmil")
    pred = predict_bag(run, "slide_001", "features/handcrafted/slide_001.npz")
"""

from .metrics import accuracy, auc, balanced_accuracy, binary_auc, f1, slide_metrics
from .predict import (LoadedRun, RunError, SlidePrediction, load_run, predict_bag, read_predictions,
                      write_attention, write_predictions)

__all__ = ["LoadedRun", "RunError", "SlidePrediction", "accuracy", "auc", "balanced_accuracy", "binary_auc",
           "f1", "load_run", "predict_bag", "read_predictions", "slide_metrics", "write_attention",
           "write_predictions"]
