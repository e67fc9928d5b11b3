"""FedMix (Wicaksana 2023) as a federated method, and an in-process runner of its rounds.

:class:`FedMix` is what the Flower apps load ("napari_wsimil.federated.fedmix:FedMix"): two global U-Nets
(different initial weights, so that their agreement means something), each site's trainer
(:mod:`.fedmix_site`) and the adaptive aggregation (:mod:`.fedmix_weights`).

:func:`run_local` drives the same protocol without Flower, every site in this process: for tests, the
benchmark and a quick look. It writes a run folder the segmentation family reads (``run.json`` of kind
"segmentation", method "fedmix"; ``ckpt-RRRR.safetensors`` + ``last.json`` per round, net A under ``model.*``,
net B under ``net_b.*``), so ``wsimil predict`` / ``evaluate`` work on it. The sites' own validation numbers
choose ``best.safetensors`` and set ``operating_point.json`` (:mod:`.fedmix_validation`), in ``run_local`` as in
the server's round loop. The method is registered with the
segmentation family for that reason, under a family whose ``prepare`` refuses ``wsimil train``: FedMix trains
across sites, through ``wsimil federate``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError
from ..seg.family import SegmentationFamily
from ..train.registry import MethodInfo
from .fedmix_config import FedMixConfig
from .fedmix_weights import adaptive_weights, weighted_average
from .protocol import Arrays, FederatedMethod, SiteTrainer, SiteUpdate, write_model_round


class FedMix(FederatedMethod):
    """FedMix: mixed-supervision segmentation across sites (see the module doc)."""

    name = "fedmix"
    config_cls = FedMixConfig

    def initial_arrays(self, config: FedMixConfig) -> Arrays:
        import torch

        from ..seg.nets import build_net
        from .fedmix_site import net_arrays

        out: Arrays = {}
        for k, prefix in enumerate(("a", "b")):
            torch.manual_seed(config.seed * 2 + k)
            out.update(net_arrays(build_net(config), prefix))
        return out

    def site_trainer(self, source: Path, config: FedMixConfig, workdir: Path) -> SiteTrainer:
        from .fedmix_site import FedMixSite

        return FedMixSite(Path(source), config, Path(workdir))

    def aggregate(self, global_arrays: Arrays, updates: list[SiteUpdate], config: FedMixConfig,
                  rng: np.random.Generator) -> Arrays:
        """w_i ∝ |D_i|/Σ|D| + λ·L_i^β/Σ L_j^β (normalised), applied to both nets."""
        if not updates:
            return global_arrays
        w = self.weights(updates, config)
        return weighted_average([u.arrays for u in updates], w)

    @staticmethod
    def weights(updates: Sequence[SiteUpdate], config: FedMixConfig) -> np.ndarray:
        return adaptive_weights([u.num_examples for u in updates], [u.metrics["loss"] for u in updates],
                                config.lam, config.beta)

    # ---------------------------------------------------------------------------- the run folder
    @staticmethod
    def run_info(config: FedMixConfig, sites: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
        """``run.json`` of a FedMix run: a segmentation run the segmentation family can predict with."""
        return {"format": 1, "family": "segmentation", "kind": "segmentation", "method": "fedmix",
                "federated": True, "sites": [str(s) for s in sites], "encoder": None, "weights": None,
                "mpp": config.mpp, "patch": config.patch, "classes": list(classes), "seed": config.seed,
                "width": config.width, "depth": config.depth, "predict_with": None, "train_slides": [],
                "val_slides": [], "pixel_labelled_slides": [], "pixel_labelled_val_slides": []}

    @staticmethod
    def write_round(out: Path, arrays: Arrays, server_round: int, config: FedMixConfig,
                    history: list[dict[str, Any]]) -> Path:
        """Checkpoint the global nets after ``server_round`` as any federated round (net A under ``model.``, the
        model predict loads; net B under ``net_b.``)."""
        return write_model_round(out, arrays, server_round, {"config": asdict(config), "history": history},
                                 name=_tensor_name, metadata={"method": "fedmix"})

    @staticmethod
    def write_best(out: Path, arrays: Arrays, server_round: int) -> None:
        """``best.safetensors``: the global nets of the round the sites' summed validation chose
        (:class:`.fedmix_validation.BestRound`); what ``wsimil predict`` loads by default."""
        from ..io.atomic import write_bytes
        from .protocol import tensor_file_bytes

        write_bytes(out / "best.safetensors", tensor_file_bytes(arrays, {"epoch": str(server_round),
                                                                         "method": "fedmix"}, _tensor_name))

    @staticmethod
    def read_best(out: Path) -> Arrays:
        from safetensors.numpy import load_file

        return _from_tensor_names(load_file(str(out / "best.safetensors")))

    @staticmethod
    def read_round(out: Path) -> tuple[Arrays, int, list[dict[str, Any]]]:
        """(global arrays, round, history) of the last committed round of a run folder."""
        from safetensors.numpy import load_file

        state = json.loads((out / "last.json").read_text())
        arrays = _from_tensor_names(load_file(str(out / state["tensors"])))
        return arrays, int(state["round"]), list(state.get("history", []))

    @staticmethod
    def best_round(out: Path, config: FedMixConfig, prior: dict[str, Any] | None = None) -> Any:
        """What chooses the run's checkpoint and threshold from the sites' numbers (:mod:`.fedmix_validation`)."""
        from .fedmix_validation import BestRound

        return BestRound(out, FedMix, config, prior)


def _tensor_name(key: str) -> str:
    """Net A under ``model.`` (what predict loads), net B under ``net_b.``."""
    prefix, rest = key.split(".", 1)
    return ("model." if prefix == "a" else "net_b.") + rest


def _from_tensor_names(tensors: dict[str, np.ndarray]) -> Arrays:
    return {("a." + k[6:] if k.startswith("model.") else "b." + k[6:]): v for k, v in tensors.items()}


class FedMixFamily(SegmentationFamily):
    """The segmentation family for FedMix run folders: predicting, evaluating and maps as any segmentation
    run, but no centralised training (``trainable``: the Training widget does not offer it)."""

    trainable = False

    def prepare(self, spec: Any, report: Any = None) -> Any:
        raise WsimilError("fedmix trains across sites whose slides stay at each site: start it with 'wsimil "
                          "federate server --method fedmix' and one 'wsimil federate site' per site (or 'wsimil "
                          "federate simulate' on one workstation); 'wsimil train' cannot run it")


FAMILY = FedMixFamily()
METHODS = [MethodInfo("fedmix", FedMixConfig, FAMILY)]


def run_local(sites: Sequence[str | Path], config: FedMixConfig, rounds: int, out: str | Path, *,
              resume: bool = False, evaluate: bool = True,
              report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``rounds`` FedMix rounds with every site in this process; write the run folder ``out`` (see the
    module doc). ``resume`` continues from the last committed round. Returns run.json plus the history."""
    from ..io.atomic import write_text
    from ..seg.operating_point import describe
    from .fedmix_validation import numbers_only

    say = report or (lambda _m: None)
    if rounds < 1:
        raise WsimilError(f"rounds must be at least 1, got {rounds}")
    if not sites:
        raise WsimilError("FedMix needs at least one site")
    out = Path(out)
    if (out / "last.json").exists() and not resume:
        raise WsimilError(f"{out} already holds a run; pass resume to continue it or choose another folder")
    method = FedMix()
    trainers: list[Any] = []
    try:
        for i, s in enumerate(sites):
            trainers.append(method.site_trainer(Path(s), config, out / "sites" / f"site{i}"))
        classes = trainers[0].classes
        for t in trainers[1:]:
            if t.classes != classes:
                raise WsimilError(f"site {t.source.name} has classes {', '.join(t.classes)}, site "
                                  f"{trainers[0].source.name} {', '.join(classes)}: set classes=BENIGN,MALIGNANT")
        info = method.run_info(config, [str(Path(s).resolve()) for s in sites], classes)
        info["site_supervision"] = [t.kind for t in trainers]
        prior: dict[str, Any] = {}
        if resume and (out / "last.json").exists():
            arrays, done, history = method.read_round(out)
            prior = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
        else:
            arrays, done, history = method.initial_arrays(config), 0, []
        info["rounds"] = [r for r in prior.get("rounds", []) if r["round"] <= done]
        best = method.best_round(out, config, prior.get("best"))
        info["best"] = best.best
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "run.json", json.dumps(info, indent=1))
        rng = np.random.default_rng(config.seed)
        for r in range(done + 1, rounds + 1):
            updates = [t.fit(arrays, r) for t in trainers]
            w = method.weights(updates, config)
            previous, arrays = arrays, method.aggregate(arrays, updates, config, rng)
            row: dict[str, Any] = {"epoch": r, "round": r,
                                   "losses": {"total": float(np.mean([u.metrics["loss"] for u in updates]))},
                                   "sites": [{"site": t.source.name, "supervision": t.kind, "weight": float(wi),
                                              "num_examples": u.num_examples, **numbers_only(u.metrics)}
                                             for t, u, wi in zip(trainers, updates, w)]}
            # the sites measured the global model they started from (round r-1's): the sums choose the best
            validation = best.after_round(previous, r, [u.metrics for u in updates])
            if validation is not None and info["rounds"] and history:
                info["rounds"][-1]["validation"] = history[-1]["validation"] = validation
            info["rounds"].append({"round": r, "sites": {s["site"]: {k: s[k] for k in ("weight", "num_examples",
                                                                                       "loss")}
                                                         for s in row["sites"]}})
            history.append(row)
            if evaluate and r == rounds:
                last: list[list[dict[str, float]]] = []

                def measure(a: Any, final: Any = arrays) -> list[dict[str, float]]:
                    if a is not final:
                        return [t.evaluate(a) for t in trainers]
                    if not last:  # the last model is measured once, for the choice and for the history
                        last.append([t.evaluate(a) for t in trainers])
                    return last[0]

                validation, point = best.finish(arrays, r, measure)
                for site_row, m in zip(row["sites"], measure(arrays)):
                    site_row.update({f"global_{k}": v for k, v in numbers_only(m).items()})
                if validation is not None:
                    info["rounds"][-1]["validation"] = row["validation"] = validation
                info["operating_point"] = point
                why = best.best["select_by"] or "no site validates: the last round"
                say(f"checkpoint: round {best.best['round']} (by {why}); " + (
                    describe(point) if point else "no benign tissue at any site: masks are cut at 0.5"))
            info["best"] = best.best
            method.write_round(out, arrays, r, config, history)
            write_text(out / "run.json", json.dumps(info, indent=1))
            say(f"round {r}/{rounds}: " + ", ".join(
                f"{s['site']} ({s['supervision']}) loss {s['loss']:.3f} kept {s['num_examples']}/"
                f"{int(s['offered'])} w {s['weight']:.2f}" for s in row["sites"]))
    finally:
        for t in trainers:
            t.close()
    return {**info, "history": history}


__all__ = ["FAMILY", "METHODS", "FedMix", "FedMixFamily", "run_local"]
