"""Pinchaud (2024): slide labels only, with maps of the last epoch's weights choosing the next patches.

Patches inherit their slide's label; per patch, slide logits (mean benign logit, mean of the top-η %
malignant logits) go through the generalised KL. A :class:`~..mapper.MappingWorker` recomputes maps with the
weights of the last epoch while the trainer trains; each epoch's patches are drawn from the latest maps
(:mod:`..sampling`). Painted pixels, where a slide has them, add cross-entropy (``w_pixel``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ...train.engine import StepOutput
from ..configs import PinchaudConfig
from ..loader import Batch, Patch, PatchBatches
from ..nets import receptive_margin
from ..sampling import PatchRequest, plan_epoch
from .base import SegMethod, poolable_logits


class PinchaudMethod(SegMethod):
    name = "pinchaud"
    map_age = float("nan")  # see _note_map_age
    map_unmapped = 1.0

    def batches(self, epoch: int, rng: np.random.Generator) -> PatchBatches:
        import time

        cfg: PinchaudConfig = self.config  # type: ignore[assignment]
        if cfg.dynamic_sampling and self.model is not None:
            if self.mapper is None:
                from ..mapper import MappingWorker

                device = next(self.model.parameters()).device
                # with sync_maps the trainer waits while the worker maps: the worker may have every core
                threads = cfg.map_threads or ((os.cpu_count() or 1) if cfg.sync_maps else 0)
                self.mapper = MappingWorker(self.model, self.train_slides, self.board, mpp=self.mpp,
                                            maps_dir=self.maps_dir, device=device, tile=self.map_tile,
                                            margin=receptive_margin(self.model),
                                            revisit_epochs=cfg.revisit_epochs, seed=cfg.seed,
                                            threads=threads).start()
                self._t0 = time.perf_counter()
            self.mapper.update_weights(self.model.state_dict(), epoch - 1)
            if cfg.sync_maps:
                self.mapper.wait_all(epoch - 1)
            elif epoch > 1 + cfg.map_staleness:
                # Wait for fresh maps only within the waiting budget: when mapping is much slower than training
                # (big slides on a CPU), the trainer goes on with older maps rather than stall (Pinchaud's
                # mapper and trainer never wait for each other; the budget allows a little freshness).
                budget = cfg.max_map_wait * (time.perf_counter() - self._t0) - self.mapper.wait_seconds
                self.mapper.check()
                if budget > 0:
                    self.mapper.wait_for(epoch - 1, cfg.map_staleness, timeout=budget)
        return super().batches(epoch, rng)

    def plan(self, epoch: int, rng: np.random.Generator) -> list[Callable[[], Patch]]:
        reqs = plan_epoch(self.train_slides, self.board, self.scheduler, self.config.patches_per_epoch, self.patch,
                          self.mpp, epoch, rng)
        self._note_map_age(epoch, reqs)
        return [self._job(r, "weak", benign_fill=False) for r in reqs]

    def _note_map_age(self, epoch: int, reqs: Sequence[PatchRequest]) -> None:
        """How old (in epochs of training) the maps this epoch's patches were drawn from are: what not
        waiting for the mapper costs. Patches from slides not yet mapped count apart (``map_unmapped``)."""
        grids = [self.board.get(r.slide) for r in reqs]
        ages = [epoch - 1 - g.epoch for g in grids if g.version > 0]
        self.map_age = float(np.mean(ages)) if ages else float("nan")
        self.map_unmapped = 1.0 - len(ages) / max(1, len(grids))

    def step(self, model: nn.Module, batch: Batch, device: torch.device) -> StepOutput:
        from ..losses import slide_logits, slide_loss

        cfg: PinchaudConfig = self.config  # type: ignore[assignment]
        t = self._input(model, batch, device)
        logits = model(t["x"])
        sl = slide_logits(poolable_logits(logits, cfg), cfg.eta, mask=t["tissue"])
        weak = slide_loss(sl, t["slide"], (cfg.beta0, cfg.beta1))
        with torch.no_grad():
            q = torch.softmax(sl.detach().float(), -1)
        preds = [(q[i], int(t["slide"][i])) for i in range(len(q))]
        losses = {"weak": weak}
        total = weak
        if cfg.w_pixel > 0 and (t["labels"] >= 0).any():
            ce = self.pixel_ce(logits, t["labels"])
            losses["pixel"] = ce
            total = total + cfg.w_pixel * ce
        losses["total"] = total
        return StepOutput(losses, preds)


__all__ = ["PinchaudMethod"]
