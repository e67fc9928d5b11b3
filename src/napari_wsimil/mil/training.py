"""The attention-MIL method family: bags, samplers and per-method loss composition.

A bag is one slide: ``features`` (N, D) float32, optional ``instance_labels`` (N,) int with -1 = unknown,
and the slide ``label``. Methods differ only in how they sample bags and combine losses:

* ABMIL: bag cross-entropy.
* CLAM-SB / CLAM-MB: ``bag_weight · CE + (1 − bag_weight) · instance loss`` (0.7 / 0.3).
* MS-CLAM: ``c1 · CE + (1 − c1) · instance + w_att · attention loss``; each step pairs one negative
  (label 0) and one positive slide; slides with tile labels are over-sampled ×90 at first, ×0.9 per epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import ms_clam_attention_loss
from ..train.engine import StepOutput, TrainConfig, TrainingError, classification_metrics


@dataclass
class Bag:
    """One slide's features, label and (optional) per-instance labels."""

    features: torch.Tensor
    label: int
    instance_labels: torch.Tensor | None = None
    name: str = ""

    @property
    def annotated(self) -> bool:
        return self.instance_labels is not None and bool((self.instance_labels >= 0).any())


def load_bag_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (and instance labels if stored) from a ``.safetensors``, ``.npz`` or ``.pt`` bag file.

    Keys: ``features`` and optionally ``instance_labels``. No pickle: npz with allow_pickle=False, .pt with
    weights_only=True.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            d = load_file(str(path))
        elif path.suffix == ".npz":  # the format napari_wsimil.features writes (coords, features, attrs)
            with np.load(path, allow_pickle=False) as z:
                d = {k: torch.from_numpy(np.asarray(z[k])) for k in ("features", "instance_labels")
                     if k in z.files}
        else:
            d = torch.load(path, map_location="cpu", weights_only=True)
        raw = d["features"]
        if not isinstance(raw, torch.Tensor) or raw.ndim != 2 or not (raw.is_floating_point() or raw.dtype in (
                torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)):
            raise ValueError(f"its features are {getattr(raw, 'dtype', type(raw).__name__)} "
                             f"{tuple(getattr(raw, 'shape', ()))}, expected a numeric (N, D) array")
        feats = raw.float()
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise TrainingError(f"cannot read the feature bag {path.name} ({path}): {e}") from e
    if not bool(torch.isfinite(feats).all()):  # a bag from elsewhere is checked before it reaches a model
        raise TrainingError(f"the feature bag {path.name} ({path}) holds NaN or infinite values; extract it again")
    inst = d.get("instance_labels")
    return feats, None if inst is None else inst.long()


class BagDataset(Sequence[Bag]):
    """Bags in memory, or feature files on disk read when a bag is asked for (one slide in memory at a
    time)."""

    def __init__(self, bags: Sequence[Bag] | None = None, *, files: Sequence[str | Path] = (),
                 labels: Sequence[int] = (), instance_labels: Sequence[torch.Tensor | None] | None = None):
        self._bags = list(bags) if bags is not None else None
        self._files = [Path(f) for f in files]
        self._labels = [int(x) for x in labels]
        self._inst = list(instance_labels) if instance_labels is not None else [None] * len(self._files)
        if self._bags is None and len(self._files) != len(self._labels):
            raise TrainingError(f"{len(self._files)} bag files but {len(self._labels)} labels")

    @classmethod
    def from_arrays(cls, features: Iterable[Any], labels: Iterable[int],
                    instance_labels: Iterable[Any] | None = None) -> BagDataset:
        feats, labs = list(features), list(labels)
        inst = list(instance_labels) if instance_labels is not None else [None] * len(feats)
        return cls([Bag(torch.as_tensor(np.asarray(f), dtype=torch.float32), int(y),
                        None if il is None else torch.as_tensor(np.asarray(il), dtype=torch.long), f"bag {i}")
                    for i, (f, y, il) in enumerate(zip(feats, labs, inst))])

    def __len__(self) -> int:
        return len(self._bags) if self._bags is not None else len(self._files)

    def __getitem__(self, i: int) -> Bag:  # type: ignore[override]
        if self._bags is not None:
            return self._bags[i]
        feats, inst = load_bag_file(self._files[i])
        if self._inst[i] is not None:
            inst = torch.as_tensor(self._inst[i], dtype=torch.long)
        return Bag(feats, self._labels[i], inst, self._files[i].name)

    @property
    def labels(self) -> list[int]:
        return [b.label for b in self._bags] if self._bags is not None else list(self._labels)

    def annotated_mask(self) -> np.ndarray:
        if self._bags is not None:
            return np.array([b.annotated for b in self._bags], dtype=bool)
        return np.array([il is not None and bool((torch.as_tensor(il) >= 0).any()) for il in self._inst],
                        dtype=bool)


