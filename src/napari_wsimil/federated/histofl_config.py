"""HistoFL's settings: what the server sends every site with the global weights (JSON, numbers and names)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import WsimilError
from ..train.engine import doc_field


@dataclass
class HistoFLConfig:
    """HistoFL (Lu 2022): each site trains attention MIL for one local epoch a round; the server averages
    every weight tensor and adds Gaussian noise of alpha·std(tensor) per site (none on biases). That noise
    carries NO privacy guarantee; for one, set dp_epsilon (Opacus DP-SGD at each site)."""

    mil_method: str = doc_field("The sites' network and losses: 'abmil' or 'clam-sb'.", default="abmil")
    classes: list[str] = doc_field("Slide classes, in order (every site uses the same).",
                                   default_factory=lambda: ["normal", "tumour"])
    encoder: str = doc_field("Patch encoder every site extracts its features with.", default="handcrafted")
    mpp: float = doc_field("µm/px of the patches.", default=0.5)
    patch: int = doc_field("Patch side in pixels.", default=256)
    in_dim: int = doc_field("Feature dimension (0: the encoder's, found by the server).", default=0)
    alpha: float = doc_field("HistoFL's noise level: per site and weight tensor, N(0, (alpha·std)²) is added "
                             "(0: plain weighted averaging). No privacy guarantee.", default=0.001)
    weighting: str = doc_field("'uniform' (every site the same) or 'slides' (by training-slide count).",
                               default="slides")
    local_epochs: int = doc_field("Local epochs per round.", default=1)
    site_optimizer: str = doc_field(
        "'adam' (HistoFL's) or 'sgd' (plain SGD). Averaging Adam steps made from a few slides per site is "
        "closer to a vote of the sites' directions than to the pooled gradient; with SGD the average is the "
        "pooled gradient's step. Give SGD a far larger lr (0.1 in docs/federated.md).", default="adam")
    lr: float = doc_field("Learning rate at the sites (HistoFL: Adam 2e-4).", default=2e-4)
    weight_decay: float = doc_field("Weight decay at the sites.", default=1e-5)
    mil: dict[str, Any] = doc_field("Further settings of the MIL method (hidden, dropout, ...).",
                                    default_factory=dict)
    standardise: bool = doc_field("Standardise the features: each site fits mean/std on its training patches "
                                  "in round 1 and the server averages them (buffers of the model). Off with "
                                  "DP-SGD, whose guarantee would not cover them.", default=True)
    dp_epsilon: float = doc_field("DP-SGD privacy budget ε per site over all rounds (0: no DP-SGD).", default=0.0)
    dp_delta: float = doc_field("DP-SGD δ.", default=1e-4)
    dp_clip: float = doc_field("DP-SGD per-slide gradient clipping norm.", default=1.0)
    dp_batch: int = doc_field("DP-SGD expected slides per step (Poisson sampling).", default=1)
    rounds: int = doc_field("Rounds of the federation (DP-SGD plans its noise for all of them).", default=10)
    val_fraction: float = doc_field("Share of each site's slides held out for validation.", default=0.25)
    seed: int = doc_field("Seed of the initial weights, the sites' sampling and the server's noise.", default=0)
    device: str = doc_field("Torch device at the sites.", default="cpu")

    def __post_init__(self) -> None:
        if self.mil_method not in ("abmil", "clam-sb"):
            raise WsimilError(f"HistoFL trains 'abmil' or 'clam-sb', not {self.mil_method!r}")
        if self.site_optimizer not in ("adam", "sgd"):
            raise WsimilError(f"site_optimizer must be 'adam' or 'sgd', not {self.site_optimizer!r}")
        if not self.lr > 0:
            raise WsimilError(f"lr must be above 0, got {self.lr}")
        if self.weighting not in ("uniform", "slides"):
            raise WsimilError(f"weighting must be 'uniform' or 'slides', not {self.weighting!r}")
        if self.alpha < 0:
            raise WsimilError(f"alpha must be 0 or more, got {self.alpha}")
        if self.dp_epsilon < 0 or not 0 < self.dp_delta < 1 or self.dp_clip <= 0 or self.dp_batch <= 0:
            raise WsimilError("DP-SGD needs epsilon >= 0 (0: off), 0 < delta < 1, clip > 0 and batch > 0")
        if self.local_epochs < 1 or self.rounds < 1:
            raise WsimilError("local_epochs and rounds must be at least 1")
        if len(self.classes) < 2:
            raise WsimilError(f"a classifier needs at least two classes, got {self.classes}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HistoFLConfig:
        """From JSON; an unknown option is an error naming it."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(values) - known)
        if bad:
            raise WsimilError(f"HistoFL has no option(s) {', '.join(bad)}; options: {', '.join(sorted(known))}")
        return cls(**values)


def mil_config(config: HistoFLConfig) -> Any:
    """The MIL method's own config (what ``last.json`` saves and ``wsimil predict`` rebuilds the network from)."""
    from ..train.registry import make_config

    return make_config(config.mil_method, **{**config.mil, "n_classes": len(config.classes), "lr": config.lr,
                                             "weight_decay": config.weight_decay, "seed": config.seed,
                                             "optimizer": config.site_optimizer,
                                             "device": config.device,
                                             "standardise": config.standardise and not config.dp_epsilon})


__all__ = ["HistoFLConfig", "mil_config"]
