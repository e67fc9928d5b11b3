"""A method family: everything that differs between kinds of training method, behind one interface.

Why: the command line, :class:`~napari_wsimil.workflow.session.InteractiveSession`, the child-process
runner and the Training widget must work for every method without knowing which family it belongs to.
Attention MIL trains on feature bags and shows attention; weak segmentation trains a network on slide
pixels and shows tumour probability; ZoomMIL or federated training will differ again. Each family says,
here and only here, how it does each step; the callers ask the registry for a method's family and call it.

A new family subclasses :class:`MethodFamily` and registers its methods with
:func:`napari_wsimil.train.registry.register` (or the ``napari_wsimil.methods`` entry-point group).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..infer.evaluation import TruthItem
from .events import MapEvent, ProgressEvent
from .run import PreparedRun, RunSpec

Report = Callable[[str], None]
MapMaker = Callable[[int, bool], list[MapEvent]]


@dataclass
class PredictRequest:
    """``wsimil predict RUN --cohort C --out PRED``: the options every family takes, and ``options`` for
    the family's own (heatmaps, masks, slide scores ...), by the CLI's option names. ``options["slides"]``, when
    given, is the list of slide ids to predict (the rest of the cohort is left alone): a ``--cluster`` run predicts
    one slide per task this way, into a folder of its own, and merges them."""

    run: Path
    cohort: Path
    out: Path
    weights: str = "best"
    device: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BagStore:
    """Where and how a family's ``predict`` finds (or extracts) each slide's feature bag: the folder and the
    extraction settings it passes to ``train.cohort.ensure_features``. ``wsimil predict --cluster`` uses it to
    extract a huge slide's bag as region tasks (``features.regions``) before the family predicts from it."""

    folder: Path
    encoder: str
    weights: str | None
    patch: int
    mpp: float


class RunSpecs(Protocol):
    """What a family needs from the caller to plan a retraining: specs of runs in the same place."""

    def spec(self, method: str, name: str, **kwargs: Any) -> RunSpec: ...

    def resume_spec(self, name: str, extra_epochs: int = 0, device: str = "auto") -> RunSpec: ...

    def run_dir(self, name: str) -> Path: ...


class MethodFamily(ABC):
    """One family of training methods (see the module doc). Subclasses set the class attributes and must
    implement the abstract methods (a family missing one cannot be instantiated, so the omission shows at
    registration, not mid-run); the others have defaults that fit most families."""

    name: str = ""
    #: what the live layer shows: "attention" (a patch score map) or "probability" (a pixel map)
    live_layer: str = "attention"
    #: whether runs read features from a patch encoder (the widget then shows the encoder picker)
    uses_encoder: bool = True
    #: the working resolution and patch side a new run gets unless the user chooses others
    default_mpp: float = 0.5
    default_patch: int = 256

    # ------------------------------------------------------------------------------------ training
    @abstractmethod
    def prepare(self, spec: RunSpec, report: Report | None = None) -> PreparedRun:
        """Check the request, split the slides, make what training reads (bags, masks ...), build the
        method and write ``RUN/run.json`` (with ``family``); errors are :class:`~napari_wsimil.errors.
        WsimilError` naming what to fix."""

    def train(self, prepared: PreparedRun) -> Generator[ProgressEvent, None, Any]:
        """The engine's events; returns the trained model."""
        from .engine import train

        return (yield from train(prepared.method, prepared.spec.out, resume=prepared.spec.resume))

    @abstractmethod
    def live_maps(self, prepared: PreparedRun, watch: Sequence[str]) -> MapMaker:
        """``maps(epoch, final)``: the live layer's maps of the watched slides after a checkpoint
        (``final``: after training, from the weights a prediction will use)."""

    # ------------------------------------------------------------------------------------ prediction
    @abstractmethod
    def predict(self, request: PredictRequest, report: Report | None = None) -> dict[str, Any]:
        """Write ``PRED/predictions.csv`` (slide_id, prob_0 ...), the family's maps and
        ``PRED/prediction.json``; returns what prediction.json holds."""

    def bag_store(self, run_dir: Path, cohort: Any) -> BagStore | None:
        """The bag store :meth:`predict` reads the slides of ``cohort`` (a ``train.cohort.Cohort``) from, or None
        when this family does not predict from the standard feature bags (default): ``predict --cluster`` then
        runs each slide as one task, without region tasks."""
        return None

    def evaluate(self, pred_dir: Path, truth: list[TruthItem], meta: dict[str, Any],
                 threshold: float | None = None) -> tuple[str, dict[str, Any]] | None:
        """(name, metrics) of the family's maps against ground truth, or None when it has none. Default:
        the patch attention a prediction wrote to ``PRED/attention`` (attention families), scored as the
        patch-level attention AUC and the CAMELYON16 FROC."""
        from ..infer.evaluation import localisation_metrics

        if not truth or not (Path(pred_dir) / "attention").is_dir():
            return None
        return "localisation", localisation_metrics(truth, Path(pred_dir) / "attention")

    def report(self, name: str, metrics: dict[str, Any], say: Report) -> None:
        """Print what :meth:`evaluate` measured (default: the attention's localisation)."""
        from ..infer.metrics import format_metric as f

        loc = metrics
        say(f"localisation on {loc['n_slides_with_truth']} slides with ground truth "
            f"({loc['n_slides_with_tumour_patches']} with tumour patches, {loc['n_lesions']} lesions): "
            f"attention AUC {f(loc['attention_auc'])} (pooled {f(loc['attention_auc_pooled'])})  "
            f"FROC {f(loc['froc'])}")

    # ------------------------------------------------------------------------ the interactive loop
    @abstractmethod
    def slide_map(self, run_dir: Path, slide_id: str, source: Path, weights: str = "best") -> MapEvent:
        """The live layer's map of one slide of the cohort or project ``source`` from a finished run."""

    @abstractmethod
    def patch_scores(self, run_dir: Path, slide_id: str, source: Path) -> Any:
        """Per-patch tumour probabilities of one slide
        (:class:`~napari_wsimil.infer.pseudo_labels.PatchScores`): what suggestions are drawn from."""

    def pseudo_labels(self, run_dir: Path, project: Any, slide_id: str, tumour: int, normal: int,
                      high: float = 0.7, low: float = 0.3) -> np.ndarray:
        """Pseudo-labels at the project's label resolution from :meth:`patch_scores`; painted pixels keep
        their paint (a correction is never overwritten by the model it corrected)."""
        from ..infer.pseudo_labels import pseudo_label_image

        geometry = project.label_geometry(slide_id)
        pseudo = pseudo_label_image(self.patch_scores(run_dir, slide_id, Path(project.root)), geometry.shape,
                                    geometry.downsample, tumour, normal, high, low)
        painted = project.pixel_labels(slide_id)
        return np.where(painted > 0, painted, pseudo).astype(np.uint8)

    def retrain(self, runs: RunSpecs, name: str, info: dict[str, Any], extra_epochs: int = 20,
                device: str = "auto") -> RunSpec:
        """"Retrain with corrections": the spec of the next round after the user painted corrections.
        Default: the run continues for ``extra_epochs`` more, re-reading the project's paint."""
        return runs.resume_spec(name, extra_epochs, device)

    def operating_threshold(self, run_dir: Path) -> float | None:
        """The probability from which the run's maps call tumour, or None where that has no meaning."""
        return None


__all__ = ["MapMaker", "MethodFamily", "PredictRequest", "Report", "RunSpecs", "TruthItem"]
