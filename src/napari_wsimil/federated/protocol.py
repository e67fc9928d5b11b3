"""What a federated method is, apart from the engine that carries its messages.

A site runs a :class:`SiteTrainer` on its own data: it receives the global weights, trains locally and returns
a :class:`SiteUpdate` that holds only weights and a few numbers (never slides, labels or features). The server
combines the updates with :meth:`FederatedMethod.aggregate`. Keeping this apart from Flower lets the methods be
tested in one process, and lets the Flower apps stay the same for every method.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

Arrays = dict[str, np.ndarray]


@dataclass
class SiteUpdate:
    """What one site sends back after a round: its weights, how many examples they were trained on (the
    weight of plain averaging), and scalar metrics (local loss, privacy spent ...)."""

    arrays: Arrays
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class SiteTrainer(ABC):
    """One site's local training, run inside the site's own process on the site's own data."""

    @abstractmethod
    def fit(self, global_arrays: Arrays, server_round: int) -> SiteUpdate:
        """Train from the global weights for the method's local epochs; return the site's update."""

    @abstractmethod
    def evaluate(self, global_arrays: Arrays) -> dict[str, float]:
        """The global model measured on the site's own held-out data (numbers only)."""


class FederatedMethod(ABC):
    """A federated method: its settings, the initial global weights, each site's trainer and the server's
    aggregation."""

    name: ClassVar[str]
    config_cls: ClassVar[type]

    @abstractmethod
    def initial_arrays(self, config: Any) -> Arrays:
        """The global model before round 1, built from the settings alone (the server holds no data)."""

    @abstractmethod
    def site_trainer(self, source: Path, config: Any, workdir: Path) -> SiteTrainer:
        """The trainer for the site whose data is ``source`` (a project folder or cohort CSV)."""

    @abstractmethod
    def aggregate(self, global_arrays: Arrays, updates: list[SiteUpdate], config: Any,
                  rng: np.random.Generator) -> Arrays:
        """The next global weights from the sites' updates (only valid updates reach this)."""

    # ---- the server's run folder: a training run folder that ``wsimil predict`` reads -------------------
    # Defaults for a method with one network whose arrays are its state dict; a method with more (FedMix:
    # two U-Nets) overrides these three with its own layout.

    def run_info(self, config: Any, sites: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
        """``RUN/run.json``'s request part (family, method, classes ...); the server adds the rounds."""
        return {"format": 1, "federated": self.name, "method": self.name, "sites": list(sites),
                "classes": list(classes), "config": asdict(config)}

    def write_round(self, out: Path, arrays: Arrays, server_round: int, config: Any,
                    history: list[dict[str, Any]]) -> Path:
        """Checkpoint the global model after ``server_round``: ``ckpt-RRRR.safetensors`` (``model.*``) first,
        ``last.json`` last and atomically (the commit point, as the training engine's checkpoints)."""
        return write_model_round(out, arrays, server_round, {"config": asdict(config), "history": history})

    def read_round(self, out: Path) -> tuple[Arrays, int, list[dict[str, Any]]]:
        """(global arrays, round, history) of the last committed round of a run folder."""
        return read_model_round(out)


def model_name(key: str) -> str:
    """A global array's name in a run's tensor file: the model's weights under ``model.``, as the engine saves."""
    return f"model.{key}"


def tensor_file_bytes(arrays: Arrays, metadata: dict[str, str], name: Callable[[str], str] = model_name) -> bytes:
    """The arrays as safetensors bytes. ``np.array(order="C")``, not ``np.ascontiguousarray``: the latter makes 0-d
    arrays (BatchNorm's ``num_batches_tracked``) 1-d, and the checkpoint check then refuses them."""
    import torch
    from safetensors.torch import save as st_save

    return st_save({name(k): torch.from_numpy(np.array(v, order="C")) for k, v in arrays.items()}, metadata=metadata)


def write_model_round(out: Path, arrays: Arrays, server_round: int, state: dict[str, Any],
                      name: Callable[[str], str] = model_name, metadata: dict[str, str] | None = None) -> Path:
    """``ckpt-RRRR.safetensors`` with each array under ``name(key)`` (default ``model.``), then ``last.json``
    (``epoch`` = round, so the runs list and ``wsimil predict`` read it as any run; written last and atomically:
    the commit point); older tensor files are removed."""
    from ..io.atomic import write_bytes, write_text

    out.mkdir(parents=True, exist_ok=True)
    tensors = f"ckpt-{server_round:04d}.safetensors"
    write_bytes(out / tensors, tensor_file_bytes(arrays, {"round": str(server_round), **(metadata or {})}, name))
    write_text(out / "last.json", json.dumps({"format": 1, **state, "epoch": server_round, "round": server_round,
                                              "tensors": tensors}, indent=1))
    for old in out.glob("ckpt-*.safetensors"):
        if old.name != tensors:
            old.unlink(missing_ok=True)
    return out / tensors


def read_model_round(out: Path) -> tuple[Arrays, int, list[dict[str, Any]]]:
    """The inverse of :func:`write_model_round`."""
    from safetensors.numpy import load_file

    state = json.loads((out / "last.json").read_text())
    tensors = load_file(str(out / state["tensors"]))
    arrays = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    return arrays, int(state["round"]), list(state.get("history", []))
