"""ZoomMIL bound to its training bags: the engine's ``Method`` protocol (see ``train.engine``).

One step = one slide: its multi-magnification bag is read, the network runs over the lowest level and
fetches the children it zooms into from the bag, and the slide's cross-entropy is the loss. The training
bags' feature moments are fitted once (``standardise``) and stored in the model as buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..infer.metrics import weighted_f1
from ..train.engine import StepOutput, TrainingError, classification_metrics
from .bags import read_zoom_bag
from .configs import ZoomMILConfig
from .network import ZOOM_ON, ZoomMILNet, full_bag_fetch


def bag_tensors(path: Path, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Every level's features of a zoom bag as tensors on ``device``."""
    bag = read_zoom_bag(path)
    return [torch.from_numpy(np.asarray(f, np.float32)).to(device) for f in bag.features]


def balanced_order(labels: Sequence[int], rng: np.random.Generator, balanced: bool) -> list[list[int]]:
    """One epoch's slides, one per step: drawn so that each class is seen equally often (``balanced``,
    with replacement, as many draws as slides), else each slide once in random order."""
    n = len(labels)
    if not balanced or n == 0:
        return [[int(i)] for i in rng.permutation(n)]
    labels_a = np.asarray(labels)
    counts = np.bincount(labels_a)
    weights = 1.0 / counts[labels_a]
    return [[int(i)] for i in rng.choice(n, size=n, replace=True, p=weights / weights.sum())]


SELECT_BY = ("weighted_f1", "loss")


class ZoomMILMethod:
    """ZoomMIL on zoom bags (``train_files``/``val_files`` with slide labels)."""

    name = "zoommil"

    def __init__(self, config: ZoomMILConfig, train_files: Sequence[Path], train_labels: Sequence[int],
                 val_files: Sequence[Path] = (), val_labels: Sequence[int] = ()):
        self.config = config
        self.train_files, self.train_labels = [Path(p) for p in train_files], [int(y) for y in train_labels]
        self.val_files, self.val_labels = [Path(p) for p in val_files], [int(y) for y in val_labels]
        self.in_dim = 0
        self.ratios: list[int] = []
        self.n_classes = int(config.n_classes or 0)
        self.scaling: tuple[torch.Tensor, torch.Tensor] | None = None

    def check(self) -> None:
        """Every bag readable, of one feature width and one set of levels; classes present; moments fitted
        on the training bags (never on validation ones)."""
        if not self.train_files:
            raise TrainingError("ZoomMIL needs at least one training slide")
        if self.config.select_by not in SELECT_BY:
            raise TrainingError(f"select_by must be one of {', '.join(SELECT_BY)}, not {self.config.select_by!r}")
        if self.config.zoom_on not in ZOOM_ON:
            raise TrainingError(f"zoom_on must be one of {', '.join(ZOOM_ON)}, not {self.config.zoom_on!r}")
        if not self.n_classes:
            self.n_classes = max(2, max(self.train_labels) + 1)
        total, total_sq, count = None, None, 0
        for files, what in ((self.train_files, "training"), (self.val_files, "validation")):
            for path in files:
                bag = read_zoom_bag(path)
                if len(bag) == 0:
                    raise TrainingError(f"the zoom bag {path.name} has no tissue patches")
                if not self.in_dim:
                    self.in_dim, self.ratios = bag.dim, list(bag.ratios)
                elif bag.dim != self.in_dim or list(bag.ratios) != self.ratios:
                    raise TrainingError(f"{what} bag {path.name} has {bag.dim}-d features at steps {bag.ratios}; "
                                        f"the others {self.in_dim}-d at {self.ratios}")
                if what == "training" and self.config.standardise:
                    for f in bag.features:
                        f64 = np.asarray(f, np.float64)
                        s, sq = f64.sum(0), (f64 * f64).sum(0)
                        total = s if total is None else total + s
                        total_sq = sq if total_sq is None else total_sq + sq
                        count += len(f64)
        if any(y < 0 or y >= self.n_classes for y in self.train_labels + self.val_labels):
            raise TrainingError(f"slide labels must be class indices 0..{self.n_classes - 1}")
        if total is not None and count:
            mean = total / count
            std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
            self.scaling = (torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32)))

    def build_model(self) -> ZoomMILNet:
        c = self.config
        model = ZoomMILNet(self.in_dim, self.n_classes, self.ratios, hidden=c.hidden, attn_hidden=c.attn_hidden,
                           dropout=c.dropout, k=c.k, num_samples=c.num_samples, sigma=c.sigma,
                       sigma_spread=c.sigma_spread, baseline=c.baseline, zoom_on=c.zoom_on)
        if self.scaling is not None:
            model.set_input_scaling(*self.scaling)
        return model

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "in_dim": self.in_dim, "n_classes": self.n_classes, "ratios": self.ratios}

    def batches(self, epoch: int, rng: np.random.Generator) -> list[list[int]]:
        return balanced_order(self.train_labels, rng, self.config.balanced)

    def _forward(self, model: ZoomMILNet, path: Path, device: torch.device) -> Any:
        levels = bag_tensors(path, device)
        return model(levels[0], full_bag_fetch(levels))

    def step(self, model: ZoomMILNet, batch: list[int], device: torch.device) -> StepOutput:
        losses, preds = [], []
        for i in batch:
            out = self._forward(model, self.train_files[i], device)
            label = self.train_labels[i]
            losses.append(F.cross_entropy(out.logits[None], torch.tensor([label], device=device)))
            preds.append((F.softmax(out.logits.detach(), 0), label))
        total = torch.stack(losses).mean()
        return StepOutput({"total": total, "bag": total.detach()}, preds)

    @torch.no_grad()
    def evaluate(self, model: ZoomMILNet, device: torch.device
                 ) -> tuple[dict[str, float], dict[str, float]] | None:
        if not self.val_files:
            return None
        was = model.training
        model.eval()
        probs, ce = [], []
        for path, label in zip(self.val_files, self.val_labels):
            logits = self._forward(model, path, device).logits
            probs.append(F.softmax(logits, 0))
            ce.append(float(F.cross_entropy(logits[None], torch.tensor([label], device=device))))
        model.train(was)
        p = torch.stack(probs)
        metrics = classification_metrics(p, torch.tensor(self.val_labels))
        wf1 = weighted_f1(p.argmax(1).cpu().numpy(), np.asarray(self.val_labels), self.n_classes)
        metrics["weighted_f1"] = wf1
        losses = {"bag": float(np.mean(ce))}
        if self.config.select_by == "weighted_f1":
            # smaller is better for the engine; the loss (capped, scaled far below one F1 step) breaks ties
            losses["select"] = (1.0 - wf1) + 1e-6 * min(losses["bag"], 100.0)
        return losses, metrics


__all__ = ["ZoomMILMethod", "bag_tensors", "balanced_order"]
