"""Losses of the attention-MIL family: smooth top-1 SVM, CLAM / MS-CLAM instance losses and the MS-CLAM
attention loss.

All functions take one bag at a time (batch = 1 bag, as in CLAM) and are written so that tiny bags
(N = 1, N < 2k) never crash: CLAM issue #28 is a top-k over fewer patches than k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def smooth_top1_svm(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
                    tau: float = 1.0) -> torch.Tensor:
    """Smooth top-1 SVM (Berrada et al. 2018), CLAM's default instance loss; mean over the batch.

    ``tau · log Σ_j exp((s_j + alpha·[j≠y] − s_y) / tau)``. As tau → 0 it becomes the hinge
    ``max_j(s_j + alpha·[j≠y]) − s_y``; logsumexp keeps it stable so no separate hard branch is needed.
    """
    margin = alpha * (1.0 - F.one_hot(target, logits.shape[1]).to(logits.dtype))
    z = (logits + margin - logits.gather(1, target[:, None])) / tau
    return (tau * torch.logsumexp(z, dim=1)).mean()


class SmoothTop1SVM(nn.Module):
    """Module wrapper of :func:`smooth_top1_svm`, so a loss can be chosen by name."""

    def __init__(self, alpha: float = 1.0, tau: float = 1.0):
        super().__init__()
        self.alpha, self.tau = alpha, tau

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return smooth_top1_svm(logits, target, self.alpha, self.tau)


def instance_loss_fn(name: str) -> nn.Module:
    """``"svm"`` (smooth top-1 SVM, CLAM's default) or ``"ce"`` (cross-entropy)."""
    if name == "svm":
        return SmoothTop1SVM()
    if name == "ce":
        return nn.CrossEntropyLoss()
    raise ValueError(f"unknown instance loss {name!r}; use 'svm' or 'ce'")


def _classify(h: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, classifier: nn.Module,
              loss_fn: nn.Module) -> torch.Tensor:
    return loss_fn(classifier(h[idx]), targets.to(h.device))


def clam_in_class(h: torch.Tensor, a: torch.Tensor, classifier: nn.Module, k_sample: int,
                  loss_fn: nn.Module) -> torch.Tensor | None:
    """CLAM instance clustering for the bag's own class: top-k attended → 1, bottom-k → 0.

    k shrinks to ``N // 2`` for small bags (so top and bottom never overlap); a bag of one has no
    contrast to learn from and returns None.
    """
    k = min(k_sample, a.numel() // 2)
    if k < 1:
        return None
    top = torch.topk(a, k).indices
    bottom = torch.topk(-a, k).indices
    targets = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)])
    return _classify(h, torch.cat([top, bottom]), targets, classifier, loss_fn)


def clam_out_class(h: torch.Tensor, a: torch.Tensor, classifier: nn.Module, k_sample: int,
                   loss_fn: nn.Module) -> torch.Tensor | None:
    """CLAM subtyping: for a class the bag is not, its top-k attended instances are negatives."""
    k = min(k_sample, a.numel() // 2)
    if k < 1:
        return None
    top = torch.topk(a, k).indices
    return _classify(h, top, torch.zeros(k, dtype=torch.long), classifier, loss_fn)


def ms_clam_instance_loss(h: torch.Tensor, a: torch.Tensor, classifier: nn.Module, slide_label: int,
                          instance_labels: torch.Tensor | None, k_sample: int,
                          loss_fn: nn.Module) -> torch.Tensor | None:
    """MS-CLAM's instance loss with one shared tile classifier (tumour = label > 0).

    * negative slide: its top-k attended tiles → 0 (every tile of a normal slide is normal);
    * positive slide with tile labels: up to k known tumour tiles → 1 and up to k/2 known normal
      tiles → 0, the most attended ones first (the ones that steer the bag decision);
    * positive slide without tile labels: top-k attended → 1, bottom-k/2 → 0 (CLAM-style pseudo labels).
    """
    n = a.numel()
    if slide_label == 0:
        k = min(k_sample, n)
        top = torch.topk(a, k).indices
        return _classify(h, top, torch.zeros(k, dtype=torch.long), classifier, loss_fn)
    known = instance_labels is not None and bool((instance_labels >= 0).any())
    if known:
        lab = instance_labels.to(a.device)
        tum = torch.nonzero(lab > 0).flatten()
        nor = torch.nonzero(lab == 0).flatten()
        tum = tum[torch.argsort(a[tum], descending=True)][:k_sample]
        nor = nor[torch.argsort(a[nor], descending=True)][: max(1, k_sample // 2)]
    else:
        k = min(k_sample, n // 2)
        if k < 1:
            return None
        tum = torch.topk(a, k).indices
        nor = torch.topk(-a, max(1, k // 2)).indices
    idx = torch.cat([tum, nor])
    if idx.numel() == 0:
        return None
    targets = torch.cat([torch.ones(tum.numel(), dtype=torch.long),
                         torch.zeros(nor.numel(), dtype=torch.long)])
    return _classify(h, idx, targets, classifier, loss_fn)


def normalised_entropy(a: torch.Tensor) -> torch.Tensor:
    """``−Σ a log a / log N`` in [0, 1]; 0 for N = 1 (one instance has nothing to spread over)."""
    n = a.numel()
    if n < 2:
        return a.new_zeros(())
    return -(a * torch.log(a.clamp_min(1e-12))).sum() / math.log(n)


def ms_clam_attention_loss(a: torch.Tensor, slide_label: int,
                           instance_labels: torch.Tensor | None) -> torch.Tensor:
    """MS-CLAM attention loss on softmaxed attention ``a`` (N,).

    Negative slides: ``−H(A)`` (no tile deserves attention, so spread it). Positive slides with tile labels:
    ``Σ_normal a − H(A_tumour) − Σ_tumour a`` (put the attention on tumour and spread it over all of it;
    ``A_tumour`` is renormalised over the tumour tiles). Positive slides without tile labels: 0.
    """
    if slide_label == 0:
        return -normalised_entropy(a)
    if instance_labels is None or not bool((instance_labels >= 0).any()):
        return a.new_zeros(())
    lab = instance_labels.to(a.device)
    tum, nor = lab > 0, lab == 0
    loss = a[nor].sum() - a[tum].sum()
    if bool(tum.any()):
        at = a[tum]
        loss = loss - normalised_entropy(at / at.sum().clamp_min(1e-12))
    return loss
