"""What a prediction writes, whatever the method: ``predictions.csv`` (slide probabilities by class index)
and, for attention methods, ``attention/<slide_id>.npz`` (patch coordinates and attention), read back
without pickle by ``wsimil evaluate`` and the localisation metrics."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WsimilError


class RunError(WsimilError):
    """A run folder or its predictions are missing or unusable."""


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
    patches_encoded: int | None = None  # patches the prediction read and encoded (None: not counted)
    seconds: float | None = None  # wall time of the slide's prediction


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
    """``slide_id, prob_0 … prob_{C-1}`` (columns by class index), then ``patches_encoded`` and ``seconds``
    (what the prediction of each slide read and how long it took; empty where not counted)."""
    from ..io.atomic import write_text

    def cell(v: float | None, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    lines = [",".join(["slide_id"] + [f"prob_{k}" for k in range(n_classes)] + ["patches_encoded", "seconds"])]
    for p in preds:
        lines.append(",".join([p.slide_id] + [repr(float(v)) for v in p.probs]
                              + [cell(p.patches_encoded, "d"), cell(p.seconds, ".3f")]))
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


__all__ = ["RunError", "SlidePrediction", "read_attention", "read_predictions", "write_attention",
           "write_predictions"]
