"""Differentially private local training at a site: DP-SGD (Abadi 2016) with Opacus, one slide per example.

Why per slide and not per patch: a patient is a slide; the guarantee must cover one whole slide being in or
out of the site's data. Opacus's hooks would take the patches of a bag (N, D) for N examples, so the per-slide
gradient is computed here with one backward pass per slide and handed to Opacus's ``DPOptimizer`` as the
per-sample gradient (``grad_sample``), which clips each to ``clip``, adds N(0, (σ·clip)²) noise to their sum
and divides by the expected batch. Steps draw slides by Poisson sampling (each slide independently with
probability q), the sampling Opacus's RDP accountant assumes. σ is chosen once, so that all the rounds'
steps together spend the site's (ε, δ); the accountant's history lives in the site's work folder (a ClientApp
is a new process every round), so the spent ε after each round is exact, including after a rejoin.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import WsimilError
from ..io.atomic import write_text


@dataclass
class DPPlan:
    """The noise of a site's DP-SGD: σ for the whole federation, the sampling rate and the steps per round."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int


def plan(n_slides: int, epsilon: float, delta: float, batch: int, rounds: int, local_epochs: int) -> DPPlan:
    """σ such that ``rounds·local_epochs`` epochs of Poisson-sampled steps spend (ε, δ) under RDP accounting."""
    from opacus.accountants.utils import get_noise_multiplier

    if n_slides < 1:
        raise WsimilError("DP-SGD needs at least one training slide")
    q = min(1.0, batch / n_slides)
    steps = max(1, math.ceil(n_slides / batch)) * local_epochs
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q,
                                 steps=steps * rounds, accountant="rdp")
    return DPPlan(float(sigma), q, steps)


class Ledger:
    """The site's spent privacy: Opacus's RDP accountant, its history kept in a JSON file."""

    def __init__(self, path: Path):
        from opacus.accountants import RDPAccountant

        self.path = Path(path)
        self.accountant = RDPAccountant()
        if self.path.is_file():
            self.accountant.history = [tuple(h) for h in json.loads(self.path.read_text())["history"]]

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        for _ in range(steps):
            self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        return float(self.accountant.get_epsilon(delta)) if self.accountant.history else 0.0

    def save(self) -> None:
        write_text(self.path, json.dumps({"history": [list(h) for h in self.accountant.history]}))


def dp_train(method: Any, model: nn.Module, dp: DPPlan, clip: float, batch: int, lr: float, weight_decay: float,
             rng: np.random.Generator, device: torch.device, optimizer: str = "adam") -> dict[str, float]:
    """``dp.steps_per_round`` DP-SGD steps of ``method`` (a MILMethod: its bags and loss) on ``model``; returns
    the mean training loss and the share of slides whose gradient was clipped."""
    from opacus.optimizers import DPOptimizer

    from ..train.engine import make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    opt = DPOptimizer(make_optimizer(optimizer, params, lr, weight_decay), noise_multiplier=dp.noise_multiplier,
                      max_grad_norm=clip, expected_batch_size=batch)
    data = method.train_data
    model.train()
    losses: list[float] = []
    clipped = seen = 0
    for _ in range(dp.steps_per_round):
        picked = np.flatnonzero(rng.random(len(data)) < dp.sample_rate)
        per_slide: list[list[torch.Tensor]] = []
        for i in picked:
            model.zero_grad(set_to_none=True)
            out = method.step(model, [int(i)], device)
            total = out.losses["total"]
            if not torch.isfinite(total):
                raise WsimilError(f"DP-SGD: the loss became {float(total.detach())}; lower the learning rate")
            total.backward()
            grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
            norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
            clipped += norm > clip
            seen += 1
            per_slide.append(grads)
            losses.append(float(total.detach()))
        opt.zero_grad(set_to_none=True)
        for k, p in enumerate(params):  # an empty draw is a zero gradient: the step still adds its noise
            p.grad_sample = (torch.stack([g[k] for g in per_slide]) if per_slide
                             else torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device))
        opt.step()
    for p in params:
        p.grad_sample = None
    out = {"dp_clipped_share": clipped / seen if seen else 0.0}
    if losses:  # every draw can be empty on a tiny site: then there is no loss to report
        out["train_loss"] = float(np.mean(losses))
    return out


__all__ = ["DPPlan", "Ledger", "dp_train", "plan"]
