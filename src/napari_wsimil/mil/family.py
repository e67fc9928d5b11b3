"""The attention-MIL family: ABMIL, CLAM-SB/MB and MS-CLAM train on feature bags and show attention.

How each step goes (:class:`~napari_wsimil.train.family.MethodFamily`):
- **prepare**: split the slides, extract the feature bags that are missing with the chosen encoder,
  derive MS-CLAM's tile labels from the drawings, build the method, write ``RUN/run.json``;
- **live layer**: attention maps of the watched slides from each checkpoint;
- **predict**: ``predictions.csv``, ``attention/<slide>.npz`` and ``heatmaps/<slide>.tif``;
- **corrections**: painted pixels are tile labels, which MS-CLAM learns from; a run of another MIL method
  is followed by an MS-CLAM run ``<name>-corrected`` with the same features and the settings that apply.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import WsimilError
from ..train.engine import TrainConfig, TrainingError
from ..train.family import BagStore, MapMaker, MethodFamily, PredictRequest, Report, RunSpecs
from ..train.run import PreparedRun, RunSpec, check_spec, labelled_slides, split_and_check_resume
from .training import BagDataset, MILMethod

TILE_LABEL_METHOD = "ms-clam"  # the MIL method that learns from tile labels (painted corrections)
_SESSION_SET = ("n_classes", "device", "epochs", "seed", "step_events")  # set per run, not carried over


def build(name: str, train_data: BagDataset, val_data: BagDataset | None = None,
          config: TrainConfig | None = None) -> MILMethod:
    """A ready-to-train method: pass it to :func:`napari_wsimil.train.train`.

    The cohorts are validated here (one class only, empty bags, labels outside the classes, NaN features
    raise :class:`TrainingError`), so a bad cohort fails before a training thread is started."""
    from ..train.registry import get

    info = get(name)
    if info.builder is None:
        raise TrainingError(f"{name} is a {info.family.name} method, not one built from feature bags")
    cfg = config if config is not None else info.config_cls()
    if not isinstance(cfg, info.config_cls):
        raise TrainingError(f"{name} needs a {info.config_cls.__name__}, got {type(cfg).__name__}")
    method = info.builder(cfg, train_data, val_data)
    method.check()
    return method


def _quiet(_msg: str) -> None:
    pass


def _bag_for(run_dir: Path, info: dict[str, Any], slide_id: str, source: Path) -> Path:
    """The feature bag of ``slide_id`` with the run's encoder (extracted now if missing)."""
    from ..train.cohort import ensure_features, features_dir_for, load_cohort

    cohort = load_cohort(source)
    items = [s for s in cohort.slides if s.slide_id == slide_id]
    if not items:
        raise WsimilError(f"slide {slide_id} is not in {source}")
    feat_dir = features_dir_for(cohort, run_dir, info["encoder"])  # the folder training used
    bags = ensure_features(items, feat_dir, info["encoder"], int(info["patch"]), float(info["mpp"]),
                           weights=info.get("weights"), project=cohort.source if cohort.is_project else None)
    return bags[slide_id]


