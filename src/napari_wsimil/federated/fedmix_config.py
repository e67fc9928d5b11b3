"""FedMix's settings: the segmentation family's U-Net options plus what the federation adds.

A subclass of :class:`~napari_wsimil.seg.configs.SegConfig` on purpose: a FedMix run folder is a segmentation
run (``wsimil predict`` rebuilds its U-Net from the saved config's ``width`` and ``depth``), and the sampling
and validation code of the segmentation family reads the same fields. The defaults that differ are the paper's
(Wicaksana 2023: Dice loss, Adam 1e-3 with weight decay 1e-4; λ ∈ {2, 10}, β ∈ {1.5, 3}).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..seg.configs import SegConfig
from ..train.engine import doc_field

SUPERVISION = ("auto", "pixel", "box", "slide")


@dataclass
class FedMixConfig(SegConfig):
    """FedMix (Wicaksana 2023): federated segmentation across sites with painted pixels, tumour boxes or slide
    labels only. Each site trains two U-Nets that supervise each other with pseudo-labels from the two global
    nets, kept only where those agree; the server weights sites by selected images and local loss."""

    weight_decay: float = doc_field("Adam weight decay (the paper's 1e-4).", default=1e-4)
    mpp: float = doc_field("µm/px the U-Net works at (every site reads its slides at this resolution).",
                           default=1.0)
    patch: int = doc_field("Training patch side in px (a multiple of 2^(depth-1)).", default=128)
    classes: str = doc_field("Slide classes 'BENIGN,MALIGNANT'; empty: each site's two labels in order "
                             "(numeric, else alphabetical).", default="")
    val_fraction: float = doc_field("Share of a site's slides held out to measure the global model there "
                                    "(a cohort's own split column wins).", default=0.25)
    patches_per_round: int = doc_field("Patches each site trains on per round (half from benign slides).",
                                       default=256)
    supervision: str = doc_field("What the site's labels are: 'pixel' (painted pixels or polygons), 'box' "
                                 "(tumour boxes, every lesion of a boxed slide inside one), 'slide' (slide "
                                 "labels only), or 'auto' (read from the site's drawings).", default="auto")
    agree_dice: float = doc_field("A pseudo-labelled patch is kept only where the two global nets' tumour masks "
                                  "agree at least this well (Dice); the paper's 0.9.", default=0.9)
    box_dice: float = doc_field("On box sites, a kept patch's predicted tumour must also match the boxes at "
                                "least this well (Dice); the paper's 0.5.", default=0.5)
    lam: float = doc_field("λ of the adaptive aggregation: weight of the sites' local losses against their "
                           "numbers of selected images (paper: 2 or 10).", default=10.0)
    beta: float = doc_field("β of the adaptive aggregation: sharpness of the local-loss term (paper: 1.5 or 3).",
                            default=1.5)


__all__ = ["SUPERVISION", "FedMixConfig"]
