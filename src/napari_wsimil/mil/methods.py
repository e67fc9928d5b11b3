"""The attention-MIL methods the registry lists: ABMIL, CLAM-SB, CLAM-MB and MS-CLAM, each a config and a
builder that binds the method's network, losses and sampler to its training bags."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..models import ABMIL, CLAMMB, CLAMSB
from ..train.registry import MethodInfo
from .configs import ABMILConfig, CLAMConfig, MSCLAMConfig
from .family import FAMILY
from .training import (BagDataset, MILMethod, abmil_loss, balanced_sampler, clam_loss, ms_clam_loss,
                       paired_sampler, shuffle_sampler)


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


METHODS = [MethodInfo("abmil", ABMILConfig, FAMILY, _abmil), MethodInfo("clam-sb", CLAMConfig, FAMILY, _clam_sb),
           MethodInfo("clam-mb", CLAMConfig, FAMILY, _clam_mb),
           MethodInfo("ms-clam", MSCLAMConfig, FAMILY, _ms_clam)]

__all__ = ["METHODS"]
