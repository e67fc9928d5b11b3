"""Pseudo-labels and "where to label next" from a MIL model's per-patch scores.

The correction loop: the model says which patches look like tumour; those become an editable label image
at the project's label resolution (tumour / normal / unknown); the pathologist fixes what is wrong with a
brush; the fixed pixels become strong labels (MS-CLAM tile labels) for the next round.

Per-patch tumour probability, the best the model offers:

* CLAM-SB / MS-CLAM / CLAM-MB: the instance classifier of the predicted class (trained to separate that
  class's evidence from the rest), ``softmax(...)[:, 1]``;
* ABMIL (no instance head): attention percentile within the slide × P(tumour slide), so a benign call
  keeps its attention peaks low.

Uncertainty is the binary entropy of that probability: highest where the model cannot tell.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PatchScores:
    """One slide's per-patch tumour probabilities and what they came from."""

    coords: np.ndarray  # (N, 2) level-0 x, y
    size_level0: float
    p_tumour: np.ndarray  # (N,) in [0, 1]
    slide_probs: np.ndarray  # (C,)
    source: str  # "instance classifier" or "attention x slide probability"


def patch_tumour_probability(model: object, features: np.ndarray, device: object = "cpu") -> tuple[np.ndarray, np.ndarray, str]:
    """(p_tumour (N,), slide probabilities (C,), source) of one bag, model in eval mode."""
    import torch
    import torch.nn.functional as F

    from .heatmap import percentile_scores

    x = torch.as_tensor(np.asarray(features, np.float32)).to(device)
    with torch.no_grad():
        out = model(x)  # type: ignore[operator]
        probs = F.softmax(out.logits, 0).double().cpu().numpy()
        heads = getattr(model, "instance_classifiers", None)
        if heads is not None and len(heads) > 0:
            h = model._pool(x)[0]  # type: ignore[attr-defined]
            k = int(probs.argmax())
            head = heads[min(k, len(heads) - 1)] if len(heads) > 1 else heads[0]
            p = F.softmax(head(h), 1)[:, 1].double().cpu().numpy()
            if len(heads) > 1 and k == 0:  # predicted normal: class 0's evidence is not tumour
                p = 1.0 - p
            return p, probs, "instance classifier"
        att = out.attention.float().cpu().numpy()
    a = att[min(int(probs.argmax()), len(att) - 1)]
    return percentile_scores(a).astype(np.float64) * (1.0 - float(probs[0])), probs, \
        "attention x slide probability"


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of Bernoulli(p): 1 at p = 0.5, 0 at 0 and 1."""
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def pseudo_label_image(scores: PatchScores, shape: tuple[int, int], downsample: float, tumour_id: int,
                       normal_id: int, high: float = 0.7, low: float = 0.3) -> np.ndarray:
    """uint8 (H, W) label image at ``downsample`` level-0 px per pixel: patches with p ≥ ``high`` are
    ``tumour_id``, p ≤ ``low`` ``normal_id``, the rest 0 (unknown: not confident enough to teach with).
    Overlapping patches: tumour wins, so a confident detection is never hidden by a neighbour."""
    out = np.zeros(shape, np.uint8)
    ds = float(downsample)
    for value, sel in ((normal_id, scores.p_tumour <= low), (tumour_id, scores.p_tumour >= high)):
        for x, y in scores.coords[sel]:
            c0, r0 = int(x // ds), int(y // ds)
            c1 = max(c0 + 1, int(np.ceil((x + scores.size_level0) / ds)))
            r1 = max(r0 + 1, int(np.ceil((y + scores.size_level0) / ds)))
            out[max(r0, 0):min(r1, shape[0]), max(c0, 0):min(c1, shape[1])] = value
    return out


def suggest_regions(scores: PatchScores, k: int = 10, min_distance_patches: float = 2.0) -> np.ndarray:
    """The ``k`` most uncertain patches, spread out: (k, 3) of (x, y, entropy) at patch centres, by greedy
    non-maximum suppression so that ten suggestions are ten places, not one blob."""
    from .localisation import candidates_from_scores

    ent = binary_entropy(scores.p_tumour)
    return candidates_from_scores(scores.coords, scores.size_level0, ent,
                                  min_distance_patches * scores.size_level0, max_candidates=k)


def corrections(pseudo: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """Pixels the user changed: the edited value where it differs from the pseudo-label, else 0 —
    exactly what should be saved as strong labels (untouched pseudo-labels stay pseudo)."""
    pseudo, edited = np.asarray(pseudo), np.asarray(edited)
    if pseudo.shape != edited.shape:
        raise ValueError(f"pseudo-labels {pseudo.shape} and edited labels {edited.shape} differ in shape")
    return np.where(edited != pseudo, edited, 0).astype(np.uint8)


__all__ = ["PatchScores", "binary_entropy", "corrections", "patch_tumour_probability", "pseudo_label_image",
           "suggest_regions"]
