"""The ZoomMIL family: multi-magnification bags for training; predictions that read only what they zoom into.

How each step goes (:class:`~napari_wsimil.train.family.MethodFamily`):
- **prepare**: the levels (µm/px, low to high) are checked, the zoom bags that are missing or stale are
  extracted with the chosen encoder (every level: training mixes the children softly), ZoomMIL is
  built and ``RUN/run.json`` written;
- **live layer**: the lowest level's attention, with the zoom path — the patches chosen at each level and
  the attention of the children read there — as boxes over it;
- **predict**: per slide, the lowest level's tissue grid is read and encoded, then level by level only the
  children of the chosen patches, straight from the slide: no high-magnification bag is needed.
  ``predictions.csv`` reports the patches encoded and the seconds per slide; heatmap TIFFs are written
  per level;
- **corrections**: painted pixels do not feed ZoomMIL (slide labels only): "retrain" continues the run.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from ..errors import WsimilError
from ..train.family import MapMaker, MethodFamily, PredictRequest, Report
from ..train.run import PreparedRun, RunSpec, check_spec, labelled_slides, split_and_check_resume

DEFAULT_LOW_MPP = 8.0  # ≈1.25×, the paper's lowest magnification on BRIGHT
DEFAULT_STEPS = (2, 4)  # then 2.5× and 10×


def _quiet(_msg: str) -> None:
    pass


def parse_levels(text: str, low_mpp: float) -> tuple[float, ...]:
    """The levels' µm/px: ``text`` ("8,4,1"), or from ``low_mpp`` with the default steps (2× then 4×)."""

    if text and text.strip():
        try:
            mpps = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
        except ValueError:
            raise WsimilError(f"levels {text!r}: give µm/px numbers separated by commas, e.g. 8,4,1") from None
    else:
        mpps = [float(low_mpp)]
        for step in DEFAULT_STEPS:
            mpps.append(mpps[-1] / step)
        mpps = tuple(mpps)
    return mpps


def _check(mpps: Sequence[float], patch: int, k: int) -> list[int]:
    from .bags import check_levels

    if int(k) < 1:
        raise WsimilError(f"K, the patches ZoomMIL zooms into at each level, must be at least 1 (got {k})")
    return check_levels(mpps, patch)


def zoom_dir(cohort: Any, run: Path, encoder: str, mpps: Sequence[float], patch: int) -> Path:
    """Where a cohort's zoom bags live: beside its other features, one folder per encoder and levels."""
    from ..train.cohort import features_dir_for

    tag = "-".join(f"{m:g}" for m in mpps)
    return features_dir_for(cohort, run, encoder) / f"zoom-{tag}um-{patch}px"


