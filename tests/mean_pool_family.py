"""A method family written the way a plugin author would, for the tests that prove the family protocol.

Mean-pooled MIL: a slide's logits are a linear layer over the mean of its patch features, and a patch's
score is the same layer on that patch alone (its live layer). It shares nothing with the built-in MIL
family except the lower layers every family may use (feature bags, the engine, the predictions files),
so when the CLI, the interactive session, the child-process runner and the Training widget train,
predict, map and correct it, they do so through the protocol alone.

Module-level classes: the training child process (spawned) unpickles them by reference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_wsimil.errors import WsimilError
from napari_wsimil.train.engine import TrainConfig, doc_field
from napari_wsimil.train.family import MethodFamily, PredictRequest
from napari_wsimil.train.registry import MethodInfo
from napari_wsimil.train.run import PreparedRun, RunSpec, check_spec, labelled_slides, split_and_check_resume

NAME = "mean-pool"


@dataclass
class MeanPoolConfig(TrainConfig):
    """Mean-pooled MIL (a test family): a linear classifier on the mean of a slide's patch features."""

    n_classes: int | None = doc_field("Number of slide classes (set from the cohort).", default=None)
    temperature: float = doc_field("Divides the logits (a setting for the form and --set to carry).",
                                   default=1.0)


def _model(in_dim: int, n_classes: int, temperature: float) -> Any:
    import torch
    from torch import nn

    class MeanPool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(in_dim, elementwise_affine=False)  # features differ in scale
            self.head = nn.Linear(in_dim, n_classes)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            per_patch = self.head(self.norm(x)) / temperature
            return per_patch.mean(0), per_patch

    return MeanPool()


class MeanPoolMethod:
    """The engine's Method protocol over feature bags held in memory."""

    def __init__(self, config: MeanPoolConfig, train: list[tuple[np.ndarray, int]],
                 val: list[tuple[np.ndarray, int]]):
        self.name, self.config, self.train, self.val = NAME, config, train, val
        self.in_dim = int(train[0][0].shape[1]) if train else 0
        self.n_classes = int(config.n_classes or 2)

    def check(self) -> None:
        from napari_wsimil.train.engine import TrainingError

        if not self.train or any(len(f) == 0 for f, _ in self.train):
            raise TrainingError("mean-pool needs training slides with patches")

    def build_model(self) -> Any:
        return _model(self.in_dim, self.n_classes, self.config.temperature)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "in_dim": self.in_dim, "n_classes": self.n_classes}

    def batches(self, epoch: int, rng: np.random.Generator) -> list[list[int]]:
        return [[int(i)] for i in rng.permutation(len(self.train))]

    def step(self, model: Any, batch: list[int], device: Any) -> Any:
        import torch
        import torch.nn.functional as F

        from napari_wsimil.train.engine import StepOutput

        feats, label = self.train[batch[0]]
        logits, _ = model(torch.from_numpy(feats).to(device))
        loss = F.cross_entropy(logits[None], torch.tensor([label], device=device))
        return StepOutput({"total": loss, "bag": loss.detach()}, [(F.softmax(logits.detach(), 0), label)])

    def evaluate(self, model: Any, device: Any) -> tuple[dict[str, float], dict[str, float]] | None:
        import torch
        import torch.nn.functional as F

        if not self.val:
            return None
        with torch.no_grad():
            losses = [float(F.cross_entropy(model(torch.from_numpy(f).to(device))[0][None],
                                            torch.tensor([y], device=device))) for f, y in self.val]
        return {"bag": float(np.mean(losses))}, {}


def _bags(source: Path, run: Path, ids: Sequence[str], mpp: float, patch: int) -> dict[str, Path]:
    from napari_wsimil.train.cohort import ensure_features, features_dir_for, load_cohort

    cohort = load_cohort(source)
    items = [s for s in cohort.slides if s.slide_id in set(ids)]
    if not items:
        raise WsimilError(f"none of {', '.join(ids)} is in {source}")
    return ensure_features(items, features_dir_for(cohort, run, "handcrafted"), "handcrafted", patch, mpp,
                           project=cohort.source if cohort.is_project else None)


def _load(run_dir: Path, weights: str = "best") -> tuple[Any, dict[str, Any]]:
    from napari_wsimil.train.checkpoints import load_checkpoint_weights
    from napari_wsimil.train.registry import saved_config
    from napari_wsimil.train.run import read_run_info

    info = read_run_info(run_dir)
    state = json.loads((Path(run_dir) / "last.json").read_text())
    desc = state["method"]
    cfg = saved_config(NAME, state)
    model = _model(int(desc["in_dim"]), int(desc["n_classes"]), cfg.temperature)
    load_checkpoint_weights(Path(run_dir), model, weights, "cpu")
    return model, info


