"""What any trained run's output is measured and drawn with: slide metrics, localisation metrics,
heatmaps, pseudo-labels, and the predictions files. Nothing here knows a method family; loading a run
to predict with is the family's (``napari_wsimil.mil.predict`` for attention MIL).

    from napari_wsimil.infer import read_predictions, slide_metrics
    ids, probs = read_predictions("pred/predictions.csv")
"""

from .metrics import accuracy, auc, balanced_accuracy, binary_auc, f1, slide_metrics
from .predictions import (RunError, SlidePrediction, read_attention, read_predictions, write_attention,
                          write_predictions)

__all__ = ["RunError", "SlidePrediction", "accuracy", "auc", "balanced_accuracy", "binary_auc", "f1",
           "read_attention", "read_predictions", "slide_metrics", "write_attention", "write_predictions"]
