"""The ZoomMIL network (Thandiackal 2022): gated-attention MIL at each magnification, plus zoom heads that
choose which patches to look at more closely.

Per level l: ``Linear(D, hidden)-ReLU-Dropout`` and gated attention pool that level's rows into ``M_l``.
The low and middle levels have a second gated-attention head, the *zoom* head; the perturbed top-K of its
softmax picks K rows, and the next level's rows are the children of those (soft mixtures while training,
exactly those patches in evaluation). The slide embedding is ``M_1 + M_2 + ... `` and ``Linear(hidden, C)``
classifies it.

Why a ``fetch`` callback: in training every level's features are in the bag; in prediction only the
lowest level is, and the children of the chosen patches are read and encoded from the slide on demand.
The network asks ``fetch(level, rows)`` for exactly the rows it needs (depth-first numbering: the r
children of row j are rows ``[r·j, r·j + r)``), so both paths run the same code, and the prediction
encodes only what the model zooms into.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.attention import GatedAttention
from .topk import perturbed_topk

Fetch = Callable[[int, torch.Tensor], torch.Tensor]
#: Which scores choose the patches to zoom into: "zoom", the auxiliary zoom head of each lower level (the
#: reference code), or "attention", the level's own attention (the poster: "the K patches with the highest
#: attention weights"), which the slide loss trains directly.
ZOOM_ON = ("zoom", "attention")


@dataclass
class ZoomOutput:
    """One slide's forward pass: ``logits`` (C,); per level, the bag rows its attention covers (``rows``,
    global row ids of that level; in training the mixtures' parents) and the attention (softmax over them);
    per zoom step, the rows selected for zooming (``selected``: the hard top-K in evaluation)."""

    logits: torch.Tensor
    rows: list[torch.Tensor] = field(default_factory=list)
    attention: list[torch.Tensor] = field(default_factory=list)
    selected: list[torch.Tensor] = field(default_factory=list)
    fetched: int = 0  # rows fetched from the levels above the lowest (what a prediction reads and encodes)


class ZoomMILNet(nn.Module):
    """See the module doc; ``ratios[l]`` is the magnification step from level l to l+1 (children r = ratio²)."""

    def __init__(self, in_dim: int, n_classes: int, ratios: Sequence[int], hidden: int = 512,
                 attn_hidden: int = 256, dropout: float = 0.25, k: int = 12, num_samples: int = 100,
                 sigma: float = 0.002, sigma_spread: float = 0.0, baseline: bool = False,
                 zoom_on: str = "zoom"):
        super().__init__()
        if n_classes < 2:
            raise ValueError("a slide classifier needs at least 2 classes")
        if k < 1:
            raise ValueError(f"K (patches to zoom into per level) must be at least 1, got {k}")
        self.in_dim, self.n_classes, self.ratios = in_dim, n_classes, [int(r) for r in ratios]
        if zoom_on not in ZOOM_ON:
            raise ValueError(f"zoom_on must be one of {', '.join(ZOOM_ON)}, not {zoom_on!r}")
        self.k, self.num_samples, self.sigma = int(k), int(num_samples), float(sigma)
        self.sigma_spread, self.baseline, self.zoom_on = float(sigma_spread), bool(baseline), zoom_on
        n_levels = len(self.ratios) + 1
        self.fc = nn.ModuleList(nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
                                for _ in range(n_levels))
        self.att = nn.ModuleList(GatedAttention(hidden, attn_hidden, 1, dropout) for _ in range(n_levels))
        self.zoom = nn.ModuleList(GatedAttention(hidden, attn_hidden, 1, dropout) for _ in range(n_levels - 1))
        self.classifier = nn.Linear(hidden, n_classes)
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))

    def set_input_scaling(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise every level's features with the training bags' moments (saved with the weights)."""
        self.input_mean.copy_(mean.reshape(-1))
        self.input_std.copy_(torch.clamp(std.reshape(-1), min=1e-6))

    def noise_scale(self, scores: torch.Tensor) -> float:
        """The top-K's sigma for one bag's (softmaxed) zoom scores: ``sigma``, or with ``sigma_spread`` > 0 that
        many standard deviations of the scores. Why: softmax scores of a bag of N patches are about 1/N, so a
        fixed sigma (0.002, set for the reference's bags) is far below the gaps between the scores of a small
        bag (N ≈ 16 gives gaps of ~0.01–0.05): every draw then picks the same patches and the zoom head gets no
        signal. Tied to the spread, the perturbation always reaches the patches around the K-th score."""
        if self.sigma_spread <= 0 or scores.numel() < 2:
            return self.sigma
        return max(self.sigma_spread * float(scores.detach().std()), 1e-8)

    def _pool(self, level: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.fc[level]((x - self.input_mean) / self.input_std)
        a = torch.softmax(self.att[level](h)[0], 0)
        return h, a, a @ h

    def forward(self, level0: torch.Tensor, fetch: Fetch) -> ZoomOutput:
        """``level0`` (N, D): the lowest level's features; ``fetch(level, rows)`` the given rows of a higher
        level as (len(rows), D) on the same device."""
        dev = level0.device
        n0 = level0.shape[0]
        h, a, m = self._pool(0, level0)
        out = ZoomOutput(level0.new_zeros(self.n_classes), [torch.arange(n0, device=dev)], [a])
        embedding = m
        # weights of the current rows over bag rows `ids` of the current level (identity at level 0)
        weights: torch.Tensor | None = None
        ids = torch.arange(n0, device=dev)
        for step, ratio in enumerate(self.ratios):
            r = ratio * ratio
            # the zoom scores: the auxiliary zoom head's (the reference's), or the level's own attention
            z = torch.softmax(self.zoom[step](h)[0], 0) if self.zoom_on == "zoom" else a
            sel = perturbed_topk(z, self.k, num_samples=self.num_samples, sigma=self.noise_scale(z),
                                 training=self.training, baseline=self.baseline)  # (K, n_rows)
            over = sel if weights is None else sel @ weights  # (K, len(ids)): over bag rows of this level
            used = torch.nonzero(over.detach().abs().sum(0) > 0).reshape(-1)
            parents = ids[used]
            out.selected.append(parents)
            child_ids = (parents[:, None] * r + torch.arange(r, device=dev)[None, :]).reshape(-1)
            feats = fetch(step + 1, child_ids).reshape(len(parents), r, -1)
            out.fetched += int(child_ids.numel())
            sub = over[:, used]  # (K, P)
            x = torch.einsum("kp,prd->krd", sub, feats).reshape(sub.shape[0] * r, -1)
            eye = torch.eye(r, device=dev, dtype=sub.dtype)
            weights = torch.einsum("kp,cd->kcpd", sub, eye).reshape(sub.shape[0] * r, len(parents) * r)
            ids = child_ids
            h, a, m = self._pool(step + 1, x)
            embedding = embedding + m
            out.rows.append(ids)
            # the attention of each child row: mixtures' attention spread over their parents' children
            out.attention.append(a @ weights)
        out.logits = self.classifier(embedding)
        return out


def full_bag_fetch(levels: Sequence[torch.Tensor]) -> Fetch:
    """``fetch`` over a bag whose every level is in memory (training, and tests)."""

    def fetch(level: int, rows: torch.Tensor) -> torch.Tensor:
        return levels[level][rows]

    return fetch


__all__ = ["ZOOM_ON", "Fetch", "ZoomMILNet", "ZoomOutput", "full_bag_fetch"]
