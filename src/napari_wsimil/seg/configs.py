"""Settings of the segmentation methods, each with the doc string the GUI and ``--help`` show.

Defaults are the papers' where they give one (Pinchaud: β0 = 0, β1 = 1, η = 50 %, α = 2, 32 filters;
Hybrid Supervision: T = 0.4, V = 4, batch mix 40/10/50 %), otherwise chosen so a CPU run is practical.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..train.engine import TrainConfig, doc_field


@dataclass
class SegConfig(TrainConfig):
    """Options every pixel-segmentation method shares."""

    epochs: int = doc_field("Number of passes (each of `patches_per_epoch` patches).", default=40)
    lr: float = doc_field("Adam learning rate.", default=1e-3)
    weight_decay: float = doc_field("Adam weight decay (L2).", default=1e-5)
    min_epochs: int = doc_field("Never stop early before this epoch.", default=20)
    width: int = doc_field("Filters in the U-Net's first level (doubling per level); the paper uses 32.", default=32)
    depth: int = doc_field("U-Net levels; patches must be a multiple of 2^(depth-1) px. Each level doubles how far "
                      "the net sees (receptive margin 10 / 24 / 48 px at depth 2 / 3 / 4). From slide labels "
                      "only, normal tissue within that distance of tumour tends to be called tumour: on the "
                      "benchmark, about 40 µm kept that halo narrow and 96 µm did not.", default=4)
    batch_size: int = doc_field("Patches per optimisation step.", default=16)
    patches_per_epoch: int = doc_field("Patches drawn per epoch (half from malignant, half from benign slides).",
                                  default=512)
    augment: bool = doc_field("Rotation, mirroring, elastic deformation and colour jitter.", default=True)
    alpha: float = doc_field("Dynamic sampling sharpness: patch centres ∝ Q^alpha of the latest map (0: uniform over "
                        "tissue).", default=2.0)
    revisit_epochs: int = doc_field("Every slide is drawn at least once every this many epochs.", default=5)
    map_tile: int = doc_field("Tile side (px) of fully convolutional mapping (larger: less context re-read per "
                         "tile, more memory).", default=512)
    map_threads: int = doc_field("CPU threads of the mapping worker (0: half the cores, all with sync_maps); the "
                            "trainer keeps its own.",
                            default=0)
    map_staleness: int = doc_field("The trainer waits when the newest map is older than this many epochs.", default=2)
    max_map_wait: float = doc_field("Most of the training time (0-1) the trainer may spend waiting for fresh maps; "
                               "beyond it, it trains on the maps it has (older: see the map_age metric).",
                               default=0.05)
    sync_maps: bool = doc_field("Before each epoch, wait until every training slide is mapped with the last epoch's "
                           "weights. Runs are then reproducible from the seed (otherwise the concurrent mapper's "
                           "timing decides which maps an epoch samples from), at the cost of mapping every slide "
                           "every epoch while the trainer waits.", default=False)
    w_pixel: float = doc_field("Weight of cross-entropy on painted pixels (mixed supervision); 0 ignores paint.",
                          default=1.0)
    init_weights: str | None = doc_field("Start from these weights: an auto-encoder pre-training file "
                                    "(`wsimil pretrain`) or a segmentation checkpoint (.safetensors).", default=None)
    val_patches: int = doc_field("Fixed validation patches per validation slide.", default=16)
    checkpoint_by: str = doc_field("What picks best.safetensors and stops early: 'auto' is pixel Dice on the painted "
                              "pixels of validation slides (benign validation slides' tissue counting as "
                              "normal) when a validation slide is painted, else the method's validation loss; "
                              "'loss' is always the method's loss (Hybrid: its stage-2 slide loss, as in the "
                              "paper).", default="auto")
    read_workers: int = doc_field("Threads reading patches ahead of the trainer.", default=4)
    context: int = doc_field("Pixels of slide read around every training and validation patch as context only: the "
                        "losses see the patch inside. -1: the net's receptive margin, so a patch's logits are "
                        "those the maps (fully convolutional, on large tiles) give for the same pixels; 0: none, "
                        "and pixels near a patch's edge are computed from zero padding the maps never see.",
                        default=0)
    operating_fpr: float = doc_field("After training, the threshold that turns maps into tumour masks is set so that "
                                "at most this share of the benign validation slides' tissue (else the benign "
                                "training slides') is called tumour, and never below 0.5: trained from slide "
                                "labels, maps rank pixels well but are not calibrated at 0.5 (operating_rule "
                                "'benign-fpr', and 'auto' without painted validation pixels). 0: keep 0.5.",
                                default=0.001)
    operating_rule: str = doc_field("How the operating threshold is set after training. 'val-dice': the threshold "
                                    "(≥ 0.5) with the best pooled pixel Dice on the painted validation pixels, "
                                    "benign validation tissue counting as normal; 'benign-fpr': the operating_fpr "
                                    "rule above; 'auto': val-dice when some painted validation pixel is tumour, "
                                    "else benign-fpr. Why: a saturated map (Dice loss, much paint) calls its few "
                                    "benign false positives tumour at p ≈ 1, so the benign-FPR rule sets 0.99 or "
                                    "more and discards a map that segments well; painted pixels measure the "
                                    "threshold's Dice directly.", default="auto")


@dataclass
class PinchaudConfig(SegConfig):
    """Pinchaud 2024: pixel-resolution segmentation from slide labels only: slide logits from the top-η
    malignant pixels, the noise-robust generalised KL, dynamic sampling from live probability maps."""

    beta0: float = doc_field("β of the benign class (0: plain KL term).", default=0.0)
    beta1: float = doc_field("β of the malignant class (> 0: robust to malignant-slide patches without tumour).",
                        default=1.0)
    eta: float = doc_field("Percent of a patch's pixels whose malignant logits make the malignant slide logit "
                      "(small: max, 100: mean). Above the share of tumour in a patch it grows a halo of "
                      "false tumour around small lesions: lower it when lesions are not much larger than "
                      "a patch.", default=50.0)
    normalise_logits: bool = doc_field("Pool each pixel's log-probabilities (log-softmax) into the slide logits instead "
                                  "of its raw logits. A pixel's probability does not change when both its logits "
                                  "move together, but the paper's slide logits do, so a net can make a benign patch "
                                  "look benign by raising both logits of some pixels while it calls others tumour. "
                                  "Off: the paper's pooling.", default=False)
    dynamic_sampling: bool = doc_field("Run the mapping worker and sample from its maps (off: uniform over tissue).",
                                  default=True)


@dataclass
class HybridConfig(SegConfig):
    """Hybrid Supervision (Li 2021): EM rounds of pseudo-labels from the current model (E) and soft-label BCE
    on painted pixels, pseudo-labelled tumour and hard negatives (M); the round with the lowest stage-2 slide
    loss (top-K patch mean) is kept. Needs painted pixels on some slides."""

    epochs_per_round: int = doc_field("Epochs of each M-step; pseudo-labels are renewed between rounds.", default=5)
    threshold: float = doc_field("T: patches whose maximum probability is below T get no pseudo-label.", default=0.4)
    scale: float = doc_field("V: pseudo-label = clip(probability × V, 0, 1), 0 below 0.01.", default=4.0)
    mix_negative: float = doc_field("Share of each batch from benign slides (hard negatives).", default=0.4)
    mix_pseudo: float = doc_field("Share of each batch with pseudo-labels from malignant slides.", default=0.1)
    mix_fine: float = doc_field("Share of each batch centred on painted pixels.", default=0.5)
    top_k: int = doc_field("Stage 2: a slide's score is the mean of its top-K patch probabilities.", default=8)


@dataclass
class ConfKDConfig(SegConfig):
    """ConfKD (Liu 2022): one encoder, a teacher decoder trained on painted pixels and a student decoder on
    weakly labelled images: CE + student entropy + KL(teacher ‖ student). Needs painted pixels on some slides."""

    alpha: float = doc_field("Dynamic sampling sharpness (ConfKD samples uniformly: 0).", default=0.0)
    w_ce: float = doc_field("Weight of cross-entropy on labelled pixels.", default=1.0)
    w_ent: float = doc_field("Weight of the student's entropy on weakly labelled images.", default=0.1)
    w_kl: float = doc_field("Weight of KL(teacher ‖ student) on weakly labelled images.", default=1.0)
    predict_with: str = doc_field("Decoder used for maps: 'student' (better in the paper) or 'teacher'.",
                             default="student")


__all__ = ["ConfKDConfig", "HybridConfig", "PinchaudConfig", "SegConfig"]
