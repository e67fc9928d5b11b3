"""The interactive loop without Qt: train on a project, look at maps, correct pseudo-labels, retrain.

The training widget is a thin view over :class:`InteractiveSession`; tests and notebooks drive the same
object. Runs live in ``PROJECT/runs/<name>`` (the folders ``wsimil train`` writes), features in
``PROJECT/features/<encoder>``. Nothing here holds a lock on the project: the widget passes its open
:class:`~napari_wsimil.project.Project` (the one the labelling widget paints into) so that saving
corrections goes through the same lock and the same autosave rules.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WsimilError
from ..train.family import MethodFamily
from ..train.registry import family_of, get, run_family
from ..train.run import PreparedRun, RunSpec

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class RunSummary:
    """What the runs list shows."""

    name: str
    path: Path
    method: str
    epoch: int
    total_epochs: int
    val_loss: float | None
    finished: bool
    val_metrics: dict[str, float] | None = None  # of the last validated epoch (accuracy, auc ...)


def train_loss(losses: dict[str, float]) -> float | None:
    """The training loss a plot shows for an epoch's (or a step's) losses: the backpropagated total."""
    return losses.get("total")


def val_loss(losses: dict[str, float]) -> float | None:
    """The validation loss a plot shows: the bag (slide) loss where the method reports one, else the total."""
    return losses.get("bag", losses.get("total"))


def loss_history(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(epoch, loss), ...], "val": [...]}`` of a run folder's completed epochs, read from the
    ``history`` the engine commits with each checkpoint (``last.json``); empty lists for a run without one
    (written before the history was kept) or with an unreadable checkpoint. Non-finite losses are left out."""
    try:
        rows = json.loads((Path(run_dir) / "last.json").read_text()).get("history") or []
    except (OSError, ValueError, AttributeError):
        rows = []
    out: dict[str, list[tuple[int, float]]] = {"train": [], "val": []}
    for row in rows:
        try:
            epoch = int(row["epoch"])
        except (KeyError, TypeError, ValueError):
            continue
        for series, pick, key in (("train", train_loss, "losses"), ("val", val_loss, "val_losses")):
            value = pick(row.get(key) or {})
            if value is not None and math.isfinite(float(value)):
                out[series].append((epoch, float(value)))
    return out


def method_names() -> list[str]:
    """Every registered training method (the registry is the one source; widgets list this), less those
    whose family trains only across sites (``trainable = False``: FedMix, through ``wsimil federate``)."""
    from ..train.registry import methods

    return [n for n, info in methods().items() if getattr(info.family, "trainable", True)]


def method_options(name: str) -> list[tuple[str, Any, type | str, str]]:
    """(field, default, type, doc) of a method's settings, shared options first; what a form shows."""
    from dataclasses import MISSING, fields

    out = []
    for f in fields(get(name).config_cls):
        if f.name in ("n_classes", "device", "step_events", "epochs", "seed"):
            continue  # set by the session, not by the form
        default = f.default if f.default is not MISSING else None
        out.append((f.name, default, f.type, f.metadata.get("doc", "")))
    return out


def method_geometry(name: str) -> tuple[float, int]:
    """Default (µm/px, patch px) of a method, its family's: MIL encodes 256 px at 0.5 µm/px, segmentation
    trains a U-Net on 128 px at 1 µm/px (Pinchaud's resolution)."""
    fam = family_of(name)
    return fam.default_mpp, fam.default_patch


def method_family(name: str) -> MethodFamily:
    """The family of a method: what the widget asks whether it has an encoder, which layer it shows."""
    return family_of(name)


def method_uses_encoder(name: str) -> bool:
    """Whether a method's runs read features from a patch encoder (the widget then shows the picker)."""
    return family_of(name).uses_encoder


def _timm_family(encoder: str) -> bool:
    from ..features.encoders import TIMM_PREFIX

    return encoder == TIMM_PREFIX or encoder.startswith(TIMM_PREFIX + ":")


def encoder_requires_weights(encoder: str) -> bool:
    """Whether ``encoder`` cannot run without weights: only ``timm``, whose architecture is read from the
    hub folder (the other weights-taking built-ins fall back to a seeded random network, a baseline)."""
    from ..features.encoders import TIMM_PREFIX

    return encoder == TIMM_PREFIX


