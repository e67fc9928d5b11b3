"""HistoFL (Lu et al. 2022, mahmoodlab/HistoFL ``utils/fl_utils.py``) as a federated method.

Each site trains attention MIL (ABMIL or CLAM-SB, the MIL family's own training code) for one local epoch
from the global weights. The server averages each weight tensor: θ = Σ_k w_k θ_k + Σ_k n_k with
n_k ~ N(0, (α·std(θ_k))²); biases and buffers get no noise; w_k is uniform or proportional to the site's
training-slide count. The noise blurs the weights but comes with no clipping and no accounting, so it gives
**no privacy guarantee**; DP-SGD at the sites (:mod:`.dp`, ``dp_epsilon``) does.

The server's run folder is an attention-MIL run (``run.json`` family "mil", ``last.json`` naming the MIL
method, its feature dimension and classes), so ``wsimil predict`` and the Training widget use it as any run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .histofl_config import HistoFLConfig, mil_config
from .protocol import Arrays, FederatedMethod, SiteTrainer, SiteUpdate, tensor_file_bytes, write_model_round

#: Buffers of the MIL models: the input standardisation, averaged without noise (they are not weights).
UNNOISED_SUFFIXES = ("bias", "input_mean", "input_std")


def noisy_average(updates: Sequence[Arrays], weights: Sequence[float], alpha: float,
                  rng: np.random.Generator) -> Arrays:
    """HistoFL's aggregation: Σ w_k θ_k plus, per site and weight tensor, N(0, (alpha·std(θ_k))²) noise;
    no noise on biases and buffers. ``weights`` are normalised here."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out: Arrays = {}
    for key, first in updates[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for wk, arrays in zip(w, updates):
            acc += wk * arrays[key].astype(np.float64)
            if alpha > 0 and not key.endswith(UNNOISED_SUFFIXES) and arrays[key].size > 1:
                acc += rng.normal(0.0, alpha * float(np.std(arrays[key])), size=first.shape)
        out[key] = acc.astype(first.dtype)
    return out


def site_weights(updates: Sequence[SiteUpdate], weighting: str) -> np.ndarray:
    """Uniform, or proportional to each site's training-slide count (``num_examples``)."""
    if weighting == "uniform":
        return np.full(len(updates), 1.0 / len(updates))
    n = np.array([u.num_examples for u in updates], dtype=np.float64)
    return n / n.sum()


def build_network(config: HistoFLConfig, in_dim: int) -> Any:
    """The MIL network of ``config`` (weights from ``config.seed``), without data."""
    import torch

    from ..mil.training import BagDataset
    from ..train.registry import get

    torch.manual_seed(config.seed)
    method = get(config.mil_method).builder(mil_config(config), BagDataset([]), None)
    return method.make_model(in_dim, len(config.classes))


def encoder_dim(config: HistoFLConfig) -> int:
    """The feature dimension of the configured encoder (built on the CPU, no slide read)."""
    if config.in_dim:
        return config.in_dim
    from ..features import build_encoder

    return int(build_encoder(config.encoder, device="cpu").dim)


class HistoFL(FederatedMethod):
    """HistoFL: see the module doc."""

    name = "histofl"
    config_cls = HistoFLConfig

    def initial_arrays(self, config: HistoFLConfig) -> Arrays:
        model = build_network(config, encoder_dim(config))
        return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}

    def site_trainer(self, source: Path, config: HistoFLConfig, workdir: Path) -> SiteTrainer:
        from .histofl_site import HistoFLSite

        return HistoFLSite(Path(source), config, Path(workdir))

    def aggregate(self, global_arrays: Arrays, updates: list[SiteUpdate], config: HistoFLConfig,
                  rng: np.random.Generator) -> Arrays:
        if not updates:
            return global_arrays
        return noisy_average([u.arrays for u in updates], site_weights(updates, config.weighting), config.alpha,
                             rng)

    def weights(self, updates: Sequence[SiteUpdate], config: HistoFLConfig) -> np.ndarray:
        return site_weights(updates, config.weighting)

    # ---------------------------------------------------------------------------- the run folder
    def run_info(self, config: HistoFLConfig, sites: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
        return {"format": 1, "family": "mil", "method": config.mil_method, "federated": "histofl",
                "sites": list(sites), "encoder": config.encoder, "weights": None, "mpp": config.mpp,
                "patch": config.patch, "classes": list(config.classes), "seed": config.seed,
                "train_slides": [], "val_slides": [], "tile_labelled_slides": [], "federation": asdict(config)}

    def write_round(self, out: Path, arrays: Arrays, server_round: int, config: HistoFLConfig,
                    history: list[dict[str, Any]]) -> Path:
        in_dim = int(arrays["input_mean"].shape[0]) if "input_mean" in arrays else encoder_dim(config)
        state = {"method": {"name": config.mil_method, "in_dim": in_dim, "n_classes": len(config.classes)},
                 "config": asdict(mil_config(config)), "federation": asdict(config), "history": history,
                 "stopped": None}
        return write_model_round(out, arrays, server_round, state)

    @staticmethod
    def write_best(out: Path, arrays: Arrays, server_round: int) -> None:
        """``best.safetensors``: the global model with the lowest validation loss over the sites so far."""
        from ..io.atomic import write_bytes

        write_bytes(out / "best.safetensors", tensor_file_bytes(arrays, {"epoch": str(server_round)}))


__all__ = ["HistoFL", "HistoFLConfig", "build_network", "mil_config", "noisy_average", "site_weights"]
