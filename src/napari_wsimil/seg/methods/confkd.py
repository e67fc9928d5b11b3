"""ConfKD (Liu et al. 2022): a teacher decoder on labelled pixels distils into a student on weak ones.

Labelled patches (painted pixels, and benign slides, all of whose pixels are benign) train the teacher
decoder; weakly labelled malignant patches train the student through entropy and KL(teacher ‖ student).
Maps come from the student by default.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ...train.engine import StepOutput
from ..configs import ConfKDConfig
from ..loader import Batch, Patch
from .base import SegMethod


class ConfKDMethod(SegMethod):
    name = "confkd"
    dual = True
    needs_paint = True

    def plan(self, epoch: int, rng: np.random.Generator) -> list[Callable[[], Patch]]:
        n = self.config.patches_per_epoch
        painted = [i for i, s in enumerate(self.train_slides) if s.annotated]
        benign = [i for i, s in enumerate(self.train_slides) if s.label == 0]
        weak = [i for i, s in enumerate(self.train_slides) if s.label == 1 and not s.annotated] or \
               [i for i, s in enumerate(self.train_slides) if s.label == 1]
        jobs: list[Callable[[], Patch]] = []
        n_fine, n_neg = n // 4, n // 4
        for i in rng.choice(painted, n_fine):
            jobs.append(self._job(self._painted_centre(int(i), rng), "fine", benign_fill=True))
        if benign:
            for i in rng.choice(benign, n_neg):
                jobs.append(self._job(self._centre(int(i), rng), "negative", benign_fill=True))
        for i in rng.choice(weak, n - len(jobs)):
            jobs.append(self._job(self._centre(int(i), rng), "weak", benign_fill=False))
        order = rng.permutation(len(jobs))
        return [jobs[j] for j in order]

    def forward_eval(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        teacher, student = model(x)
        return student if self.config.predict_with == "student" else teacher  # type: ignore[attr-defined]

    def step(self, model: nn.Module, batch: Batch, device: torch.device) -> StepOutput:
        from ..losses import confkd_loss

        cfg: ConfKDConfig = self.config  # type: ignore[assignment]
        t = self._input(model, batch, device)
        teacher, student = model(t["x"])
        labels = t["labels"]
        c = self.context
        if c:  # the entropy and KL terms cover every pixel: keep those of the patch, not of its context
            teacher, student, labels = (a[..., c:a.shape[-2] - c, c:a.shape[-1] - c] for a in (teacher, student, labels))
        labelled = torch.tensor([k != "weak" for k in batch.kinds], device=device)
        weak = ~labelled
        parts = confkd_loss(teacher, student, labels, labelled, weak, w_ce=cfg.w_ce, w_ent=cfg.w_ent,
                            w_kl=cfg.w_kl)
        return StepOutput(dict(parts))


__all__ = ["ConfKDMethod"]
