"""Losses for pixel-resolution segmentation trained from slide labels, pseudo labels or mixed labels.

* Pinchaud (2024): slide logits pooled from pixel logits (:func:`slide_logits`), the noise-robust
  generalised KL divergence (:func:`generalised_kl`), the choice of β1 for a target false-positive rate
  (:func:`beta1_from_fpr`) and the whole patch loss (:func:`pinchaud_loss`).
* Hybrid Supervision Learning (Li et al. 2021): E-step pseudo labels (:func:`hybrid_pseudo_labels`),
  the M-step soft-label pixel BCE (:func:`soft_bce`) and the stage-2 slide score (:func:`top_k_slide_score`).
* ConfKD (Liu et al. 2022): cross-entropy + student entropy + teacher→student KL (:func:`confkd_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Pinchaud 2024
# --------------------------------------------------------------------------------------------------


def slide_logits(logits: torch.Tensor, eta: float = 50.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pinchaud's slide-level logits ``(l0, l1)`` from per-pixel 2-class logits.

    ``logits`` is ``(2, H, W)`` for one image or ``(B, 2, H, W)`` for a batch, in which case every image
    (a patch that inherits its slide's label) is pooled on its own: the result is ``(2,)`` or ``(B, 2)``.

    * ``l0`` = mean of the benign logits: a benign slide has *all* its pixels benign.
    * ``l1`` = mean of the malignant logits above their ``(100 − eta)`` percentile, i.e. of the top
      ``k = max(1, ceil(eta/100 · N))`` of the N pixels: a malignant slide needs only *some* malignant
      pixels. ``eta → 0`` gives the max (MIL's definition, but the gradient reaches a single pixel),
      ``eta = 100`` the mean; the paper uses 50. Using a top-k count rather than a strict ``> P``
      threshold is what makes ``eta = 100`` exactly the mean, as the paper states, and keeps ties stable.

    ``mask`` (``(H, W)`` or ``(B, H, W)``, bool) restricts both means to tissue pixels; an image with no
    masked pixel raises ValueError (it has no slide logit). Differentiable (top-k passes gradients to the
    selected pixels).
    """
    if not 0.0 <= eta <= 100.0:
        raise ValueError(f"eta is a percentage in [0, 100], got {eta}")
    single = logits.dim() == 3
    if single:
        logits = logits[None]
        mask = None if mask is None else mask[None]
    if logits.dim() != 4 or logits.shape[1] != 2:
        raise ValueError(f"expected (2, H, W) or (B, 2, H, W) logits, got shape {tuple(logits.shape)}")
    b = logits.shape[0]
    l0_pix = logits[:, 0].reshape(b, -1)
    l1_pix = logits[:, 1].reshape(b, -1)
    if mask is None:
        m = torch.ones_like(l0_pix, dtype=torch.bool)
    else:
        m = mask.to(torch.bool).expand(b, *logits.shape[-2:]).reshape(b, -1)
    n = m.sum(dim=1)
    if bool((n == 0).any()):
        raise ValueError("an image has no pixel inside the mask: its slide logits are undefined")
    nf = n.to(logits.dtype)
    l0 = torch.where(m, l0_pix, torch.zeros_like(l0_pix)).sum(dim=1) / nf
    k = torch.clamp(torch.ceil(nf * (eta / 100.0)), min=1).to(torch.long)  # (B,), each ≤ n
    kmax = int(k.max())
    top = torch.where(m, l1_pix, torch.full_like(l1_pix, -torch.inf)).topk(kmax, dim=1).values
    keep = torch.arange(kmax, device=logits.device)[None] < k[:, None]
    l1 = torch.where(keep, top, torch.zeros_like(top)).sum(dim=1) / k.to(logits.dtype)
    out = torch.stack([l0, l1], dim=1)
    return out[0] if single else out