def encoder_problem(encoder: str, weights: str | Path | None = None, specs: Any = None) -> str | None:
    """Why ``encoder`` with ``weights`` cannot start a run (one sentence for the user), or None when it can.

    Checked before a run starts, so that a typo in a path is not found only after the cohort was split
    and the child process started: an unknown encoder, weights for one that takes none, the ``timm``
    encoder without its hub folder (the only one that cannot run without weights: the others fall back
    to a seeded random network), a weights path that does not exist, a folder where a file is needed or
    a hub folder without ``config.json``. ``specs`` is ``available_encoders()`` when the caller has it.
    """
    from ..features.encoders import available_encoders

    if not encoder:
        return "Choose an encoder."
    from ..features.interop import is_imported

    if is_imported(encoder):  # bags made elsewhere: no network, so no weights; the run checks the bags
        return (f"The {encoder} features were imported from files and take no weights file: clear the "
                "weights." if weights not in (None, "") else None)
    spec = (available_encoders() if specs is None else specs).get(encoder)
    timm = _timm_family(encoder)
    if spec is None and not timm:  # any timm:ARCH is built on request, listed or not
        return f"There is no encoder named {encoder!r} (`wsimil encoders` lists them)."
    takes = True if spec is None else spec.takes_weights
    if weights in (None, ""):
        if encoder_requires_weights(encoder):
            return ("The timm encoder needs a weights folder (a Hugging Face hub folder holding timm's "
                    "config.json and the weights): choose it with 'Folder…', or choose timm:ARCH.")
        return None
    if not takes:
        return f"The {encoder} encoder takes no weights file: clear the weights."
    path = Path(weights).expanduser()
    if not path.exists():
        return f"Weights for {encoder}: {path} does not exist."
    if path.is_dir():
        if timm:
            if not (path / "config.json").is_file():
                return (f"Weights for {encoder}: the folder {path} holds no config.json (a timm hub folder "
                        "has config.json beside model.safetensors or pytorch_model.bin).")
        elif spec is not None and spec.source == "builtin":
            return f"Weights for {encoder}: {path} is a folder; choose the weights file in it."
    return None


