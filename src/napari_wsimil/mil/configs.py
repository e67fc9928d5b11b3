"""Settings of the attention-MIL methods: one dataclass per method, a documented field per option (the
Training widget's form and ``wsimil train --set`` are generated from them)."""

from __future__ import annotations

from dataclasses import dataclass

from ..train.engine import TrainConfig, doc_field


@dataclass
class ABMILConfig(TrainConfig):
    """ABMIL (Ilse 2018): gated attention pooling, bag cross-entropy only."""

    n_classes: int | None = doc_field("Number of slide classes; None: largest training label + 1.", default=None)
    hidden: int = doc_field("Width of the trunk Linear(D, hidden) after the encoder features.", default=512)
    attn_hidden: int = doc_field("Width of the gated attention's hidden layer.", default=256)
    dropout: float = doc_field("Dropout after the trunk and inside the attention.", default=0.25)
    standardise: bool = doc_field("Standardise each feature with the mean and std of the training bags' patches "
                             "(stored in the model, applied at prediction). Off only to reproduce old runs: "
                             "real encoders' features differ in scale by orders of magnitude.", default=True)
    balanced: bool = doc_field("Draw the training slides so that every class is seen equally often per epoch "
                          "(CLAM's weighted sampling); off: each slide once, in random order. MS-CLAM's `paired` "
                          "steps are balanced by construction.", default=True)


@dataclass
class CLAMConfig(ABMILConfig):
    """CLAM (Lu 2021): attention MIL plus instance clustering on the most/least attended patches."""

    k_sample: int = doc_field("Patches taken from each end of the attention ranking for the instance loss "
                         "(shrinks to N//2 on small bags).", default=8)
    bag_weight: float = doc_field("Weight of the bag loss; the instance loss gets 1 - bag_weight.", default=0.7)
    instance_loss: str = doc_field("'svm' (smooth top-1 SVM) or 'ce' for the instance classifiers.", default="svm")
    subtyping: bool | None = doc_field("Also push other classes' top patches to negative; None: on when more "
                                  "than 2 classes.", default=None)


@dataclass
class MSCLAMConfig(CLAMConfig):
    """MS-CLAM (Tourniaire 2023): CLAM-SB with one shared tile classifier, tile labels where known,
    an attention loss and paired negative/positive sampling. Class 0 is 'normal'."""

    c1: float = doc_field("Weight of the bag loss; the instance loss gets 1 - c1.", default=0.6)
    w_att: float = doc_field("Weight of the attention (entropy) loss.", default=1.0)
    oversample: float = doc_field("Initial sampling weight of slides with tile labels.", default=90.0)
    oversample_decay: float = doc_field("Per-epoch decay of that weight (never below 1).", default=0.9)
    paired: bool = doc_field("Each step: one normal and one tumour slide.", default=True)


__all__ = ["ABMILConfig", "CLAMConfig", "MSCLAMConfig"]
