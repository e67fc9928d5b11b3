"""A ZoomMIL run loaded for prediction, and the prediction of one slide that reads only what it zooms into.

The lowest level's tissue grid is read and encoded; the network's zoom heads choose K patches; only their
children are read from the slide and encoded at the next level, and so on. No high-magnification bag is
made for a new slide, which is where ZoomMIL's saving over single-magnification MIL comes from.
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
from ..train.run import read_run_info


@dataclass
class ZoomRun:
    """A trained ZoomMIL model in eval mode with what its run.json says (levels, patch, encoder)."""

    model: Any
    method: str
    n_classes: int
    info: dict[str, Any]
    device: Any

    @property
    def levels(self) -> tuple[float, ...]:
        return tuple(float(m) for m in self.info["levels"])

    @property
    def patch(self) -> int:
        return int(self.info["patch"])

    @property
    def k(self) -> int:
        return int(self.model.k)

    @property
    def classes(self) -> list[str]:
        return list(self.info.get("classes") or [str(i) for i in range(self.n_classes)])

    def encoder(self) -> Any:
        """The run's patch encoder, built once per prediction exactly as the zoom bags built it."""
        from .bags import zoom_encoder

        return zoom_encoder(self.info["encoder"], self.levels, device=str(self.device),
                            weights=self.info.get("weights"))


def load_zoom_run(run_dir: str | os.PathLike[str], device: str = "auto", weights: str = "best") -> ZoomRun:
    """The ZoomMIL model of a run folder in eval mode; ``weights`` "best" (default) or "last"."""
    from .network import ZoomMILNet

    run = Path(run_dir)
    info = read_run_info(run)
    try:
        state = json.loads((run / "last.json").read_text())
        desc = state["method"]
        name, in_dim, n_classes, ratios = desc["name"], int(desc["in_dim"]), int(desc["n_classes"]), desc["ratios"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"cannot read {run / 'last.json'}: {exc}") from exc
    cfg = saved_config(name, state)
    model = ZoomMILNet(in_dim, n_classes, ratios, hidden=cfg.hidden, attn_hidden=cfg.attn_hidden,
                       dropout=cfg.dropout, k=cfg.k, num_samples=cfg.num_samples, sigma=cfg.sigma,
                       sigma_spread=cfg.sigma_spread, baseline=cfg.baseline, zoom_on=cfg.zoom_on)
    dev = load_checkpoint_weights(run, model, weights, device)
    return ZoomRun(model, name, n_classes, info, dev)


@dataclass
class ZoomPath:
    """Where a slide's prediction looked: per level the µm/px, the level-0 corners of the patches read there,
    their rows in that level's depth-first numbering (:mod:`.bags`) and their attention; per zoom step the
    corners of the patches chosen to zoom into."""

    slide_id: str
    slide_path: str
    slide_mpp: float | None
    dims: tuple[int, int]  # (w, h) level 0
    mpps: tuple[float, ...]
    patch: int
    coords: list[np.ndarray]
    attention: list[np.ndarray]
    chosen: list[np.ndarray]
    rows: list[np.ndarray]
    #: the finest-level tissue patches and the scores ``wsimil evaluate`` ranks (set by :func:`predict_slide`)
    localisation: SlidePrediction | None = None

    def size_level0(self, level: int) -> float:
        """A level's patch side in level-0 pixels."""
        return self.patch * self.mpps[level] / float(self.slide_mpp or self.mpps[-1])


def path_of(out: Any, slide_id: str, slide: Any, mpps: Any, patch: int, coords: list[np.ndarray]) -> ZoomPath:
    """The :class:`ZoomPath` of a network output (eval mode: every row is one patch)."""
    rows = [r.detach().cpu().numpy() for r in out.rows]
    att = [a.detach().cpu().numpy().astype(np.float32) for a in out.attention]
    chosen = [coords[step][s.detach().cpu().numpy()] for step, s in enumerate(out.selected)]
    return ZoomPath(slide_id, str(slide.path), slide.mpp, tuple(slide.dimensions), tuple(mpps), int(patch),
                    [coords[level][r] for level, r in enumerate(rows)], att, chosen, rows)


def predict_slide(run: ZoomRun, encoder: Any, item: Any, project: Path | None = None
                  ) -> tuple[SlidePrediction, ZoomPath]:
    """Probabilities of one cohort slide, reading the lowest level's grid and then only the children of
    the patches the model chooses; ``patches_encoded`` counts every patch read and encoded. The path's
    :attr:`ZoomPath.localisation` is what ``wsimil evaluate`` scores (:mod:`.localisation`)."""
    import torch

    from ..slide import open_slide
    from ..slide.tissue import tissue_mask
    from .bags import encode_coords, level_coords
    from .localisation import path_localisation

    with open_slide(item.path, mpp=item.mpp) as slide:
        tissue = tissue_mask(slide)  # once: the lowest grid and the scored finest grid both use it
        coords = level_coords(slide, run.levels, run.patch, tissue)
        x0 = torch.from_numpy(np.asarray(encode_coords(slide, encoder, coords[0], run.levels[0], run.patch,
                                                       device=str(run.device)), np.float32)).to(run.device)

        def fetch(level: int, rows: torch.Tensor) -> torch.Tensor:
            picked = coords[level][rows.cpu().numpy()]
            feats = encode_coords(slide, encoder, picked, run.levels[level], run.patch, device=str(run.device))
            return torch.from_numpy(np.asarray(feats, np.float32)).to(run.device)

        with torch.no_grad():
            out = run.model(x0, fetch)
        probs = torch.softmax(out.logits, 0).double().cpu().numpy()
        path = path_of(out, item.slide_id, slide, run.levels, run.patch, coords)
    path.localisation = path_localisation(path, probs, tissue)
    att0 = path.attention[0]
    pred = SlidePrediction(item.slide_id, probs, coords[0], att0, att0[None], path.size_level0(0), path.slide_mpp,
                           path.slide_path, patches_encoded=int(len(coords[0]) + out.fetched))
    return pred, path


__all__ = ["ZoomPath", "ZoomRun", "load_zoom_run", "path_of", "predict_slide"]
