"""Hybrid Supervision (Li et al.): EM rounds of pseudo-labels from the model's own maps.

Every ``epochs_per_round`` epochs an E-step maps the training slides with the current model; the M-step
trains on a batch mix of painted pixels, pseudo-labelled malignant patches (clip(Q·V, 0, 1), patches whose
max Q < T skipped) and hard negatives from benign slides, with soft-label BCE. At the end of each round the
stage-2 loss (BCE of the top-K patch mean against slide labels) is the validation loss, so
``best.safetensors`` is the round with the lowest stage-2 loss.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...train.engine import StepOutput, binary_auc
from ..configs import HybridConfig
from ..data import SegSlide
from ..loader import Batch, Patch
from ..maps import compute_map
from ..nets import receptive_margin
from ..sampling import PatchRequest
from .base import SegMethod


class HybridMethod(SegMethod):
    name = "hybrid"
    needs_paint = True

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self._pseudo: dict[int, Any] = {}  # slide index -> zarr map of the last E-step
        self._round = 0
        #: called with a slide id after each E-step (a project run writes the pseudo-label set there)
        self.on_pseudo_labels: Callable[[str], None] | None = None

    def _round_of(self, epoch: int) -> int:
        return (epoch - 1) // max(1, self.config.epochs_per_round) + 1  # type: ignore[attr-defined]

    def _stage_slides(self) -> list[SegSlide]:
        """Stage 2 scores the validation slides, or the training slides when there are none (as Li et al.)."""
        return self.val_slides or self.train_slides

    def e_step(self, epoch: int) -> None:
        """Map every training slide with the current model; the maps are this round's pseudo-labels and
        sampling weights."""
        from ..maps import open_map

        assert self.model is not None
        device = next(self.model.parameters()).device
        was = self.model.training
        self.model.eval()
        root = self.maps_dir or Path(".")
        for i, s in enumerate(self.train_slides):
            out = root / f"{s.slide_id}.zarr" if self.maps_dir is not None else None
            grid = compute_map(self.model, s, self.mpp, tile=self.map_tile,
                               margin=receptive_margin(self.model), device=device, out=out, block=self.block,
                               alpha=self.config.alpha, epoch=epoch - 1)
            if grid is not None:
                self.board.publish(i, grid)
            if out is not None:
                self._pseudo[i] = open_map(out, s, self.mpp, create=False)
                if self.on_pseudo_labels is not None and s.label == 1:
                    self.on_pseudo_labels(s.slide_id)
        self.model.train(was)

    def _soft(self, req: PatchRequest) -> np.ndarray | None:
        store = self._pseudo.get(req.slide)
        if store is None:
            return None
        s = self.train_slides[req.slide]
        d = s.downsample(self.mpp)
        x, y = int(round(req.x0 / d)), int(round(req.y0 / d))
        h, w = store.shape
        out = np.zeros((self.patch, self.patch), np.float32)
        ys, xs = max(0, y), max(0, x)
        ye, xe = min(h, y + self.patch), min(w, x + self.patch)
        if ye > ys and xe > xs:
            out[ys - y:ye - y, xs - x:xe - x] = store.read_block(ys, ye, xs, xe) / 255.0
        from ..losses import hybrid_pseudo_labels

        cfg: HybridConfig = self.config  # type: ignore[assignment]
        pseudo, keep = hybrid_pseudo_labels(torch.from_numpy(out)[None], cfg.threshold, cfg.scale)
        if not bool(keep[0]):
            return np.full(out.shape, np.nan, np.float32)
        return pseudo[0].numpy().astype(np.float32)

    def plan(self, epoch: int, rng: np.random.Generator) -> list[Callable[[], Patch]]:
        cfg: HybridConfig = self.config  # type: ignore[assignment]
        self._epoch = epoch
        r = self._round_of(epoch)
        if r != self._round:
            if r > 1 and self.model is not None:
                self.e_step(epoch)
            self._round = r
        n = cfg.patches_per_epoch
        malignant = [i for i, s in enumerate(self.train_slides) if s.label == 1]
        benign = [i for i, s in enumerate(self.train_slides) if s.label == 0]
        painted = [i for i, s in enumerate(self.train_slides) if s.annotated]
        shares = {"negative": cfg.mix_negative if benign else 0.0,
                  "pseudo": cfg.mix_pseudo if (self._pseudo and malignant) else 0.0,
                  "fine": cfg.mix_fine if painted else 0.0}
        tot = sum(shares.values()) or 1.0
        counts = {k: int(round(n * v / tot)) for k, v in shares.items()}
        jobs: list[Callable[[], Patch]] = []
        q = self.board.q_sums()
        if counts["negative"]:
            w = np.asarray([max(q[i], 1e-12) for i in benign])
            for i in rng.choice(benign, counts["negative"], p=w / w.sum()):
                jobs.append(self._job(self._centre(int(i), rng), "negative", benign_fill=True))
        if counts["pseudo"]:
            for i in rng.choice(malignant, counts["pseudo"]):
                jobs.append(self._job(self._centre(int(i), rng), "pseudo", benign_fill=True, soft=self._soft))
        if counts["fine"]:
            for i in rng.choice(painted, counts["fine"]):
                jobs.append(self._job(self._painted_centre(int(i), rng), "fine", benign_fill=True))
        order = rng.permutation(len(jobs))
        return [jobs[j] for j in order]

    def step(self, model: nn.Module, batch: Batch, device: torch.device) -> StepOutput:
        from ..losses import soft_bce

        t = self._input(model, batch, device)
        logits = model(t["x"])
        target = torch.full(t["labels"].shape, float("nan"), device=device)
        lab = t["labels"]
        target = torch.where(lab >= 0, lab.float(), target)
        if "soft" in t:
            soft = t["soft"]
            use = torch.isfinite(soft) & (lab < 0) & t["tissue"]
            target = torch.where(use, soft, target)
        valid = torch.isfinite(target)
        # BCE on the malignant-vs-benign logit difference (softmax over two classes = sigmoid of it)
        diff = logits[:, 1] - logits[:, 0]
        loss = soft_bce(diff, torch.nan_to_num(target), valid)
        return StepOutput({"bce": loss, "total": loss})

    def evaluate(self, model: nn.Module, device: torch.device) -> tuple[dict[str, float], dict[str, float]] | None:
        """Stage 2 at the end of each round: top-K patch mean as slide score, BCE against slide labels."""
        cfg: HybridConfig = self.config  # type: ignore[assignment]
        epoch = getattr(self, "_epoch", 0)
        if epoch % max(1, cfg.epochs_per_round) and epoch != cfg.epochs:
            return None
        from ..losses import top_k_slide_score

        slides_val = self._val_logits(model, device)
        if not slides_val:
            return None
        scores, labels = [], []
        for label, logits, tissue in slides_val:
            p = torch.softmax(logits, 1)[:, 1]
            p = torch.where(tissue, p, torch.zeros_like(p))
            patch_p = p.flatten(1).amax(1)
            scores.append(top_k_slide_score(patch_p, cfg.top_k))
            labels.append(label)
        s = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in scores]).clamp(1e-6, 1 - 1e-6)
        y = torch.tensor(labels, dtype=torch.float32)
        stage2 = float(F.binary_cross_entropy(s, y))
        return self._with_pixel_dice(({"total": stage2, "stage2": stage2},
                                      {"slide_auc": binary_auc(s, y == 1), "round": float(self._round)}),
                                     model, device)


__all__ = ["HybridMethod"]
