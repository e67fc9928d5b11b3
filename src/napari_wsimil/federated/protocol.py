"""What a federated method is, apart from the engine that carries its messages.

A site runs a :class:`SiteTrainer` on its own data: it receives the global weights, trains locally and returns
a :class:`SiteUpdate` that holds only weights and a few numbers (never slides, labels or features). The server
combines the updates with :meth:`FederatedMethod.aggregate`. Keeping this apart from Flower lets the methods be
tested in one process, and lets the Flower apps stay the same for every method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
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