class FeatureMoments:
    """Mean and standard deviation of every feature over all instances of many bags, one bag at a time.

    Chan et al.'s pairwise update of (count, mean, M2) in float64: exact enough for features of any scale
    and memory independent of the cohort's size."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, features: torch.Tensor) -> None:
        x = features.detach().double().cpu().numpy()
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.n * n_b / n)
        self.n = n

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as float32; a constant feature gets std 1, so it is centred, not blown up."""
        if self.mean is None or self.m2 is None or self.n == 0:
            raise TrainingError("no instances to standardise the features with")
        std = np.sqrt(self.m2 / max(self.n - 1, 1))
        constant = ~np.isfinite(std) | (std <= 1e-12 * (1.0 + np.abs(self.mean)))
        std[constant] = 1.0
        return torch.from_numpy(self.mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))


def check_bags(data: BagDataset, n_classes: int, what: str, need_all_classes: bool,
               moments: FeatureMoments | None = None) -> int:
    """Validate a cohort before training; returns the feature dimension. Reads each bag once, and adds its
    features to ``moments`` when given (the standardisation is fitted in the same pass)."""
    if len(data) == 0:
        raise TrainingError(f"the {what} cohort has no slides")
    dim = None
    for i in range(len(data)):
        bag = data[i]
        name = bag.name or f"bag {i}"
        f = bag.features
        if f.ndim != 2 or f.shape[0] == 0:
            raise TrainingError(f"{what} {name} is empty (features of shape {tuple(f.shape)}); "
                                "re-extract its features or drop the slide")
        if dim is None:
            dim = f.shape[1]
        elif f.shape[1] != dim:
            raise TrainingError(f"{what} {name} has {f.shape[1]}-d features, the others {dim}-d: "
                                "were they extracted with different encoders?")
        if not bool(torch.isfinite(f).all()):
            raise TrainingError(f"{what} {name} has NaN or infinite feature values")
        if not 0 <= bag.label < n_classes:
            raise TrainingError(f"{what} {name} has label {bag.label}, "
                                f"outside the classes 0..{n_classes - 1}")
        il = bag.instance_labels
        if il is not None:
            if il.shape != (f.shape[0],):
                raise TrainingError(f"{what} {name}: {il.numel()} instance labels for {f.shape[0]} instances")
            if bool(((il < -1) | (il >= n_classes)).any()):
                raise TrainingError(f"{what} {name} has instance labels outside -1 (unknown) and "
                                    f"0..{n_classes - 1}")
        if moments is not None:
            moments.add(f)
    present = set(data.labels)
    if need_all_classes and len(present) < 2:
        raise TrainingError(f"the {what} cohort has only class {sorted(present)}: a classifier needs slides "
                            "of at least two classes")
    return int(dim)


def _bag_ce(logits: torch.Tensor, label: int) -> torch.Tensor:
    return F.cross_entropy(logits[None], torch.tensor([label], device=logits.device))