class MILFamily(MethodFamily):
    """Attention MIL on feature bags (see the module doc)."""

    name = "mil"
    live_layer = "attention"
    uses_encoder = True
    default_mpp = 0.5
    default_patch = 256

    def prepare(self, spec: RunSpec, report: Report | None = None) -> PreparedRun:
        from ..io.atomic import write_text
        from ..train.cohort import check_tissue, ensure_features, features_dir_for
        from ..train.registry import make_config

        say = report or _quiet
        check_spec(spec)
        run = Path(spec.out)
        cohort, usable, classes = labelled_slides(spec)
        present = sorted({s.label for s in usable})
        if len(present) < 2:
            raise WsimilError(f"the cohort has only class {present[0]!r}: a classifier needs labelled slides of "
                              "at least two classes")
        if len(classes) < 2:
            raise WsimilError(f"a classifier needs at least two classes, got {classes}")
        tr, va = split_and_check_resume(spec, usable, classes, encoder=spec.encoder)
        slides = tr + va
        feat_dir = features_dir_for(cohort, run, spec.encoder)
        say(f"features: {len(slides)} slides, encoder {spec.encoder}, {spec.patch} px at {spec.mpp:g} µm/px "
            f"-> {feat_dir}")
        bags = ensure_features(slides, feat_dir, spec.encoder, spec.patch, spec.mpp, report=say,
                               device=spec.device, weights=spec.weights,
                               project=cohort.source if cohort.is_project else None)
        check_tissue(bags, spec.mpp, spec.patch)

        index = {c: i for i, c in enumerate(classes)}
        tiles: dict[str, Any] = {}
        if spec.method == TILE_LABEL_METHOD:
            from ..train.cohort_labels import cohort_tile_labels

            tiles = cohort_tile_labels(cohort, tr, bags, classes, mapping=spec.tile_classes,
                                       exhaustive=spec.exhaustive_labels, min_fraction=spec.tile_min_fraction,
                                       report=say)
            say(f"{spec.method}: {len(tiles)} of {len(tr)} training slides have tile labels"
                + ("" if tiles else "; it learns from slide labels only"))

        def dataset(items: list) -> BagDataset | None:
            if not items:
                return None
            return BagDataset(files=[bags[s.slide_id] for s in items], labels=[index[s.label] for s in items],
                              instance_labels=[tiles.get(s.slide_id) for s in items])

        overrides: dict[str, Any] = {**spec.config, "epochs": spec.epochs, "seed": spec.seed,
                                     "device": spec.device, "n_classes": len(classes)}
        if spec.lr is not None:
            overrides["lr"] = spec.lr
        method = build(spec.method, dataset(tr), dataset(va), make_config(spec.method, **overrides))

        run.mkdir(parents=True, exist_ok=True)
        info = {"format": 1, "family": self.name, "cohort": str(Path(spec.source).resolve()),
                "method": spec.method, "encoder": spec.encoder, "weights": spec.weights, "mpp": spec.mpp,
                "patch": spec.patch, "classes": classes, "seed": spec.seed, "features_dir": str(feat_dir),
                "train_slides": [s.slide_id for s in tr], "val_slides": [s.slide_id for s in va],
                "tile_labelled_slides": sorted(tiles)}
        write_text(run / "run.json", json.dumps(info, indent=1))
        say(f"training {spec.method}: {len(tr)} train / {len(va)} val slides, classes {', '.join(classes)}, "
            f"{spec.epochs} epochs -> {run}")
        return PreparedRun(spec, method, classes, bags, info)

    def live_maps(self, prepared: PreparedRun, watch: Sequence[str]) -> MapMaker:
        from .live import slide_map, watch_prepared

        watched = watch_prepared(prepared, list(watch))
        run_dir = prepared.spec.out

        def maps(epoch: int, final: bool) -> list:
            # at the end: the model 'wsimil predict' will use, best by validation loss
            return [slide_map(run_dir, w, epoch, weights="best" if final else "last") for w in watched]

        return maps

    # ------------------------------------------------------------------------------------ prediction
    def predict(self, request: PredictRequest, report: Report | None = None) -> dict[str, Any]:
        from ..infer.predictions import write_attention, write_predictions
        from ..io.atomic import write_text
        from ..train.cohort import ensure_features, load_cohort
        from .predict import load_run, predict_bag

        say = report or _quiet
        opts = request.options
        overlap = float(opts.get("heatmap_overlap") or 0.0)
        if opts.get("masks"):
            raise WsimilError("--masks cuts the probability maps of segmentation runs; for attention runs use "
                              "the heatmaps (PRED/heatmaps) or the Training widget's outline export")
        if not 0 <= overlap < 1:
            raise WsimilError(f"--heatmap-overlap must be in [0, 1), got {overlap}")
        run = load_run(request.run, device=request.device, weights=request.weights)
        for key in ("encoder", "mpp", "patch"):
            if key not in run.info:
                raise WsimilError(f"{Path(request.run) / 'run.json'} is missing or lacks {key!r}: was RUN written "
                                  "by 'wsimil train'?")
        cohort = load_cohort(request.cohort).only(request.options.get("slides"))  # one slide: a cluster task
        store = self._store(request.run, cohort, run.info)
        say(f"features: {len(cohort.slides)} slides, encoder {store.encoder}, {store.patch} px at {store.mpp:g} "
            f"µm/px -> {store.folder}")
        encoding: dict[str, float] = {}  # what this prediction spent encoding each slide it had no bag for
        bags = ensure_features(cohort.slides, store.folder, store.encoder, store.patch, store.mpp, report=say,
                               device=request.device, weights=store.weights,
                               project=cohort.source if cohort.is_project else None, timings=encoding)
        out = Path(request.out)
        (out / "attention").mkdir(parents=True, exist_ok=True)
        preds = []
        for i, s in enumerate(cohort.slides, 1):
            t0 = time.perf_counter()
            pred = predict_bag(run, s.slide_id, bags[s.slide_id])
            # the bag's patches are what a prediction on a new slide encodes; `seconds` is the model's time on
            # the bag plus the encoding this prediction did above (none when the bag was already cached), so
            # the column compares with methods that read as they predict (ZoomMIL)
            pred.patches_encoded = len(pred.coords)
            pred.seconds = time.perf_counter() - t0 + encoding.get(s.slide_id, 0.0)
            write_attention(pred, out / "attention" / f"{s.slide_id}.npz")
            if opts.get("heatmaps", True):
                self._heatmap(run, s.slide_id, bags[s.slide_id], pred, out, overlap, bool(opts.get("ome_zarr")))
            preds.append(pred)
            probs = " ".join(f"{c} {p:.3f}" for c, p in zip(run.classes, pred.probs))
            say(f"[{i}/{len(cohort.slides)}] {s.slide_id}: {probs} ({len(pred.coords)} patches)")
        write_predictions(preds, run.n_classes, out / "predictions.csv")
        meta = {"run": str(Path(request.run).resolve()), "cohort": str(Path(request.cohort).resolve()),
                "family": self.name, "method": run.method, "classes": run.classes, "weights": request.weights}
        write_text(out / "prediction.json", json.dumps(meta, indent=1))
        say(f"predictions: {out / 'predictions.csv'}")
        return meta

    def bag_store(self, run_dir: Path, cohort: Any) -> BagStore | None:
        from ..train.run import read_run_info

        return self._store(run_dir, cohort, read_run_info(run_dir))

    @staticmethod
    def _store(run_dir: Path, cohort: Any, info: dict[str, Any]) -> BagStore:
        """The one place :meth:`predict` and ``predict --cluster``'s region tasks agree on the bags' folder and
        settings (the folder training used)."""
        from ..train.cohort import features_dir_for

        return BagStore(features_dir_for(cohort, run_dir, info["encoder"]), info["encoder"], info.get("weights"),
                        int(info["patch"]), float(info["mpp"]))

    @staticmethod
    def _heatmap(run: Any, slide_id: str, bag: Path, pred: Any, out: Path, overlap: float,
                 ome_zarr: bool = False) -> None:
        """``PRED/heatmaps/<slide>.tif``; a slide whose heatmap cannot be drawn is named, not fatal."""
        from ..features.bags import read_bag_attrs
        from ..infer.heatmap import write_slide_heatmap

        try:
            attrs = read_bag_attrs(bag)
            coords, scores = pred.coords, pred.attention
            if overlap > 0:
                from .predict import overlap_attention

                coords, scores = overlap_attention(run, slide_id, attrs["slide_path"], overlap,
                                                   attrs.get("slide_mpp"), k=int(pred.probs.argmax()))
            write_slide_heatmap(out / "heatmaps", slide_id, coords, scores, attrs, overlap=overlap,
                                ome_zarr=ome_zarr)
        except (WsimilError, OSError, KeyError, ValueError) as exc:
            print(f"{slide_id}: no heatmap ({exc})", file=sys.stderr)

    # ------------------------------------------------------------------------ the interactive loop
    def slide_map(self, run_dir: Path, slide_id: str, source: Path, weights: str = "best") -> Any:
        from ..train.run import read_run_info
        from .live import slide_map, watch_bag

        info = read_run_info(run_dir)
        watched = watch_bag(slide_id, _bag_for(Path(run_dir), info, slide_id, source))
        state = json.loads((Path(run_dir) / "last.json").read_text())
        return slide_map(run_dir, watched, int(state.get("epoch", 0)), weights=weights)

    def patch_scores(self, run_dir: Path, slide_id: str, source: Path) -> Any:
        from ..features import read_bag
        from ..features.bags import patch_size_level0
        from ..infer.pseudo_labels import PatchScores, patch_tumour_probability
        from ..train.run import read_run_info
        from .predict import load_run

        bag = read_bag(_bag_for(Path(run_dir), read_run_info(run_dir), slide_id, source))
        run = load_run(run_dir, device="cpu")
        p, probs, src = patch_tumour_probability(run.model, bag.features, run.device)
        return PatchScores(bag.coords, patch_size_level0(bag.attrs), p, probs, src)

    def retrain(self, runs: RunSpecs, name: str, info: dict[str, Any], extra_epochs: int = 20,
                device: str = "auto") -> RunSpec:
        if info["method"] == TILE_LABEL_METHOD:  # it reads the paint again
            return runs.resume_spec(name, extra_epochs, device)
        new = f"{name}-corrected"
        if (runs.run_dir(new) / "last.json").exists():
            return runs.resume_spec(new, extra_epochs, device)
        from dataclasses import fields

        from ..train.registry import get

        # the settings MS-CLAM shares with the first run (width, dropout, lr, k_sample...) carry over
        state = json.loads((runs.run_dir(name) / "last.json").read_text())
        known = {f.name for f in fields(get(TILE_LABEL_METHOD).config_cls)}
        cfg = {k: v for k, v in state.get("config", {}).items() if k in known and k not in _SESSION_SET}
        return runs.spec(TILE_LABEL_METHOD, new, epochs=extra_epochs, device=device, encoder=info["encoder"],
                         mpp=info["mpp"], patch=info["patch"], seed=info.get("seed", 0), config=cfg,
                         weights=info.get("weights"))


FAMILY = MILFamily()

__all__ = ["FAMILY", "MILFamily", "TILE_LABEL_METHOD", "build"]
