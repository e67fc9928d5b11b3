"""Which pseudo-labels a FedMix site trains on, and with what targets.

A batch mixes patches of four kinds (each patch's ``kind``):

* ``benign``: from a benign slide; every pixel is normal (the slide label says so): always kept, target 0;
* ``pixel``: centred on painted pixels; the paint is the target where it exists;
* ``box``: from a slide whose tumour is boxed; kept only where the two *global* nets agree (Dice ≥
  ``agree``) and their tumour matches the boxes (Dice ≥ ``box_min``); target: the other net's tumour inside
  the boxes, normal outside (every lesion of a boxed slide is inside a box);
* ``weak``: from a malignant slide with a slide label only; kept where the global nets agree (Dice ≥
  ``agree``) *and* see some tumour. A patch both nets call all-normal says nothing on a malignant slide
  (normal tissue, or missed tumour), so it is not taken as normal: normal tissue is learned from benign slides.

Cross-supervision: net A's pseudo-label is global net B's mask and B's is A's, so each local net learns from
the other's view, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("benign", "pixel", "box", "weak")


def dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-patch Dice of two boolean masks (B, H, W); two empty masks agree perfectly (1)."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter, total = (a * b).sum(1), a.sum(1) + b.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-9), torch.ones_like(total))


@dataclass
class Selection:
    """Targets (float 0/1) of net A and net B, the pixels each loss sees, and the patches kept."""

    target_a: torch.Tensor  # (B, H, W)
    target_b: torch.Tensor
    known: torch.Tensor  # (B, H, W) bool
    kept: torch.Tensor  # (B,) bool

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())


def select(kinds: list[str], labels: torch.Tensor, prob_a: torch.Tensor, prob_b: torch.Tensor, *,
           agree: float = 0.9, box_min: float = 0.5) -> Selection:
    """The targets of one batch (see the module doc). ``labels``: (B, H, W) -1 unknown / 0 / 1 (on a box
    patch, 1 is inside a box); ``prob_a``/``prob_b``: the global nets' tumour probabilities."""
    bad = set(kinds) - set(KINDS)
    if bad:
        raise ValueError(f"unknown patch kinds {sorted(bad)}")
    kind = {k: torch.tensor([x == k for x in kinds], device=labels.device) for k in KINDS}
    mask_a, mask_b = prob_a >= 0.5, prob_b >= 0.5
    agreement = dice(mask_a, mask_b) >= agree
    box = labels == 1
    both = (prob_a + prob_b) / 2 >= 0.5
    box_ok = dice(both, box) >= box_min
    some_tumour = (mask_a & mask_b).flatten(1).any(1)
    kept = (kind["benign"] | (kind["pixel"] & (labels >= 0).flatten(1).any(1))
            | (kind["box"] & agreement & box_ok) | (kind["weak"] & agreement & some_tumour))

    def per_patch(v: torch.Tensor) -> torch.Tensor:
        return v[:, None, None]

    truth = (labels == 1).float()
    zero = torch.zeros_like(truth)
    target_a = torch.where(per_patch(kind["pixel"]), truth, zero)
    target_b = target_a.clone()
    target_a = torch.where(per_patch(kind["box"]), (mask_b & box).float(), target_a)
    target_b = torch.where(per_patch(kind["box"]), (mask_a & box).float(), target_b)
    target_a = torch.where(per_patch(kind["weak"]), mask_b.float(), target_a)
    target_b = torch.where(per_patch(kind["weak"]), mask_a.float(), target_b)
    known = torch.where(per_patch(kind["pixel"]), labels >= 0, torch.ones_like(box))
    known = known & per_patch(kept)
    return Selection(target_a, target_b, known, kept)


def masked_dice_loss(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor,
                     smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss (mean over the normal and tumour classes present in the known target), pooled over the
    batch's ``known`` pixels.

    Pooled rather than per patch because most patches hold no tumour: a per-patch tumour Dice is undefined
    there. A class with no known target pixel in the whole batch is left out of the mean: its soft Dice would
    be 1 − smooth / (Σp + smooth), about 1 for any net that gives that class a few per cent probability over a
    batch of patches, however right the rest of the net is. Such a term has no useful gradient, and it would
    make the loss that FedMix's aggregation reads (L_i) about 0.5 on every batch without tumour. A site whose
    kept patches are all benign, as a box or slide-label site's are until the global nets agree on some
    tumour, would then look like the worst-fitted site and take the largest weight. 0 (with a gradient path)
    when no pixel is known."""
    k = known.float()
    if not bool(k.sum() > 0):
        return logits.sum() * 0.0
    p = torch.softmax(logits.float(), 1)[:, 1]
    loss = logits.new_zeros((), dtype=torch.float32)
    present = 0
    for pp, tt in ((p, target), (1 - p, 1 - target)):
        truth = (tt * k).sum()
        if not bool(truth > 0):
            continue
        inter = (pp * tt * k).sum()
        denom = (pp * k).sum() + truth
        loss = loss + 1 - (2 * inter + smooth) / (denom + smooth)
        present += 1
    return loss / present


__all__ = ["KINDS", "Selection", "dice", "masked_dice_loss", "select"]