class ZoomMILFamily(MethodFamily):
    """ZoomMIL (see the module doc)."""

    name = "zoommil"
    live_layer = "attention"
    uses_encoder = True
    default_mpp = DEFAULT_LOW_MPP
    default_patch = 256

    # ------------------------------------------------------------------------------------ training
    def prepare(self, spec: RunSpec, report: Report | None = None) -> PreparedRun:
        from ..io.atomic import write_text
        from ..train.registry import make_config
        from .bags import ensure_zoom_bags
        from .method import ZoomMILMethod

        say = report or _quiet
        check_spec(spec)
        overrides: dict[str, Any] = {**spec.config, "epochs": spec.epochs, "seed": spec.seed,
                                     "device": spec.device}
        if spec.lr is not None:
            overrides["lr"] = spec.lr
        cfg = make_config(spec.method, **overrides)
        mpps = parse_levels(cfg.levels, spec.mpp)
        ratios = _check(mpps, spec.patch, cfg.k)
        if mpps[0] != spec.mpp:  # the levels say where the lowest level is: the run's µm/px follows them
            say(f"levels {','.join(f'{m:g}' for m in mpps)}: the lowest level is {mpps[0]:g} µm/px")
            spec = replace(spec, mpp=mpps[0])
        cohort, usable, classes = labelled_slides(spec)
        present = sorted({s.label for s in usable})
        if len(present) < 2 or len(classes) < 2:
            raise WsimilError(f"the cohort has only class {present[0]!r}: a classifier needs labelled slides of "
                              "at least two classes")
        tr, va = split_and_check_resume(spec, usable, classes, encoder=spec.encoder, levels=list(mpps))
        run = Path(spec.out)
        out_dir = zoom_dir(cohort, run, spec.encoder, mpps, spec.patch)
        say(f"zoom bags: {len(tr) + len(va)} slides, encoder {spec.encoder}, {spec.patch} px at "
            f"{' → '.join(f'{m:g}' for m in mpps)} µm/px -> {out_dir}")
        bags = ensure_zoom_bags(tr + va, out_dir, spec.encoder, mpps, spec.patch, report=say, device=spec.device,
                                weights=spec.weights, project=cohort.source if cohort.is_project else None)
        index = {c: i for i, c in enumerate(classes)}
        cfg.n_classes = len(classes)
        method = ZoomMILMethod(cfg, [bags[s.slide_id] for s in tr], [index[s.label] for s in tr],
                               [bags[s.slide_id] for s in va], [index[s.label] for s in va])
        from ..train.engine import TrainingError

        try:
            method.check()
        except TrainingError as exc:
            raise WsimilError(str(exc)) from exc
        run.mkdir(parents=True, exist_ok=True)
        info = {"format": 1, "family": self.name, "cohort": str(Path(spec.source).resolve()),
                "method": spec.method, "encoder": spec.encoder, "weights": spec.weights, "mpp": mpps[0],
                "levels": list(mpps), "ratios": ratios, "patch": spec.patch, "classes": classes, "k": cfg.k,
                "seed": spec.seed, "features_dir": str(out_dir),
                "train_slides": [s.slide_id for s in tr], "val_slides": [s.slide_id for s in va]}
        write_text(run / "run.json", json.dumps(info, indent=1))
        say(f"training {spec.method}: {len(tr)} train / {len(va)} val slides, K {cfg.k}, classes "
            f"{', '.join(classes)}, {spec.epochs} epochs -> {run}")
        return PreparedRun(spec, method, classes, bags, info)

    def live_maps(self, prepared: PreparedRun, watch: Sequence[str]) -> MapMaker:
        from .bags import ensure_zoom_bags
        from .zoom_path import zoom_map

        spec, info = prepared.spec, prepared.info
        bags = dict(prepared.bags)
        missing = [s for s in watch if s not in bags]
        if missing:
            from ..train.cohort import load_cohort

            cohort = load_cohort(spec.source)
            items = [s for s in cohort.slides if s.slide_id in missing]
            bags.update(ensure_zoom_bags(items, Path(info["features_dir"]), spec.encoder, info["levels"],
                                         spec.patch, device=spec.device, weights=spec.weights,
                                         project=cohort.source if cohort.is_project else None))

        def maps(epoch: int, final: bool) -> list:
            return [zoom_map(spec.out, sid, bags[sid], epoch, weights="best" if final else "last")
                    for sid in watch if sid in bags]

        return maps

    # ------------------------------------------------------------------------------------ prediction
    def predict(self, request: PredictRequest, report: Report | None = None) -> dict[str, Any]:
        from ..infer.predictions import write_attention, write_predictions
        from ..io.atomic import write_text
        from ..train.cohort import load_cohort
        from .localisation import LOCALISATION_DIR
        from .predict import load_zoom_run, predict_slide

        say = report or _quiet
        run = load_zoom_run(request.run, device=request.device, weights=request.weights)
        cohort = load_cohort(request.cohort).only(request.options.get("slides"))  # one slide: a cluster task
        out = Path(request.out)
        (out / "attention").mkdir(parents=True, exist_ok=True)
        encoder = run.encoder()
        preds = []
        say(f"{run.method}: {len(cohort.slides)} slides, {' → '.join(f'{m:g}' for m in run.levels)} µm/px, "
            f"K {run.k}")
        for i, item in enumerate(cohort.slides, 1):
            t0 = time.perf_counter()
            pred, path = predict_slide(run, encoder, item, project=cohort.source if cohort.is_project else None)
            pred.seconds = time.perf_counter() - t0
            write_attention(pred, out / "attention" / f"{item.slide_id}.npz")
            write_attention(path.localisation, out / LOCALISATION_DIR / f"{item.slide_id}.npz")
            if request.options.get("heatmaps", True):
                from .zoom_path import write_level_heatmaps

                write_level_heatmaps(out / "heatmaps", item.slide_id, run, path,
                                     ome_zarr=bool(request.options.get("ome_zarr")))
            preds.append(pred)
            probs = " ".join(f"{c} {p:.3f}" for c, p in zip(run.classes, pred.probs))
            say(f"[{i}/{len(cohort.slides)}] {item.slide_id}: {probs} ({pred.patches_encoded} patches encoded, "
                f"{pred.seconds:.2f} s)")
        write_predictions(preds, run.n_classes, out / "predictions.csv")
        meta = {"run": str(Path(request.run).resolve()), "cohort": str(Path(request.cohort).resolve()),
                "family": self.name, "method": run.method, "classes": run.classes, "weights": request.weights,
                "levels": list(run.levels), "k": run.k}
        write_text(out / "prediction.json", json.dumps(meta, indent=1))
        say(f"predictions: {out / 'predictions.csv'}")
        return meta

    def evaluate(self, pred_dir: Path, truth: list, meta: dict[str, Any],
                 threshold: float | None = None) -> tuple[str, dict[str, Any]] | None:
        """The attention AUC and FROC of the zoom path on the finest level's tissue grid
        (:mod:`.localisation` says how the patches the model did not zoom into are ranked), with the same
        definitions as every other attention method's, so the numbers compare with CLAM-SB's at that level."""
        from ..infer.evaluation import localisation_metrics
        from ..infer.predictions import RunError
        from .localisation import LOCALISATION_DIR

        if not truth:
            return None
        folder = Path(pred_dir) / LOCALISATION_DIR
        if not folder.is_dir():
            raise RunError(f"{pred_dir} holds no zoom paths to score ({LOCALISATION_DIR}/): it predates their "
                           "scoring; run 'wsimil predict' again")
        metrics = localisation_metrics(truth, folder)
        if metrics:
            metrics["scored_on"] = "zoom path, finest level"
        return "localisation", metrics

    def report(self, name: str, metrics: dict[str, Any], say: Report) -> None:
        super().report(name, metrics, say)
        say("(ZoomMIL: scored on the finest level's tissue patches; those it read rank above those it did not "
            "zoom into)")

    # ------------------------------------------------------------------------ the interactive loop
    def _bag(self, run_dir: Path, slide_id: str, source: Path) -> Path:
        from ..train.cohort import load_cohort
        from ..train.run import read_run_info
        from .bags import ensure_zoom_bags

        info = read_run_info(run_dir)
        cohort = load_cohort(source)
        items = [s for s in cohort.slides if s.slide_id == slide_id]
        if not items:
            raise WsimilError(f"slide {slide_id} is not in {source}")
        out_dir = zoom_dir(cohort, Path(run_dir), info["encoder"], info["levels"], int(info["patch"]))
        return ensure_zoom_bags(items, out_dir, info["encoder"], info["levels"], int(info["patch"]),
                                weights=info.get("weights"),
                                project=cohort.source if cohort.is_project else None)[slide_id]

    def slide_map(self, run_dir: Path, slide_id: str, source: Path, weights: str = "best") -> Any:
        from .zoom_path import zoom_map

        state = json.loads((Path(run_dir) / "last.json").read_text())
        return zoom_map(Path(run_dir), slide_id, self._bag(Path(run_dir), slide_id, source),
                        int(state.get("epoch", 0)), weights=weights)

    def patch_scores(self, run_dir: Path, slide_id: str, source: Path) -> Any:
        from ..infer.pseudo_labels import PatchScores
        from .zoom_path import level0_scores

        coords, size, p, probs = level0_scores(Path(run_dir), self._bag(Path(run_dir), slide_id, source))
        return PatchScores(coords, size, p, probs, "lowest level's attention × slide probability")


FAMILY = ZoomMILFamily()

__all__ = ["DEFAULT_LOW_MPP", "FAMILY", "ZoomMILFamily", "parse_levels", "zoom_dir"]