class InteractiveSession:
    """Training, maps and corrections for one project."""

    def __init__(self, project: Any):
        self.project = project

    @property
    def root(self) -> Path:
        return Path(self.project.root)

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    # ---------------------------------------------------------------------------------------- runs
    def runs(self) -> list[RunSummary]:
        out = []
        if not self.runs_dir.is_dir():
            return out
        for d in sorted(p for p in self.runs_dir.iterdir() if (p / "last.json").is_file()):
            try:
                state = json.loads((d / "last.json").read_text())
                info = json.loads((d / "run.json").read_text()) if (d / "run.json").is_file() else {}
            except (OSError, ValueError):
                continue
            cfg = state.get("config", {})
            best = state.get("best_val_loss", state.get("best_loss"))
            out.append(RunSummary(d.name, d, info.get("method", state.get("method", {}).get("name", "?")),
                                  int(state.get("epoch", 0)), int(cfg.get("epochs", 0)),
                                  None if best is None or (isinstance(best, float) and math.isinf(best)) else best,
                                  state.get("stopped") is not None, state.get("val_metrics")))
        return out

    def run_dir(self, name: str) -> Path:
        if not _RUN_NAME.match(name or ""):
            raise WsimilError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (no spaces or slashes)")
        return self.runs_dir / name

    def run_info(self, name: str) -> dict[str, Any]:
        """What ``RUN/run.json`` records (method, encoder, weights, µm/px, patch, classes, slides)."""
        path = self.run_dir(name) / "run.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise WsimilError(f"run {name}: {path} cannot be read ({exc})") from exc

    def loss_history(self, name: str) -> dict[str, list[tuple[int, float]]]:
        """The run's losses per completed epoch (see :func:`loss_history`)."""
        return loss_history(self.run_dir(name))

    def next_run_name(self, prefix: str) -> str:
        """``<prefix>-<n>`` with the smallest n whose folder does not exist under ``PROJECT/runs``."""
        taken = {p.name for p in self.runs_dir.iterdir()} if self.runs_dir.is_dir() else set()
        n = 1
        while f"{prefix}-{n}" in taken:
            n += 1
        return f"{prefix}-{n}"

    def spec(self, method: str, name: str, *, epochs: int = 50, device: str = "auto", encoder: str = "handcrafted",
             mpp: float = 0.5, patch: int = 256, seed: int = 0, config: dict[str, Any] | None = None,
             resume: bool = False, weights: str | Path | None = None) -> RunSpec:
        """The request the Start button makes (``config``: the method's form values).

        ``encoder`` names the patch encoder of a MIL method (``available_encoders()`` lists them; a
        method of a family without one ignores it) and ``weights`` its weights file or hub folder, kept as an absolute
        path (run.json records it, and a resumed run reads it again); a new run is refused when that path
        does not exist."""
        cfg = dict(config or {})
        lr = cfg.pop("lr", None)
        if weights in ("", None):
            weights = None
        else:
            path = Path(weights).expanduser().resolve()
            if not resume and not path.exists():
                raise WsimilError(f"weights for encoder {encoder}: {path} does not exist")
            weights = str(path)
        return RunSpec(source=self.root, method=method, out=self.run_dir(name), epochs=int(epochs),
                          encoder=encoder, weights=weights, mpp=float(mpp), patch=int(patch), seed=int(seed),
                          lr=lr, device=device, resume=resume, config=cfg)

    def resume_spec(self, name: str, extra_epochs: int = 0, device: str = "auto") -> RunSpec:
        """Continue run ``name`` from its last checkpoint with its own settings (plus ``extra_epochs``)."""
        d = self.run_dir(name)
        try:
            info = json.loads((d / "run.json").read_text())
            state = json.loads((d / "last.json").read_text())
        except (OSError, ValueError) as exc:
            raise WsimilError(f"run {name} cannot be resumed: {exc}") from exc
        known = {f for f in get(info["method"]).config_cls.__dataclass_fields__}
        cfg = {k: v for k, v in state.get("config", {}).items()
               if k in known and k not in ("n_classes", "device", "epochs", "seed", "step_events")}
        epochs = int(state.get("config", {}).get("epochs", state.get("epoch", 1))) + int(extra_epochs)
        return self.spec(info["method"], name, epochs=epochs, device=device, encoder=info["encoder"],
                         mpp=info["mpp"], patch=info["patch"], seed=info.get("seed", 0), config=cfg, resume=True,
                         weights=info.get("weights"))

    def retrain_spec(self, name: str, extra_epochs: int = 20, device: str = "auto") -> RunSpec:
        """"Retrain with corrections": the run's family says how painted corrections feed the next round
        (a segmentation or MS-CLAM run continues, re-reading the paint; another MIL run is followed by an
        MS-CLAM run ``<name>-corrected``)."""
        family, info = run_family(self.run_dir(name))
        return family.retrain(self, name, info, extra_epochs, device)

    def prepare(self, spec: RunSpec, report: Callable[[str], None] | None = None) -> PreparedRun:
        from .live import prepare_run

        return prepare_run(spec, report)

    def train(self, spec: RunSpec, watch: Sequence[str] = (), report: Callable[[str], None] | None = None
              ) -> Generator[Any, None, Any]:
        """Prepare (features, tile labels) then train, yielding engine events and maps of ``watch``."""
        from .live import train_with_maps

        prepared = self.prepare(spec, report)
        return (yield from train_with_maps(prepared, watch))

    def train_process(self, spec: RunSpec, watch: Sequence[str] = (),
                      report: Callable[[str], None] | None = None) -> Any:
        """Like :meth:`train`, in a child process (what the GUI uses: C code holding the GIL there cannot
        freeze the window); the returned iterator also has ``pause`` and ``resume`` (SIGSTOP and SIGCONT
        to the child: the computation itself stops) and ``close`` (terminates it)."""
        from .subprocess_run import SubprocessTraining

        return SubprocessTraining(spec, list(watch), report)

    # ---------------------------------------------------------------------------------------- maps
    def family(self, name: str) -> MethodFamily:
        """The family of run ``name`` (from the method its run.json records)."""
        return run_family(self.run_dir(name))[0]

    def slide_map(self, name: str, slide_id: str, weights: str = "best") -> Any:
        """The live layer's map (a :class:`~napari_wsimil.train.events.MapEvent`) of one slide from run
        ``name``: attention for a MIL run, tumour probability for a segmentation run."""
        return self.family(name).slide_map(self.run_dir(name), slide_id, self.root, weights=weights)

    def operating_threshold(self, name: str) -> float | None:
        """The run's threshold from maps to tumour masks, or None (attention runs, and runs without one)."""
        return self.family(name).operating_threshold(self.run_dir(name))

    def scores(self, name: str, slide_id: str) -> Any:
        """Per-patch tumour probabilities of one slide (:class:`~napari_wsimil.infer.pseudo_labels.PatchScores`)."""
        return self.family(name).patch_scores(self.run_dir(name), slide_id, self.root)

    # ---------------------------------------------------------------------------- pseudo-labels
    def class_ids(self) -> tuple[int, int]:
        """(tumour id, normal id) among the project's pixel classes, matched by name like tile labels are."""
        from ..train.tile_labels import pseudo_label_class_ids

        return pseudo_label_class_ids({c.id: c.name for c in self.project.classes})

    def pseudo_labels(self, name: str, slide_id: str, high: float = 0.7, low: float = 0.3) -> np.ndarray:
        """Pseudo-labels at the project's label resolution; pixels the user already painted keep their paint
        (a correction is never overwritten by the model it corrected). How they are made is the run's
        family's (a segmentation run's are pixel-level and saved as ``PROJECT/pseudo_labels/<run>/``)."""
        tumour, normal = self.class_ids()
        return self.family(name).pseudo_labels(self.run_dir(name), self.project, slide_id, tumour, normal, high,
                                               low)

    def save_corrections(self, slide_id: str, pseudo: np.ndarray, edited: np.ndarray) -> int:
        """Save the pixels the user changed on the pseudo-label layer as paint; returns their count."""
        from ..infer.pseudo_labels import corrections

        changed = corrections(pseudo, edited)
        mask = changed > 0
        if not mask.any():
            return 0
        painted = self.project.pixel_labels(slide_id)
        painted[mask] = changed[mask]
        self.project.save_pixel_labels(slide_id, painted)
        return int(mask.sum())

    def suggestions(self, name: str, slide_id: str, k: int = 10) -> np.ndarray:
        """(k, 3) of (x, y, entropy): the most uncertain places, level-0 patch centres, spread out."""
        from ..infer.pseudo_labels import suggest_regions

        return suggest_regions(self.scores(name, slide_id), k)


__all__ = ["InteractiveSession", "RunSummary", "encoder_problem", "encoder_requires_weights", "loss_history",
           "method_family", "method_geometry", "method_names", "method_options", "method_uses_encoder",
           "train_loss", "val_loss"]