def _scores(model: Any, bag_path: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    """(slide probabilities, patch tumour probabilities, the bag)."""
    import torch

    from napari_wsimil.features.bags import read_bag

    bag = read_bag(bag_path)
    with torch.no_grad():
        logits, per_patch = model(torch.from_numpy(bag.features))
    probs = torch.softmax(logits, 0).numpy().astype(np.float64)
    return probs, torch.softmax(per_patch, 1)[:, -1].numpy(), bag


def _map(model: Any, slide_id: str, bag_path: Path, epoch: int) -> Any:
    from napari_wsimil.features.bags import patch_size_level0
    from napari_wsimil.infer.heatmap import attention_heatmap, default_downsample
    from napari_wsimil.slide import open_slide
    from napari_wsimil.train.events import MapEvent

    probs, p, bag = _scores(model, bag_path)
    with open_slide(bag.attrs["slide_path"], mpp=bag.attrs.get("slide_mpp")) as slide:
        w, h = slide.dimensions
        mpp = slide.mpp
    size = patch_size_level0(bag.attrs)
    ds = default_downsample(size, (h, w))
    heat = attention_heatmap(bag.coords, p, size, (h, w), ds)
    return MapEvent(slide_id, epoch, heat, ds, mpp, probs)


class MeanPoolFamily(MethodFamily):
    """Mean-pooled MIL on handcrafted features at 2 µm/px (see the module doc)."""

    name = "mean-pool-family"
    live_layer = "attention"
    uses_encoder = False  # always handcrafted: the widget hides its encoder picker
    default_mpp = 2.0
    default_patch = 64

    def prepare(self, spec: RunSpec, report: Any = None) -> PreparedRun:
        from napari_wsimil.features.bags import read_bag
        from napari_wsimil.io.atomic import write_text
        from napari_wsimil.train.registry import make_config

        say = report or (lambda _m: None)
        check_spec(spec)
        _cohort, usable, classes = labelled_slides(spec)
        tr, va = split_and_check_resume(spec, usable, classes)
        say(f"{NAME}: bags of {len(tr) + len(va)} slides")
        bags = _bags(Path(spec.source), Path(spec.out), [s.slide_id for s in tr + va], spec.mpp, spec.patch)
        index = {c: i for i, c in enumerate(classes)}

        def data(items: list) -> list[tuple[np.ndarray, int]]:
            return [(read_bag(bags[s.slide_id]).features.astype(np.float32), index[s.label]) for s in items]

        cfg = make_config(NAME, **{**spec.config, "epochs": spec.epochs, "seed": spec.seed, "device": "cpu",
                                   "n_classes": len(classes)})
        method = MeanPoolMethod(cfg, data(tr), data(va))
        method.check()
        info = {"family": self.name, "method": NAME, "cohort": str(Path(spec.source).resolve()), "mpp": spec.mpp,
                "patch": spec.patch, "classes": classes, "seed": spec.seed, "encoder": "handcrafted",
                "train_slides": [s.slide_id for s in tr], "val_slides": [s.slide_id for s in va]}
        Path(spec.out).mkdir(parents=True, exist_ok=True)
        write_text(Path(spec.out) / "run.json", json.dumps(info))
        return PreparedRun(spec, method, classes, bags, info)

    def live_maps(self, prepared: PreparedRun, watch: Sequence[str]) -> Any:
        spec = prepared.spec
        bags = {**prepared.bags, **_bags(Path(spec.source), Path(spec.out),
                                         [s for s in watch if s not in prepared.bags] or list(watch),
                                         spec.mpp, spec.patch)} if watch else {}

        def maps(epoch: int, final: bool) -> list[Any]:
            model, _ = _load(Path(spec.out), "best" if final else "last")
            return [_map(model, sid, bags[sid], epoch) for sid in watch if sid in bags]

        return maps

    def predict(self, request: PredictRequest, report: Any = None) -> dict[str, Any]:
        from napari_wsimil.infer.predictions import SlidePrediction, write_predictions
        from napari_wsimil.io.atomic import write_text
        from napari_wsimil.train.cohort import load_cohort

        model, info = _load(Path(request.run), request.weights)
        ids = [s.slide_id for s in load_cohort(request.cohort).slides]
        bags = _bags(Path(request.cohort), Path(request.run), ids, float(info["mpp"]), int(info["patch"]))
        preds = []
        for sid in ids:
            probs, p, bag = _scores(model, bags[sid])
            preds.append(SlidePrediction(sid, probs, bag.coords, p, p[None]))
        out = Path(request.out)
        out.mkdir(parents=True, exist_ok=True)
        write_predictions(preds, len(info["classes"]), out / "predictions.csv")
        meta = {"family": self.name, "method": NAME, "run": str(request.run), "classes": info["classes"]}
        write_text(out / "prediction.json", json.dumps(meta))
        if report:
            report(f"{NAME}: {len(preds)} slides -> {out / 'predictions.csv'}")
        return meta

    def slide_map(self, run_dir: Path, slide_id: str, source: Path, weights: str = "best") -> Any:
        model, info = _load(Path(run_dir), weights)
        bag = _bags(source, Path(run_dir), [slide_id], float(info["mpp"]), int(info["patch"]))[slide_id]
        return _map(model, slide_id, bag, int(json.loads((Path(run_dir) / "last.json").read_text())["epoch"]))

    def patch_scores(self, run_dir: Path, slide_id: str, source: Path) -> Any:
        from napari_wsimil.features.bags import patch_size_level0
        from napari_wsimil.infer.pseudo_labels import PatchScores

        model, info = _load(Path(run_dir))
        bag_path = _bags(source, Path(run_dir), [slide_id], float(info["mpp"]), int(info["patch"]))[slide_id]
        probs, p, bag = _scores(model, bag_path)
        return PatchScores(bag.coords, patch_size_level0(bag.attrs), p, probs, "mean-pool patch head")


FAMILY = MeanPoolFamily()
METHOD = MethodInfo(NAME, MeanPoolConfig, FAMILY)