@dataclass
class MILMethod:
    """One attention-MIL method bound to its data; implements the engine's ``Method`` protocol."""

    name: str
    config: TrainConfig
    train_data: BagDataset
    val_data: BagDataset | None
    make_model: Callable[[int, int], nn.Module]
    loss: Callable[[Any, Bag], dict[str, torch.Tensor]]
    sampler: Callable[[BagDataset, int, np.random.Generator], list[list[int]]]
    n_classes: int | None = None
    in_dim: int = 0
    standardise: bool = False
    scaling: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, std) fitted on the training bags

    def check(self) -> None:
        """Validate the cohorts once (build() calls it, so errors come before any thread or loop starts);
        with ``standardise``, the features' mean and std over the training instances are fitted in the same
        pass (never on validation or test bags)."""
        if self.in_dim:
            return
        if self.n_classes is None:
            labels = self.train_data.labels
            self.n_classes = max(2, max(labels) + 1) if labels else 2
        moments = FeatureMoments() if self.standardise else None
        self.in_dim = check_bags(self.train_data, self.n_classes, "training", True, moments)
        if moments is not None:
            self.scaling = moments.result()
        if self.val_data is not None:
            if check_bags(self.val_data, self.n_classes, "validation", False) != self.in_dim:
                raise TrainingError("validation and training bags have different feature dimensions")

    def build_model(self) -> nn.Module:
        model = self.make_model(self.in_dim, self.n_classes)
        if self.scaling is not None:
            model.set_input_scaling(*self.scaling)  # buffers: saved in every checkpoint, used at predict time
        return model

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "in_dim": self.in_dim, "n_classes": self.n_classes}

    def batches(self, epoch: int, rng: np.random.Generator) -> list[list[int]]:
        return self.sampler(self.train_data, epoch, rng)

    def step(self, model: nn.Module, batch: list[int], device: torch.device) -> StepOutput:
        parts, preds = [], []
        for i in batch:
            bag = self.train_data[i]
            inst = None if bag.instance_labels is None else bag.instance_labels.to(device)
            out = model(bag.features.to(device), label=bag.label, instance_labels=inst)
            parts.append(self.loss(out, bag))
            preds.append((F.softmax(out.logits.detach(), 0), bag.label))
        losses = {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}
        return StepOutput(losses, preds)

    def evaluate(self, model: nn.Module,
                 device: torch.device) -> tuple[dict[str, float], dict[str, float]] | None:
        if self.val_data is None:
            return None
        probs, labels, ce = predict(model, self.val_data, device, return_loss=True)
        return {"bag": ce}, classification_metrics(probs, labels)


@torch.no_grad()
def predict(model: nn.Module, data: BagDataset, device: torch.device | str = "cpu",
            return_loss: bool = False) -> Any:
    """Slide probabilities (B, C) and labels (B,) in eval mode; with ``return_loss`` also the mean bag CE."""
    was = model.training
    model.eval()
    probs, labels, ce = [], [], 0.0
    for i in range(len(data)):
        bag = data[i]
        logits = model(bag.features.to(device)).logits
        probs.append(F.softmax(logits, 0).cpu())
        labels.append(bag.label)
        ce += float(_bag_ce(logits, bag.label))
    model.train(was)
    out = torch.stack(probs), torch.tensor(labels)
    return (*out, ce / max(len(data), 1)) if return_loss else out


