"""Load a trained run folder and compute slide probabilities and per-patch attention.

A run folder holds the engine's ``last.json`` (method name, feature dimension, classes count, config),
its ``ckpt-*.safetensors`` and ``best.safetensors`` (best by validation loss, or the last model when
there was no validation set), and the CLI's ``run.json`` (cohort, encoder, µm/px, patch, classes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError

RUN_FILE = "run.json"


class RunError(WsimilError):
    """A run folder is missing or unusable."""


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


def saved_config(method: str, state: dict[str, Any]) -> Any:
    """The method's config as a run's ``last.json`` saved it (options the method no longer has are dropped)."""
    from ..train import get

    cls = get(method).config_cls
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in state.get("config", {}).items() if k in known})


def load_checkpoint_weights(run: Path, model: Any, weights: str, device: str) -> Any:
    """Load ``best`` (or ``last``) weights of a run folder into ``model``, move it to ``device`` in eval mode;
    returns the torch device."""
    from ..train import load_model_weights, pick_device

    src = run / "best.safetensors" if weights == "best" and (run / "best.safetensors").is_file() else run / "last.json"
    try:
        load_model_weights(src, model)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise RunError(f"cannot load the weights {src}: {exc}") from exc
    dev = pick_device(device)
    model.to(dev).eval()
    return dev


def load_run(run_dir: str | os.PathLike[str], device: str = "auto", weights: str = "best") -> LoadedRun:
    """The model of a run folder in eval mode; ``weights`` "best" (default) or "last"."""
    from ..train import get
    from ..train.mil import BagDataset

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


@dataclass
class SlidePrediction:
    slide_id: str
    probs: np.ndarray  # (C,)
    coords: np.ndarray  # (N, 2) level-0 x, y
    attention: np.ndarray  # (N,) of the predicted class's branch (the only branch for single-branch models)
    attention_all: np.ndarray  # (K, N)
    size_level0: float | None = None  # patch side in level-0 px (None: unknown, e.g. an old bag)
    slide_mpp: float | None = None
    slide_path: str | None = None


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


def write_attention(pred: SlidePrediction, path: str | os.PathLike[str]) -> Path:
    from ..io.atomic import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        geometry = {"size_level0": pred.size_level0, "slide_mpp": pred.slide_mpp, "slide_path": pred.slide_path}
        np.savez(fh, coords=pred.coords, attention=pred.attention.astype(np.float32),
                 attention_all=pred.attention_all.astype(np.float32), probs=pred.probs.astype(np.float64),
                 geometry=np.array(json.dumps(geometry)))
    return path


def read_attention(path: str | os.PathLike[str]) -> SlidePrediction:
    """A ``PRED/attention/<slide_id>.npz`` back (no pickle); the slide id is the file's stem."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            geometry = json.loads(str(z["geometry"][()])) if "geometry" in z.files else {}
            return SlidePrediction(path.stem, np.asarray(z["probs"]), np.asarray(z["coords"]),
                                   np.asarray(z["attention"]), np.asarray(z["attention_all"]),
                                   geometry.get("size_level0"), geometry.get("slide_mpp"), geometry.get("slide_path"))
    except FileNotFoundError:
        raise RunError(f"no attention file {path}; run 'wsimil predict' again") from None
    except (OSError, ValueError, KeyError) as exc:
        raise RunError(f"cannot read the attention file {path}: {exc}") from exc


def write_predictions(preds: list[SlidePrediction], n_classes: int, path: str | os.PathLike[str]) -> Path:
    """``slide_id, prob_0 … prob_{C-1}`` (columns by class index)."""
    from ..io.atomic import write_text

    lines = [",".join(["slide_id"] + [f"prob_{k}" for k in range(n_classes)])]
    for p in preds:
        lines.append(",".join([p.slide_id] + [repr(float(v)) for v in p.probs]))
    write_text(Path(path), "\n".join(lines) + "\n")
    return Path(path)


def read_predictions(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray]:
    """Slide ids and the (N, C) probabilities of a predictions.csv."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise RunError(f"no predictions at {path}; run 'wsimil predict' first")
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        cols = [i for i, h in enumerate(header) if h.startswith("prob_")]
        if not header or header[0] != "slide_id" or not cols:
            raise RunError(f"{path} is not a predictions file (header {header})")
        ids, rows = [], []
        for row in reader:
            if not row:
                continue
            ids.append(row[0])
            rows.append([float(row[i]) for i in cols])
    return ids, np.asarray(rows, dtype=np.float64).reshape(len(ids), len(cols))


__all__ = ["LoadedRun", "RunError", "SlidePrediction", "load_run", "overlap_attention", "predict_bag",
           "predict_features", "read_attention", "read_predictions",
           "write_attention", "write_predictions"]
