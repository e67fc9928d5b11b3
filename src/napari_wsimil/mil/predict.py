"""Load a trained attention-MIL run folder and compute slide probabilities and per-patch attention.

A run folder holds the engine's ``last.json`` (method name, feature dimension, classes count, config),
its ``ckpt-*.safetensors`` and ``best.safetensors`` (best by validation loss, or the last model when
there was no validation set), and the CLI's ``run.json`` (cohort, encoder, µm/px, patch, classes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..infer.predictions import RunError, SlidePrediction
from ..train.checkpoints import load_checkpoint_weights
from ..train.registry import saved_config
from ..train.run import RUN_FILE


@dataclass
class LoadedRun:
    model: Any
    method: str
    n_classes: int
    in_dim: int
    info: dict[str, Any]  # run.json (empty when the run has none)
    device: Any

    @property
    def classes(self) -> list[str]:
        return list(self.info.get("classes") or [str(i) for i in range(self.n_classes)])


def load_run(run_dir: str | os.PathLike[str], device: str = "auto", weights: str = "best") -> LoadedRun:
    """The model of a run folder in eval mode; ``weights`` "best" (default) or "last"."""
    from ..train.registry import get
    from .training import BagDataset

    run = Path(run_dir)
    last = run / "last.json"
    if not last.is_file():
        raise RunError(f"{run} is not a training run (no last.json); train one with 'wsimil train'")
    try:
        state = json.loads(last.read_text())
        desc = state["method"]
        name, in_dim, n_classes = desc["name"], int(desc["in_dim"]), int(desc["n_classes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"cannot read {last}: {exc}") from exc
    info_cls = get(name)
    method = info_cls.builder(saved_config(name, state), BagDataset([]), None)
    model = method.make_model(in_dim, n_classes)
    dev = load_checkpoint_weights(run, model, weights, device)
    info: dict[str, Any] = {}
    if (run / RUN_FILE).is_file():
        try:
            info = json.loads((run / RUN_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot read {run / RUN_FILE}: {exc}") from exc
    return LoadedRun(model, name, n_classes, in_dim, info, dev)


def predict_bag(run: LoadedRun, slide_id: str, bag_path: str | os.PathLike[str]) -> SlidePrediction:
    """Probabilities and attention for one ``.npz`` feature bag."""
    from ..features import read_bag

    bag = read_bag(bag_path)
    if len(bag) == 0:
        raise RunError(f"the feature bag of {slide_id} ({bag_path}) has no patches")
    return predict_features(run, slide_id, bag)


def predict_features(run: LoadedRun, slide_id: str, bag: Any) -> SlidePrediction:
    """Probabilities and attention for a :class:`~napari_wsimil.features.bags.Bag` in memory (the
    overlapping heatmap bags are never written to disk)."""
    import torch
    import torch.nn.functional as F

    from ..features.bags import patch_size_level0

    if bag.dim != run.in_dim:
        raise RunError(f"the feature bag of {slide_id} has {bag.dim}-d features, the model expects "
                       f"{run.in_dim}-d: were they made with another encoder?")
    with torch.no_grad():
        out = run.model(torch.from_numpy(bag.features).to(run.device))
        probs = F.softmax(out.logits, 0).double().cpu().numpy()
        att = out.attention.float().cpu().numpy()
    k = int(probs.argmax()) if att.shape[0] > 1 else 0
    try:
        size = patch_size_level0(bag.attrs)
    except (KeyError, TypeError, ValueError):
        size = None
    return SlidePrediction(slide_id, probs, bag.coords, att[k], att, size, bag.attrs.get("slide_mpp"),
                           bag.attrs.get("slide_path"))


def overlap_attention(run: LoadedRun, slide_id: str, slide_path: str | os.PathLike[str], overlap: float,
                      slide_mpp: float | None = None, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(coords, attention) of a grid with ``overlap`` (CLAM re-extracts at 50 % for smoother heatmaps);
    the branch ``k`` of multi-branch models (default: the predicted class). Features stay in memory."""
    from ..features import build_encoder, extract_features
    from ..slide import open_slide, patch_grid

    encoder = build_encoder(run.info["encoder"], weights=run.info.get("weights"), device=str(run.device))
    with open_slide(slide_path, mpp=slide_mpp) as slide:
        grid = patch_grid(slide, int(run.info["patch"]), float(run.info["mpp"]), overlap=overlap)
        if len(grid) == 0:
            raise RunError(f"{slide_id} has no tissue patches to draw a heatmap from")
        bag = extract_features(slide, encoder, grid=grid, device=str(run.device))
    pred = predict_features(run, slide_id, bag)
    branch = pred.attention if k is None else pred.attention_all[min(k, len(pred.attention_all) - 1)]
    return pred.coords, branch


__all__ = ["LoadedRun", "load_run", "overlap_attention", "predict_bag", "predict_features"]
