"""A HistoFL site: attention MIL on the site's own project or cohort CSV, from the global weights.

The bags are extracted at the site (cached in the project's ``features/`` or in the site's work folder) and
never leave it; what goes back is the state dict and a few numbers (slide counts, losses, AUCs, the privacy
spent). A local epoch is the MIL family's own training: the engine with the method's sampler and losses, or,
with DP-SGD, :func:`.dp.dp_train` on the same losses.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import WsimilError
from .histofl_config import HistoFLConfig, mil_config
from .protocol import Arrays, SiteTrainer, SiteUpdate

LEDGER = "privacy.json"


class _FromGlobal:
    """The engine's Method for one local round: the MIL method, its network already holding the weights."""

    def __init__(self, method: Any, model: torch.nn.Module, config: Any):
        self.method, self.model, self.config, self.name = method, model, config, method.name

    def check(self) -> None:
        pass

    def build_model(self) -> torch.nn.Module:
        return self.model

    def describe(self) -> dict[str, Any]:
        return self.method.describe()

    def batches(self, epoch: int, rng: np.random.Generator) -> Any:
        return self.method.batches(epoch, rng)

    def step(self, model: torch.nn.Module, batch: Any, device: torch.device) -> Any:
        return self.method.step(model, batch, device)

    def evaluate(self, model: torch.nn.Module, device: torch.device) -> Any:
        return self.method.evaluate(model, device)


def _inject_global(local_dir: Path, model: torch.nn.Module) -> int:
    """Put ``model``'s (global) weights into the site's last engine checkpoint, keeping its optimiser state;
    returns the epochs the site has trained so far (0 when it has no checkpoint yet)."""
    import json

    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from ..io.atomic import write_bytes

    last = local_dir / "last.json"
    if not last.is_file():
        return 0
    state = json.loads(last.read_text())
    path = local_dir / state["tensors"]
    tensors = {k: v for k, v in st_load(path.read_bytes()).items() if not k.startswith("model.")}
    tensors.update({f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    write_bytes(path, st_save(tensors, metadata={"epoch": str(state["epoch"])}))
    return int(state["epoch"])


class HistoFLSite(SiteTrainer):
    """One site's data and local training (see the module doc)."""

    def __init__(self, source: Path, config: HistoFLConfig, workdir: Path, report: Any = None):
        from ..mil.family import build
        from ..mil.training import BagDataset
        from ..train.cohort import assign_splits, ensure_features, features_dir_for, label_indices, load_cohort

        self.source, self.config, self.workdir = Path(source), config, Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        cohort = load_cohort(source)
        usable = [s for s in cohort.slides if s.label is not None and s.split != "test"]
        if not usable:
            raise WsimilError(f"no labelled slides in {source}")
        classes = list(config.classes)
        label_indices(usable, classes)  # a label outside the federation's classes names its slide
        slides = assign_splits(usable, classes, config.seed, config.val_fraction)
        tr = [s for s in slides if s.split == "train"]
        va = [s for s in slides if s.split == "val"]
        bags = ensure_features(tr + va, features_dir_for(cohort, self.workdir / "run", config.encoder),
                               config.encoder, config.patch, config.mpp, report=report, device=config.device,
                               project=cohort.source if cohort.is_project else None)

        def data(items: list) -> BagDataset | None:
            if not items:
                return None
            return BagDataset(files=[bags[s.slide_id] for s in items], labels=label_indices(items, classes))

        self.method = build(config.mil_method, data(tr), data(va), mil_config(config))
        self.n_train, self.n_val = len(tr), len(va)

    # ------------------------------------------------------------------------------------------ rounds
    def _model(self, global_arrays: Arrays) -> torch.nn.Module:
        """The network with the global weights. Until the server has averaged the sites' standardisation
        (round 1: the global scaling is still the identity), the site's own fitted scaling is kept."""
        model = self.method.build_model()
        state = {k: torch.from_numpy(np.array(v)) for k, v in global_arrays.items()}
        own = model.state_dict()
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise WsimilError("the global model does not fit this site's network: are the site's features made "
                              f"with the encoder {self.config.encoder} the server expects?")
        if self.method.scaling is not None and "input_std" in state and bool(
                (state["input_std"] == 1).all() and (state["input_mean"] == 0).all()):
            state["input_mean"], state["input_std"] = own["input_mean"], own["input_std"]
        model.load_state_dict(state)
        return model

    def fit(self, global_arrays: Arrays, server_round: int) -> SiteUpdate:
        from ..train.engine import pick_device

        cfg = self.config
        device = pick_device(cfg.device)
        model = self._model(global_arrays).to(device)
        metrics = {f"global_{k}": v for k, v in self._measure(model, device).items()}
        if cfg.dp_epsilon:
            metrics.update(self._fit_dp(model, server_round, cfg.seed * 100_003 + server_round, device))
        else:
            metrics.update(self._fit_engine(model))
        arrays = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}  # AUC of one class: none
        return SiteUpdate(arrays, self.n_train, {**metrics, "n_train": float(self.n_train),
                                                 "n_val": float(self.n_val)})

    def _fit_engine(self, model: torch.nn.Module) -> dict[str, float]:
        """``local_epochs`` epochs of the training engine from the global weights. As in HistoFL, the site's
        Adam state carries over from round to round: the engine's own checkpoint in ``WORKDIR/local`` keeps it,
        and its model tensors are replaced by the global weights before the engine resumes from it."""
        from ..train.engine import train

        local_dir = self.workdir / "local"
        done = _inject_global(local_dir, model)
        local = replace(self.method.config, epochs=done + self.config.local_epochs, seed=self.config.seed,
                        early_stopping=False)
        out: dict[str, float] = {}
        for ev in train(_FromGlobal(self.method, model, local), local_dir, resume=True):
            if ev.kind == "epoch":
                out["train_loss"] = float(ev.losses.get("total", math.nan))
            elif ev.kind == "validation":
                out.update({f"local_val_{k}": float(v) for k, v in {**ev.losses, **ev.metrics}.items()})
        return out

    def _fit_dp(self, model: torch.nn.Module, server_round: int, seed: int, device: torch.device
                ) -> dict[str, float]:
        from .dp import Ledger, dp_train, plan

        cfg = self.config
        dp = plan(self.n_train, cfg.dp_epsilon, cfg.dp_delta, cfg.dp_batch, cfg.rounds, cfg.local_epochs)
        torch.manual_seed(seed)
        out = dp_train(self.method, model, dp, cfg.dp_clip, cfg.dp_batch, cfg.lr, cfg.weight_decay,
                       np.random.default_rng(seed), device, cfg.site_optimizer)
        ledger = Ledger(self.workdir / LEDGER)
        ledger.record(dp.noise_multiplier, dp.sample_rate, dp.steps_per_round)
        ledger.save()
        return {**out, "dp_epsilon": ledger.epsilon(cfg.dp_delta), "dp_delta": cfg.dp_delta,
                "dp_noise_multiplier": dp.noise_multiplier}

    def _measure(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """The model's bag loss, accuracy and AUC on the site's validation slides (nothing without them)."""
        res = self.method.evaluate(model, device)
        if res is None:
            return {}
        losses, metrics = res
        return {f"val_{k}": float(v) for k, v in {**losses, **metrics}.items() if math.isfinite(float(v))}

    def evaluate(self, global_arrays: Arrays) -> dict[str, float]:
        from ..train.engine import pick_device

        device = pick_device(self.config.device)
        return self._measure(self._model(global_arrays).to(device), device)


__all__ = ["HistoFLSite"]