@torch.no_grad()
def attention_scores(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Softmaxed attention (K, N) of one bag in eval mode (what heatmaps are drawn from)."""
    was = model.training
    model.eval()
    att = model(features).attention
    model.train(was)
    return att


# ---- samplers ----

def shuffle_sampler(data: BagDataset, epoch: int, rng: np.random.Generator) -> list[list[int]]:
    """Every bag once per epoch, in a seeded random order (CLAM; batch = 1 bag)."""
    return [[int(i)] for i in rng.permutation(len(data))]


def balanced_sampler(data: BagDataset, epoch: int, rng: np.random.Generator) -> list[list[int]]:
    """As many steps as bags, each class drawn equally often (CLAM's ``--weighted_sample``).

    Why: with 3 benign slides for each malignant one, an unweighted epoch teaches "benign" three times as
    often and the attention never needs to find the tumour. Unlike CLAM's draw with replacement, each class's
    slides are taken from successive random permutations, so every slide of a minority class is seen at least
    once per epoch and no slide of any class twice before the others of its class once."""
    labels = np.asarray(data.labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        return shuffle_sampler(data, epoch, rng)
    per_class = -(-len(labels) // len(classes))
    picks: list[int] = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        reps = -(-per_class // len(idx))
        cycle = np.concatenate([rng.permutation(idx) for _ in range(reps)])
        picks.extend(int(i) for i in cycle[:per_class])
    order = rng.permutation(len(picks))[:len(labels)]
    return [[picks[int(i)]] for i in order]


def paired_sampler(oversample: float, decay: float, paired: bool = True
                   ) -> Callable[[BagDataset, int, np.random.Generator], list[list[int]]]:
    """MS-CLAM: steps of one negative + one positive slide, slides with tile labels drawn
    ``oversample · decay^(epoch−1)`` times as often (never less than other slides)."""

    def sample(data: BagDataset, epoch: int, rng: np.random.Generator) -> list[list[int]]:
        labels = np.asarray(data.labels)
        w = np.where(data.annotated_mask(), max(1.0, oversample * decay ** (epoch - 1)), 1.0)
        neg, pos = np.flatnonzero(labels == 0), np.flatnonzero(labels != 0)
        if not paired or len(neg) == 0 or len(pos) == 0:
            idx = rng.choice(len(data), size=len(data), replace=True, p=w / w.sum())
            return [[int(i)] for i in idx]
        steps = max(1, len(data) // 2)
        n = rng.choice(neg, size=steps, replace=True, p=w[neg] / w[neg].sum())
        p = rng.choice(pos, size=steps, replace=True, p=w[pos] / w[pos].sum())
        return [[int(a), int(b)] for a, b in zip(n, p)]

    return sample


# ---- loss compositions ----

def abmil_loss(out: Any, bag: Bag) -> dict[str, torch.Tensor]:
    ce = _bag_ce(out.logits, bag.label)
    return {"total": ce, "bag": ce}


def clam_loss(bag_weight: float) -> Callable[[Any, Bag], dict[str, torch.Tensor]]:
    def loss(out: Any, bag: Bag) -> dict[str, torch.Tensor]:
        ce = _bag_ce(out.logits, bag.label)
        inst = out.instance_loss if out.instance_loss is not None else ce.new_zeros(())
        w = bag_weight if out.instance_loss is not None else 1.0  # tiny bag: bag loss only
        return {"total": w * ce + (1 - w) * inst, "bag": ce.detach(), "instance": inst.detach()}
    return loss


def ms_clam_loss(c1: float, w_att: float) -> Callable[[Any, Bag], dict[str, torch.Tensor]]:
    def loss(out: Any, bag: Bag) -> dict[str, torch.Tensor]:
        ce = _bag_ce(out.logits, bag.label)
        inst = out.instance_loss if out.instance_loss is not None else ce.new_zeros(())
        inst_labels = None if bag.instance_labels is None else bag.instance_labels.to(ce.device)
        att = ms_clam_attention_loss(out.attention[0], bag.label, inst_labels)
        w = c1 if out.instance_loss is not None else 1.0
        total = w * ce + (1 - w) * inst + w_att * att
        return {"total": total, "bag": ce.detach(), "instance": inst.detach(), "attention": att.detach()}
    return loss


__all__ = ["Bag", "BagDataset", "FeatureMoments", "MILMethod", "attention_scores", "balanced_sampler", "check_bags",
           "load_bag_file", "predict"]
