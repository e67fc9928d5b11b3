"""Methods by name: each has a config dataclass (defaults + a doc string per field) and a builder.

The GUI and CLI list :func:`methods`, show each field's ``doc`` and call :func:`build` — nothing else
needs to know which method is which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from ..models import ABMIL, CLAMMB, CLAMSB
from .engine import TrainConfig, TrainingError, _doc
from .mil import (BagDataset, MILMethod, abmil_loss, balanced_sampler, clam_loss, ms_clam_loss, paired_sampler,
                  shuffle_sampler)


@dataclass
class ABMILConfig(TrainConfig):
    """ABMIL (Ilse 2018): gated attention pooling, bag cross-entropy only."""

    n_classes: int | None = _doc("Number of slide classes; None: largest training label + 1.", default=None)
    hidden: int = _doc("Width of the trunk Linear(D, hidden) after the encoder features.", default=512)
    attn_hidden: int = _doc("Width of the gated attention's hidden layer.", default=256)
    dropout: float = _doc("Dropout after the trunk and inside the attention.", default=0.25)
    standardise: bool = _doc("Standardise each feature with the mean and std of the training bags' patches "
                             "(stored in the model, applied at prediction). Off only to reproduce old runs: "
                             "real encoders' features differ in scale by orders of magnitude.", default=True)
    balanced: bool = _doc("Draw the training slides so that every class is seen equally often per epoch "
                          "(CLAM's weighted sampling); off: each slide once, in random order. MS-CLAM's `paired` "
                          "steps are balanced by construction.", default=True)


@dataclass
class CLAMConfig(ABMILConfig):
    """CLAM (Lu 2021): attention MIL plus instance clustering on the most/least attended patches."""

    k_sample: int = _doc("Patches taken from each end of the attention ranking for the instance loss "
                         "(shrinks to N//2 on small bags).", default=8)
    bag_weight: float = _doc("Weight of the bag loss; the instance loss gets 1 - bag_weight.", default=0.7)
    instance_loss: str = _doc("'svm' (smooth top-1 SVM) or 'ce' for the instance classifiers.", default="svm")
    subtyping: bool | None = _doc("Also push other classes' top patches to negative; None: on when more "
                                  "than 2 classes.", default=None)


@dataclass
class MSCLAMConfig(CLAMConfig):
    """MS-CLAM (Tourniaire 2023): CLAM-SB with one shared tile classifier, tile labels where known,
    an attention loss and paired negative/positive sampling. Class 0 is 'normal'."""

    c1: float = _doc("Weight of the bag loss; the instance loss gets 1 - c1.", default=0.6)
    w_att: float = _doc("Weight of the attention (entropy) loss.", default=1.0)
    oversample: float = _doc("Initial sampling weight of slides with tile labels.", default=90.0)
    oversample_decay: float = _doc("Per-epoch decay of that weight (never below 1).", default=0.9)
    paired: bool = _doc("Each step: one normal and one tumour slide.", default=True)


@dataclass(frozen=True)
class MethodInfo:
    """``kind`` "mil" methods train on feature bags (``builder``), "segmentation" ones on slide patches
    (built by :func:`napari_wsimil.seg.pipeline.prepare_seg_run`)."""

    name: str
    config_cls: type[TrainConfig]
    builder: Callable[[Any, BagDataset, BagDataset | None], MILMethod] | None
    kind: str = "mil"

    @property
    def description(self) -> str:
        return (self.config_cls.__doc__ or "").strip()


def _clam_model(cls: type[nn.Module], cfg: CLAMConfig, **extra: Any) -> Callable[[int, int], nn.Module]:
    def make(in_dim: int, n_classes: int) -> nn.Module:
        return cls(in_dim, n_classes, hidden=cfg.hidden, attn_hidden=cfg.attn_hidden, dropout=cfg.dropout,
                   k_sample=cfg.k_sample, instance_loss=cfg.instance_loss, subtyping=cfg.subtyping, **extra)
    return make


def _sampler(cfg: ABMILConfig) -> Any:
    return balanced_sampler if cfg.balanced else shuffle_sampler


def _abmil(cfg: ABMILConfig, tr: BagDataset, va: BagDataset | None) -> MILMethod:
    return MILMethod("abmil", cfg, tr, va,
                     lambda d, c: ABMIL(d, c, cfg.hidden, cfg.attn_hidden, cfg.dropout),
                     abmil_loss, _sampler(cfg), cfg.n_classes, standardise=cfg.standardise)


def _clam_sb(cfg: CLAMConfig, tr: BagDataset, va: BagDataset | None) -> MILMethod:
    return MILMethod("clam-sb", cfg, tr, va, _clam_model(CLAMSB, cfg), clam_loss(cfg.bag_weight),
                     _sampler(cfg), cfg.n_classes, standardise=cfg.standardise)


def _clam_mb(cfg: CLAMConfig, tr: BagDataset, va: BagDataset | None) -> MILMethod:
    return MILMethod("clam-mb", cfg, tr, va, _clam_model(CLAMMB, cfg), clam_loss(cfg.bag_weight),
                     _sampler(cfg), cfg.n_classes, standardise=cfg.standardise)


def _ms_clam(cfg: MSCLAMConfig, tr: BagDataset, va: BagDataset | None) -> MILMethod:
    # MS-CLAM's paired sampler is class-balanced by construction (one normal + one tumour slide a step).
    return MILMethod("ms-clam", cfg, tr, va, _clam_model(CLAMSB, cfg, instance_mode="ms-clam"),
                     ms_clam_loss(cfg.c1, cfg.w_att), paired_sampler(cfg.oversample, cfg.oversample_decay,
                                                                     cfg.paired), cfg.n_classes,
                     standardise=cfg.standardise)


def _segmentation() -> list[MethodInfo]:
    from ..seg.configs import ConfKDConfig, HybridConfig, PinchaudConfig

    return [MethodInfo("pinchaud", PinchaudConfig, None, "segmentation"),
            MethodInfo("hybrid", HybridConfig, None, "segmentation"),
            MethodInfo("confkd", ConfKDConfig, None, "segmentation")]


_MIL = [MethodInfo("abmil", ABMILConfig, _abmil), MethodInfo("clam-sb", CLAMConfig, _clam_sb),
        MethodInfo("clam-mb", CLAMConfig, _clam_mb), MethodInfo("ms-clam", MSCLAMConfig, _ms_clam)]
_METHODS: dict[str, MethodInfo] = {}


def _registry() -> dict[str, MethodInfo]:
    """Filled on first use: the segmentation configs import the engine, which imports this module."""
    if not _METHODS:
        _METHODS.update({m.name: m for m in (*_MIL, *_segmentation())})
    return _METHODS


def methods() -> dict[str, MethodInfo]:
    """All registered methods by name."""
    return dict(_registry())


def get(name: str) -> MethodInfo:
    try:
        return _registry()[name]
    except KeyError:
        raise TrainingError(f"unknown method {name!r}; choose one of {', '.join(_registry())}") from None


def make_config(name: str, **overrides: Any) -> TrainConfig:
    """The method's config with its defaults, some replaced; an unknown option is an error, not ignored."""
    cls = get(name).config_cls
    known = {f.name for f in fields(cls)}
    bad = set(overrides) - known
    if bad:
        raise TrainingError(f"{name} has no option(s) {', '.join(sorted(bad))}; "
                            f"options: {', '.join(sorted(known))}")
    return cls(**overrides)


def build(name: str, train_data: BagDataset, val_data: BagDataset | None = None,
          config: TrainConfig | None = None) -> MILMethod:
    """A ready-to-train method: pass it to :func:`napari_wsimil.train.train`.

    The cohorts are validated here (one class only, empty bags, labels outside the classes, NaN features
    raise :class:`TrainingError`), so a bad cohort fails before a training thread is started."""
    info = get(name)
    if info.builder is None:
        raise TrainingError(f"{name} trains on slide patches, not feature bags: use napari_wsimil.seg.pipeline")
    cfg = config if config is not None else info.config_cls()
    if not isinstance(cfg, info.config_cls):
        raise TrainingError(f"{name} needs a {info.config_cls.__name__}, got {type(cfg).__name__}")
    method = info.builder(cfg, train_data, val_data)
    method.check()
    return method
