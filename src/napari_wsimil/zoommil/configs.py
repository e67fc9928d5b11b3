"""ZoomMIL's settings: one documented field per option (the Training widget's form and ``--set``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..train.engine import TrainConfig, doc_field


@dataclass
class ZoomMILConfig(TrainConfig):
    """ZoomMIL (Thandiackal 2022): attention MIL over several magnifications that learns where to zoom in."""

    n_classes: int | None = doc_field("Number of slide classes; None: largest training label + 1.", default=None)
    levels: str = doc_field("µm/px of each magnification, low to high, comma-separated (each a whole number of "
                            "times the next, e.g. 8,4,1 ≈ 1.25×, 2.5×, 10×). Empty: from the run's µm/px "
                            "(the lowest level), then 2× and 8× finer.", default="")
    k: int = doc_field("Patches chosen at each of the lower levels to zoom into (their children are read at "
                       "the next level).", default=12)
    num_samples: int = doc_field("Noise draws of the differentiable top-K while training.", default=100)
    sigma: float = doc_field("Noise scale of the differentiable top-K (on the softmax of the zoom scores).",
                             default=0.002)
    sigma_spread: float = doc_field("If > 0, the top-K's noise scale is this many standard deviations of each "
                                    "bag's zoom scores instead of `sigma` (so it suits bags of any size).",
                                    default=0.0)
    baseline: bool = doc_field("Subtract a leave-one-out baseline in the top-K's gradient estimate: the same "
                               "expected gradient as the paper's estimator, without its noise when no draw "
                               "changes the selection (our default, chosen on validation slides; False: the "
                               "paper's).", default=True)
    zoom_on: str = doc_field("Scores that choose where to zoom: 'zoom' (an extra attention head per lower level, "
                             "as the reference code) or 'attention' (the level's own attention, as the poster "
                             "describes).", default="zoom")
    hidden: int = doc_field("Width of each level's Linear(D, hidden).", default=512)
    attn_hidden: int = doc_field("Width of the gated attention's hidden layer.", default=256)
    dropout: float = doc_field("Dropout after each level's trunk and inside the attention.", default=0.25)
    standardise: bool = doc_field("Standardise features with the training bags' mean and std (stored in the "
                                  "model, applied at prediction).", default=True)
    balanced: bool = doc_field("Draw the training slides so that every class is seen equally often per "
                               "epoch (the reference's class-weighted sampler).", default=True)
    select_by: str = doc_field("Which validation figure picks the kept checkpoint (and early stopping): "
                               "'weighted_f1' (the paper's: F1 per class weighted by its share, ties broken "
                               "by the lower validation loss) or 'loss' (CLAM's rule). The learning rate "
                               "follows the validation loss either way.", default="weighted_f1")
    lr: float = doc_field("Adam learning rate.", default=1e-4)
    weight_decay: float = doc_field("Adam weight decay.", default=0.0)
    epochs: int = doc_field("Maximum number of passes over the training slides.", default=100)
    lr_plateau_factor: float = doc_field("Multiply the learning rate by this when the validation loss has not "
                                         "improved for `lr_plateau_patience` epochs (the reference's "
                                         "ReduceLROnPlateau); 1: never.", default=0.8)


__all__ = ["ZoomMILConfig"]