def _beta_tensor(beta: float | Sequence[float] | torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    bt = torch.as_tensor(beta, dtype=like.dtype, device=like.device)
    if bt.dim() == 1:  # one β per class along ``dim``
        shape = [1] * like.dim()
        shape[dim] = bt.shape[0]
        bt = bt.reshape(shape)
    if bool((bt > 1).any()):
        raise ValueError(
            "every beta_i must be <= 1: for beta_i > 1 the p_i -> 0 limit of L_beta diverges to -inf, "
            "so the loss is no longer a divergence (unbounded below)"
        )
    return bt


def generalised_kl(p: torch.Tensor, q: torch.Tensor, beta: float | Sequence[float] | torch.Tensor,
                   *, log_q: bool = False, dim: int = -1) -> torch.Tensor:
    """Pinchaud's generalised KL ``L_β(p‖q) = −Σ_i p_i/β_i [(q_i/p_i)^β_i − 1]``, summed over ``dim``.

    ``p`` is the target distribution, ``q`` the model's (pass log-probabilities with ``log_q=True``, e.g.
    ``log_softmax`` output: that is the stable path). ``beta`` is a scalar or one value per class.

    Computed per term as ``−p_i · expm1(β_i x_i)/β_i`` with ``x_i = log q_i − log p_i``: ``expm1`` keeps full
    precision as β_i → 0, and β_i == 0 uses the limit ``−p_i x_i`` exactly, so ``L_0`` is the KL divergence
    and L_β is continuous in β at 0.

    Terms with ``p_i = 0`` contribute 0. That is the limit p_i → 0 for β_i < 1. At β_i = 1 the pointwise
    limit would be ``−q_i``; we keep the value the β_i → 1⁻ limit gives (0), because it is the one section
    3.1.1 of the paper assumes: there the gradient of the trivial model carries no term from the malignant
    class of benign samples. With it, ``(β0, β1) = (0, 1)`` (the paper's setting) is ``−log q0`` for a benign
    target and the MAE-like ``1 − q1`` for a malignant one, whose bounded slope is what tolerates malignant
    labels on benign patches; with ``−q_i`` instead, β1 = 1 would have the same trivial-model optimum as KL.
    With this convention L_β ≥ 0 for every β_i ≤ 1, with equality iff p = q for β_i < 1 (paper, §3.1).
    β_i > 1 raises ValueError.
    """
    bt = _beta_tensor(beta, p, dim)
    logq = q if log_q else torch.log(q)
    pos = p > 0
    p_safe = torch.where(pos, p, torch.ones_like(p))
    x = logq - torch.log(p_safe)
    zero_beta = bt == 0
    b_safe = torch.where(zero_beta, torch.ones_like(bt), bt)
    g = torch.where(zero_beta, x, torch.expm1(b_safe * x) / b_safe)
    terms = torch.where(pos, -p_safe * g, torch.zeros_like(g))
    return terms.sum(dim=dim)


def beta1_from_fpr(gamma: float, r: float = 0.5, theta0: float = 0.05, beta0: float = 0.0) -> float:
    """β1 that makes the optimum of Pinchaud's trivial model call a benign pixel malignant with
    probability ``theta0`` (section 3.1.1).

    Setting: a malignant slide's (one-pixel) patch is benign with probability ``gamma`` (label noise), a
    benign slide's always; ``r`` = P(benign slide); the model says malignant with probability θ0 on a benign
    pixel. The expected loss ``r·L_β((1,0)‖(1−θ0, θ0)) + (1−r)γ·L_β((0,1)‖(1−θ0, θ0))`` (+ terms free of θ0)
    has derivative in θ0 (the paper writes it with the opposite overall sign, which moves no zero)

        r (1 − θ0)^(β0 − 1) − (1 − r) γ θ0^(β1 − 1),

    which vanishes when ``(β1 − 1) log θ0 = (β0 − 1) log(1 − θ0) − log((1 − r)γ / r)``, i.e. the paper's

        β1 = [ (β0 − 1) log(1 − θ0) − log((1 − r) γ / r) ] / log θ0 + 1.

    Paper's numbers: r = 1/2, β0 = 0, γ = 33 %, θ0 = 5 % → β1 ≈ 0.61. For comparison KL (β = 0) puts the
    optimum at θ0 = (1−r)γ / ((1−r)γ + r) = γ/(1+γ) ≈ 0.25 for r = 1/2 (the "1/(1 + 1/γ)" of the paper).
    As θ0 → 0, β1 → 1 (the paper's experimental setting). A θ0 above the KL optimum gives β1 < 0.
    """
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma (P(benign patch | malignant slide)) must be in (0, 1), got {gamma}")
    if not 0.0 < r < 1.0:
        raise ValueError(f"r (fraction of benign slides) must be in (0, 1), got {r}")
    if not 0.0 < theta0 < 1.0:
        raise ValueError(f"theta0 (target false-positive probability) must be in (0, 1), got {theta0}")
    return ((beta0 - 1.0) * math.log1p(-theta0) - math.log((1.0 - r) * gamma / r)) / math.log(theta0) + 1.0


def pinchaud_loss(pixel_logits: torch.Tensor, slide_label: torch.Tensor | int, eta: float = 50.0,
                  beta: float | Sequence[float] | torch.Tensor = (0.0, 1.0),
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pinchaud's patch loss: ``L_β(p‖q)`` averaged over the batch.

    ``pixel_logits`` (B, 2, H, W); each patch carries the label of its slide (``slide_label``, (B,) or an
    int: 0 benign, 1 malignant). p = one-hot slide label (the "true distribution"), q = softmax of
    :func:`slide_logits` (the model's distribution). Defaults are the paper's: β = (0, 1), η = 50 %.
    """
    return slide_loss(slide_logits(pixel_logits, eta, mask), slide_label, beta)


def slide_loss(sl: torch.Tensor, slide_label: torch.Tensor | int,
               beta: float | Sequence[float] | torch.Tensor = (0.0, 1.0)) -> torch.Tensor:
    """:func:`pinchaud_loss` from slide logits already pooled ((2,) or (B, 2)), for callers that also need them."""
    if sl.dim() == 1:
        sl = sl[None]
    label = torch.as_tensor(slide_label, device=sl.device).to(torch.long).reshape(-1)
    label = label.expand(sl.shape[0])
    p = F.one_hot(label, 2).to(sl.dtype)
    return generalised_kl(p, F.log_softmax(sl, dim=1), beta, log_q=True, dim=1).mean()


# --------------------------------------------------------------------------------------------------
# Hybrid Supervision Learning (Li et al. 2021)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def hybrid_pseudo_labels(prob: torch.Tensor, T: float = 0.4, V: float = 4.0, *,
                         positive: bool | torch.Tensor = True,
                         floor: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """E-step pseudo labels of Hybrid Supervision Learning from the predicted tumour probabilities.

    ``prob`` (B, H, W) (or (B, 1, H, W)): one tile per row. Returns ``(pseudo, keep)``:

    * ``keep`` (B,) bool: tiles whose max probability is ≥ T. Tiles the model is sure are empty teach
      nothing new and are dropped, for positive and negative slides alike (on negative slides this keeps
      the hard negatives).
    * ``pseudo`` (same shape as ``prob``): on positive slides ``min(prob·V, 1)``, set to 0 where
      ``prob·V < floor`` — V boosts the under-confident tumour pixels towards 1 and the floor keeps true
      negatives at 0 after that scaling; on negative slides 0 everywhere (a negative slide has no tumour).

    ``positive`` is a bool for the whole batch or a (B,) bool tensor. No gradient: these are targets.
    """
    b = prob.shape[0]
    keep = prob.reshape(b, -1).amax(dim=1) >= T
    pseudo = (prob * V).clamp(max=1.0)
    pseudo = torch.where(pseudo < floor, torch.zeros_like(pseudo), pseudo)
    pos = torch.as_tensor(positive, device=prob.device, dtype=torch.bool).reshape(-1).expand(b)
    pos = pos.reshape(b, *([1] * (prob.dim() - 1)))
    pseudo = torch.where(pos, pseudo, torch.zeros_like(pseudo))
    return pseudo, keep


def _binary_logit(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if logits.shape == target.shape:
        return logits
    if logits.dim() == target.dim() + 1 and logits.shape[1] == 2:
        # softmax over 2 classes: P(1) = sigmoid(l1 − l0)
        return logits[:, 1] - logits[:, 0]
    if logits.dim() == target.dim() + 1 and logits.shape[1] == 1:
        return logits[:, 0]
    raise ValueError(f"logits {tuple(logits.shape)} do not match target {tuple(target.shape)}")


def soft_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel BCE against soft labels in [0, 1] (HSL's M-step loss), mean over the pixels that count.

    ``logits`` is either one tumour logit per pixel (same shape as ``target``) or 2-class logits
    ``(B, 2, H, W)`` for a ``(B, H, W)`` target (then P(tumour) = sigmoid(l1 − l0), the 2-class softmax).
    ``weight`` (same shape as ``target``; bool or float) is 0 on ignored pixels (no label, dropped tiles);
    a batch where nothing counts gives 0 (still connected to the graph).
    """
    z = _binary_logit(logits, target)
    loss = F.binary_cross_entropy_with_logits(z, target.to(z.dtype), reduction="none")
    if weight is None:
        return loss.mean()
    w = weight.to(z.dtype)
    return (loss * w).sum() / w.sum().clamp(min=1e-12)


def top_k_slide_score(patch_probs: torch.Tensor, k: int, rank_by: torch.Tensor | None = None) -> torch.Tensor:
    """HSL stage 2: a slide's score is the mean probability of its top-K patches.

    ``patch_probs`` (N,) or (B, N) (one slide per row); K is capped at N so small slides still score.
    HSL selects the K patches by the segmentation net's maximum pixel probability and averages the
    classifier's probabilities on them: pass the former as ``rank_by`` (same shape) to do exactly that;
    by default the patches are ranked by ``patch_probs`` itself. Differentiable in ``patch_probs``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if patch_probs.shape[-1] == 0:
        raise ValueError("a slide with no patch has no score")
    kk = min(k, patch_probs.shape[-1])
    if rank_by is None:
        return patch_probs.topk(kk, dim=-1).values.mean(dim=-1)
    if rank_by.shape != patch_probs.shape:
        raise ValueError(f"rank_by {tuple(rank_by.shape)} must have the shape of patch_probs "
                         f"{tuple(patch_probs.shape)}")
    idx = rank_by.topk(kk, dim=-1).indices
    return patch_probs.gather(-1, idx).mean(dim=-1)


# --------------------------------------------------------------------------------------------------
# ConfKD (Liu, Desrosiers, Ben Ayed, Dolz 2022)
# --------------------------------------------------------------------------------------------------


def _masked_ce(logits: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean CE over labelled pixels (label != -1) of the selected images; 0 if there are none."""
    lab = torch.where(images[:, None, None], labels, torch.full_like(labels, -1))
    if not bool((lab >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, lab, ignore_index=-1)


def _masked_mean(per_pixel: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    if not bool(images.any()):
        return per_pixel.sum() * 0.0
    return per_pixel[images].mean()


def confkd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor,
                labelled_mask: torch.Tensor, weak_mask: torch.Tensor, w_ce: float = 1.0,
                w_weak_ce: float = 1.0, w_ent: float = 0.1, w_kl: float = 1.0, temperature: float = 1.0,
                detach_teacher: bool = True) -> dict[str, torch.Tensor]:
    """ConfKD's mixed-supervision loss for :class:`~napari_wsimil.seg.nets.DualDecoderNet` outputs.

    Inputs: logits ``(B, C, H, W)`` from both branches; ``labels`` (B, H, W) long, -1 where unknown;
    ``labelled_mask`` (B,) bool: images with strong (dense) labels; ``weak_mask`` (B,) bool: images with
    weak labels only (their few labelled pixels, if any, are marked in ``labels``).

    Components (each ≥ 0, means over pixels):

    * ``ce_teacher``: CE of the teacher on the labelled pixels of strongly labelled images;
    * ``ce_student``: partial CE of the student on the labelled pixels of weakly labelled images;
    * ``entropy``: Shannon entropy of the student on weakly labelled images — pushes it to be confident
      where no label says what to be confident about;
    * ``kl``: KL(teacher ‖ student) per pixel on every image, at ``temperature`` (scaled by T², the usual
      distillation convention, so the gradient scale does not depend on T) — the teacher's predictions
      anchor the entropy term, which on its own has trivial confident solutions.

    ``total = w_ce·ce_teacher + w_weak_ce·ce_student + w_ent·entropy + w_kl·kl``.

    Teacher detached (default): the paper describes the KL as transferring the strongly supervised branch's
    knowledge *to* the student, so the teacher is the target and only the student (and, through it, the
    shared encoder) moves; without the detach the KL would also pull the teacher towards the less reliable
    student. The predecessor's public code (josedolz/MSL-student-becomes-master) does not detach; set
    ``detach_teacher=False`` for that. Defaults: ConfKD's weights are not published; w_ent = 0.1 keeps the
    entropy term weaker than the KL anchor early in training (with w_kl = 1 and w_ent comparable or larger,
    the student can collapse to confident single-class maps before it has learnt anything).
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher {tuple(teacher_logits.shape)} and student {tuple(student_logits.shape)} differ")
    strong = labelled_mask.to(torch.bool).reshape(-1)
    weak = weak_mask.to(torch.bool).reshape(-1)
    labels = labels.to(torch.long)

    ce_teacher = _masked_ce(teacher_logits, labels, strong)
    ce_student = _masked_ce(student_logits, labels, weak)

    log_s = F.log_softmax(student_logits, dim=1)
    ent = -(log_s.exp() * log_s).sum(dim=1)  # (B, H, W)
    entropy = _masked_mean(ent, weak)

    t = teacher_logits.detach() if detach_teacher else teacher_logits
    log_pt = F.log_softmax(t / temperature, dim=1)
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean() * temperature**2

    total = w_ce * ce_teacher + w_weak_ce * ce_student + w_ent * entropy + w_kl * kl
    return {"ce_teacher": ce_teacher, "ce_student": ce_student, "entropy": entropy, "kl": kl, "total": total}
