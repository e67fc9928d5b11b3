"""What the three segmentation methods share: the net, the patches, validation, the operating threshold.

:class:`SegMethod` is a method of the training engine (:mod:`napari_wsimil.train.engine`) with everything
but the method itself: the patch plan, how patches are read (with context), their tensors and augmentation,
the fixed validation patches and their slide-level and pixel metrics, and the operating threshold set when
training ends. :mod:`.pinchaud`, :mod:`.hybrid` and :mod:`.confkd` add each method's patch mix and losses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...train.engine import TrainingError, binary_auc
from ..configs import SegConfig
from ..data import SegSlide
from ..loader import Batch, Patch, PatchBatches, read_patch
from ..maps import default_grid
from ..nets import build_net, receptive_margin
from ..sampling import GridBoard, PatchRequest, SlideScheduler, draw_centres, plan_epoch


def load_init_weights(net: nn.Module, path: str | Path) -> list[str]:
    """Auto-encoder weights (shared layers copied) or a segmentation checkpoint (loaded whole)."""
    from safetensors.torch import load_file

    from ..nets import autoencoder_pretrain_net, transfer_encoder

    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"init_weights {path} does not exist")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise TrainingError(f"cannot read init_weights {path}: {exc}") from exc
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")} or tensors
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("kind") == "wsimil autoencoder":
        w, d = int(meta["width"]), int(meta["depth"])
        if (w, d) != (getattr(net, "width", w), getattr(net, "depth", d)):
            raise TrainingError(f"init_weights {path.name} were pre-trained with width {w}, depth {d}; this run has "
                                f"width {net.width}, depth {net.depth}: set the same ones")
        ae = autoencoder_pretrain_net(w, d)
        ae.load_state_dict(state)
        return transfer_encoder(ae, net)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise TrainingError(f"init_weights {path} do not fit this network ({exc}); check width/depth") from exc
    return list(state)


def _to_tensors(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    x = torch.from_numpy(batch.rgb).to(device).permute(0, 3, 1, 2).float().div_(255)
    x = x.contiguous(memory_format=torch.channels_last)
    out = {"x": x, "labels": torch.from_numpy(batch.labels.astype(np.int64)).to(device),
           "tissue": torch.from_numpy(batch.tissue).to(device),
           "slide": torch.from_numpy(batch.slide_labels).to(device)}
    if batch.soft is not None:
        out["soft"] = torch.from_numpy(batch.soft).to(device)
    return out


class SegMethod:
    """The parts the three methods share (see the module doc); subclasses set ``name`` and the losses."""

    name = "seg"
    dual = False
    needs_paint = False

    def __init__(self, config: SegConfig, train_slides: Sequence[SegSlide], val_slides: Sequence[SegSlide] = (),
                 *, mpp: float = 1.0, patch: int = 128, maps_dir: str | Path | None = None):
        self.config = config
        self.train_slides = list(train_slides)
        self.val_slides = list(val_slides)
        self.mpp, self.patch = float(mpp), int(patch)
        self.maps_dir = None if maps_dir is None else Path(maps_dir)
        self.block = max(8, 1 << (max(1, self.patch // 2).bit_length() - 1))  # a power of two: tiles meet chunks
        self.map_tile = max(self.block, config.map_tile // self.block * self.block)  # whole blocks per tile
        self.board = GridBoard(self.train_slides, self.mpp, self.block, config.alpha)
        self.scheduler = SlideScheduler([s.label for s in self.train_slides], config.revisit_epochs)
        self.model: nn.Module | None = None
        self.mapper: Any = None
        self._val: list[tuple[int, list[Patch]]] | None = None
        self._painted_val: list[Patch] | None = None
        self._painted: dict[int, np.ndarray] = {}
        self._context: int | None = None

    # ------------------------------------------------------------------------------ engine protocol
    def check(self) -> None:
        cfg = self.config
        mult = 2 ** (cfg.depth - 1)
        if self.patch % mult:
            raise TrainingError(f"the patch size ({self.patch} px) must be a multiple of {mult} for a U-Net of depth "
                                f"{cfg.depth}")
        if cfg.checkpoint_by not in ("auto", "loss"):
            raise TrainingError(f"checkpoint_by is 'auto' or 'loss', not {cfg.checkpoint_by!r}")
        if not 0 <= getattr(cfg, "max_map_wait", 0) <= 1:
            raise TrainingError(f"max_map_wait is a share of the training time, between 0 and 1 (got "
                                f"{cfg.max_map_wait})")
        labels = [s.label for s in self.train_slides]
        if 1 not in labels:
            raise TrainingError("no malignant training slide: weakly supervised segmentation learns tumour from "
                                "malignant slides; an all-benign cohort cannot teach it")
        if 0 not in labels:
            raise TrainingError("no benign training slide: the model needs benign slides to learn what is not "
                                "tumour")
        if self.needs_paint and not any(s.annotated for s in self.train_slides):
            raise TrainingError(f"{self.name} learns from painted pixels on some slides, and no training slide has "
                                "any: paint tumour/normal regions (or give pixel_labels masks), or use pinchaud, "
                                "which needs slide labels only")
        if cfg.batch_size < 2:
            raise TrainingError("batch_size must be at least 2 (batch norm)")
        if not 0.0 <= cfg.operating_fpr < 1.0:
            raise TrainingError(f"operating_fpr is a share of benign tissue, at least 0 and below 1 (got "
                                f"{cfg.operating_fpr})")
        from ..operating_point import RULES

        if getattr(cfg, "operating_rule", "auto") not in RULES:
            raise TrainingError(f"operating_rule is one of {', '.join(RULES)}, not {cfg.operating_rule!r}")
        if cfg.context < -1 or (cfg.context > 0 and (2 * cfg.context) % mult):
            raise TrainingError(f"context is -1 (the net's receptive margin), 0 or a number of pixels whose double "
                                f"is a multiple of {mult} (got {cfg.context})")

    def build_model(self) -> nn.Module:
        net = build_net(self.config, self.dual)
        if self.config.init_weights:
            load_init_weights(net, self.config.init_weights)
        self.model = net
        return net

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"name": self.name, "kind": "segmentation", "width": c.width, "depth": c.depth, "mpp": self.mpp,
                "patch": self.patch, "n_train": len(self.train_slides)}

    def batches(self, epoch: int, rng: np.random.Generator) -> PatchBatches:
        jobs = self.plan(epoch, rng)
        return PatchBatches(jobs, self.config.batch_size, rng, workers=self.config.read_workers,
                            before_batch=self._before_batch)

    def plan(self, epoch: int, rng: np.random.Generator) -> list[Callable[[], Patch]]:
        reqs = plan_epoch(self.train_slides, self.board, self.scheduler, self.config.patches_per_epoch, self.patch,
                          self.mpp, epoch, rng)
        return [self._job(r) for r in reqs]

    def _job(self, req: PatchRequest, kind: str = "", benign_fill: bool = True,
             soft: Callable[[PatchRequest], np.ndarray | None] | None = None) -> Callable[[], Patch]:
        slide = self.train_slides[req.slide]
        snapped = self._snap(slide, req)
        return lambda: self._read(slide, snapped, kind, soft, benign_fill=benign_fill)

    @property
    def context(self) -> int:
        """Context pixels around a patch (``config.context``; -1: the net's receptive margin)."""
        c = self.config.context
        if c >= 0:
            return c
        if self._context is None:
            g = 2 ** (self.config.depth - 1)  # patch + 2 context stays a multiple of the U-Net's grid
            m = receptive_margin(self.model if self.model is not None else build_net(self.config, self.dual))
            self._context = -(-m // g) * g
        return self._context

    def _read(self, slide: SegSlide, req: PatchRequest, kind: str = "",
              soft: Callable[[PatchRequest], np.ndarray | None] | None = None, benign_fill: bool = True) -> Patch:
        """The patch at ``req`` with ``context`` px of slide around it. The context ring has no labels and no
        tissue, which is all the losses and validation metrics need to see only the patch: its pixels are
        computed from real neighbours, as in the maps, instead of from zero padding."""
        c = self.context
        if c == 0:
            return read_patch(slide, req, self.patch, self.mpp, kind, soft, benign_fill=benign_fill)
        d = slide.downsample(self.mpp)
        wide = PatchRequest(req.slide, req.x0 - c * d, req.y0 - c * d)
        p = read_patch(slide, wide, self.patch + 2 * c, self.mpp, kind, None, benign_fill=benign_fill)
        ring = np.ones(p.labels.shape, bool)
        ring[c:-c, c:-c] = False
        p.labels = np.where(ring, -1, p.labels).astype(p.labels.dtype)
        p.tissue = p.tissue & ~ring
        inner = None if soft is None else soft(req)
        if inner is not None:
            p.soft = np.pad(inner.astype(np.float32), c, constant_values=np.nan)
        return p

    def _snap(self, slide: SegSlide, req: PatchRequest) -> PatchRequest:
        """Corners on whole map pixels, so a patch and its map window line up exactly."""
        d = slide.downsample(self.mpp)
        return PatchRequest(req.slide, round(req.x0 / d) * d, round(req.y0 / d) * d)

    def _centre(self, i: int, rng: np.random.Generator) -> PatchRequest:
        s = self.train_slides[i]
        (cx, cy), = draw_centres(self.board.get(i), 1, rng)
        d = s.downsample(self.mpp)
        return PatchRequest(i, (cx - self.patch / 2) * d, (cy - self.patch / 2) * d)

    def _painted_centre(self, i: int, rng: np.random.Generator) -> PatchRequest:
        s = self.train_slides[i]
        pts = self._painted.get(i)
        if pts is None:  # drawn once per slide (seeded), then reused every epoch
            pts = self._painted[i] = s.labelled_points(self.mpp, rng=np.random.default_rng(i))
        if not len(pts):
            return self._centre(i, rng)
        cx, cy = pts[int(rng.integers(len(pts)))]
        half = self.patch / 2 * s.downsample(self.mpp)
        jitter = rng.uniform(-half / 2, half / 2, 2)
        return PatchRequest(i, cx - half + jitter[0], cy - half + jitter[1])

    def _before_batch(self) -> None:
        if self.mapper is not None:
            self.mapper.check()

    def _input(self, model: nn.Module, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        t = _to_tensors(batch, device)
        if self.config.augment and model.training:
            from ..augment import augment

            gen = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (1,))))
            keys = [k for k in ("labels", "tissue", "soft") if k in t]
            x, outs = augment(t["x"], [t[k] for k in keys], gen)
            t["x"] = x
            t.update(dict(zip(keys, outs)))
        t["tissue"] = _nonempty(t["tissue"].bool(), self.context)
        return t

    def pixel_ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not (labels >= 0).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, ignore_index=-1)

    # -------------------------------------------------------------------------------- validation
    def _val_set(self) -> list[tuple[int, list[Patch]]]:
        """Fixed validation patches (uniform over tissue, seeded), read once and kept: small by design."""
        if self._val is None:
            rng = np.random.default_rng(12345)
            self._val = []
            for s in self._stage_slides():
                grid = default_grid(s, self.mpp, self.block, alpha=0.0)
                d = s.downsample(self.mpp)
                pats = []
                for cx, cy in draw_centres(grid, self.config.val_patches, rng):
                    req = PatchRequest(0, round(cx - self.patch / 2) * d, round(cy - self.patch / 2) * d)
                    pats.append(self._read(s, req, "val", None, benign_fill=False))
                self._val.append((int(s.label), pats))
        return self._val

    def _stage_slides(self) -> list[SegSlide]:
        """Slides the validation patches come from."""
        return self.val_slides

    def _painted_val_set(self) -> list[Patch]:
        """Fixed patches centred on the painted pixels of validation slides, half on tumour where there is
        some: what checkpoint choice by pixel Dice looks at (slide-level criteria saturate long before the
        maps stop improving)."""
        if self._painted_val is None:
            self._painted_val = []
            rng = np.random.default_rng(54321)
            n = self.config.val_patches
            for s in self.val_slides:
                if not s.annotated:
                    continue
                d = s.downsample(self.mpp)
                half = self.patch / 2 * d
                by_class: dict[int, list[PatchRequest]] = {0: [], 1: []}
                pts = s.labelled_points(self.mpp, rng=rng)  # up to 4096, so rare tumour shows up
                for (cx, cy), centre in zip(pts, s.centre_labels(pts, self.mpp).tolist()):
                    if centre in by_class:
                        by_class[centre].append(PatchRequest(0, round((cx - half) / d) * d,
                                                             round((cy - half) / d) * d))
                pos, neg = (rng.permutation(len(by_class[k])) for k in (1, 0))  # spread over the slide
                take = [by_class[1][j] for j in pos[:n // 2]]
                take += [by_class[0][j] for j in neg[:n - len(take)]]
                self._painted_val += [self._read(s, r, "val", None) for r in take]
        return self._painted_val

    def painted_val_dice(self, model: nn.Module, device: torch.device) -> float | None:
        """Pooled tumour Dice at p ≥ 0.5 over the painted pixels of validation slides plus the tissue of
        benign validation slides (all normal: a benign slide has no tumour); None without painted ones."""
        counts = self.painted_val_counts(model, device)
        if counts is None:
            return None
        tp, fp, fn = counts
        return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)

    def painted_val_counts(self, model: nn.Module, device: torch.device) -> tuple[int, int, int] | None:
        """(TP, FP, FN) tumour pixels at p ≥ 0.5 on what :meth:`painted_val_dice` pools; None without painted
        validation slides."""
        levels = self.painted_val_levels(model, device)
        if levels is None:
            return None
        from ..operating_point import FLOOR_LEVEL

        tumour, normal = levels  # level >= 128 is exactly p >= 0.5 (see operating_point)
        tp, fn = int(tumour.counts[FLOOR_LEVEL:].sum()), int(tumour.counts[:FLOOR_LEVEL].sum())
        return tp, int(normal.counts[FLOOR_LEVEL:].sum()), fn

    def painted_val_levels(self, model: nn.Module, device: torch.device,
                           forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None, *,
                           benign_alone: bool = False) -> tuple[Any, Any] | None:
        """Stored map levels (p · 255, :class:`~..operating_point.LevelHistogram`) of the known tumour pixels and
        of the known normal pixels that :meth:`painted_val_dice` pools: TP/FP/FN at any threshold follow from
        them. Why histograms: a federated site sends these counts (numbers only) and the server sums them over
        sites (:mod:`napari_wsimil.federated.fedmix_validation`). None without painted validation slides.
        ``forward(model, x)``: the logits (default :meth:`forward_eval`; a run loaded for prediction gives the
        map's logits directly). ``benign_alone``: without painted validation slides, still the levels of the
        benign validation patches' tissue (tumour then empty), None only without those either: a FedMix site
        without paint sends them, so that the counts the server sums over sites pool the same kinds of pixels as
        one centralised run on all their slides (every benign validation slide's tissue counting as normal)."""
        from ..operating_point import LevelHistogram

        forward = forward or self.forward_eval
        painted = self._painted_val_set()
        if not painted and not benign_alone:
            return None
        groups = [(_stack(painted), False)] if painted else []
        benign = [p for label, pats in self._val_set() if label == 0 for p in pats]
        if benign and self._stage_slides() is self.val_slides:
            groups.append((_stack(benign), True))
        if not groups:
            return None
        tumour, normal = LevelHistogram(), LevelHistogram()
        was = model.training
        model.eval()
        with torch.no_grad():
            for batch, all_tissue_normal in groups:
                b = _to_tensors(batch, device)
                p = torch.softmax(forward(model, b["x"]).float(), 1)[:, 1]
                if all_tissue_normal:
                    known, truth = b["tissue"].bool(), torch.zeros_like(p, dtype=torch.bool)
                else:
                    known, truth = b["labels"] >= 0, b["labels"] == 1
                tumour.add(p[known & truth].cpu().numpy())
                normal.add(p[known & ~truth].cpu().numpy())
        model.train(was)
        return tumour, normal

    def _with_pixel_dice(self, result: tuple[dict[str, float], dict[str, float]], model: nn.Module,
                         device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
        """Add the painted-validation Dice, and make it the checkpoint choice unless the user said 'loss'."""
        dice = self.painted_val_dice(model, device)
        if dice is not None:
            losses, metrics = result
            metrics["val_pixel_dice"] = dice
            if self.config.checkpoint_by == "auto":
                losses["select"] = 1.0 - dice
        return result

    def _val_logits(self, model: nn.Module, device: torch.device) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        out = []
        was = model.training
        model.eval()
        with torch.no_grad():
            for label, pats in self._val_set():
                b = _to_tensors(_stack(pats), device)
                logits = self.forward_eval(model, b["x"])
                out.append((label, logits, _nonempty(b["tissue"].bool(), self.context)))
        model.train(was)
        return out

    def forward_eval(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def evaluate(self, model: nn.Module, device: torch.device) -> tuple[dict[str, float], dict[str, float]] | None:
        if not self.val_slides:
            return None
        scores, labels, losses = [], [], []
        for label, logits, tissue in self._val_logits(model, device):
            p = torch.softmax(logits, 1)[:, 1]
            p = torch.where(tissue, p, torch.zeros_like(p))
            scores.append(float(p.amax()))
            labels.append(label)
            losses.append(float(self.val_loss(logits, label, tissue)))
        metrics = {"slide_auc": binary_auc(torch.tensor(scores), torch.tensor(labels) == 1)}
        if self.mapper is not None:
            metrics.update(map_wait_fraction=self.wait_fraction(), map_unmapped=self.map_unmapped)
            if self.map_age == self.map_age:  # not NaN: some sampled slide has a map
                metrics["map_age"] = self.map_age
        return self._with_pixel_dice(({"total": float(np.mean(losses))}, metrics), model, device)

    def val_loss(self, logits: torch.Tensor, label: int, tissue: torch.Tensor) -> torch.Tensor:
        from ..losses import pinchaud_loss

        cfg = self.config
        beta = (getattr(cfg, "beta0", 0.0), getattr(cfg, "beta1", 1.0))
        eta = getattr(cfg, "eta", 50.0)
        return pinchaud_loss(poolable_logits(logits, cfg), label, eta, beta, mask=tissue)

    def wait_fraction(self) -> float:
        if self.mapper is None:
            return 0.0
        import time

        total = time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0
        return float(self.mapper.wait_seconds / total) if total > 0 else 0.0

    def finish(self, out_dir: Path) -> str | None:
        """Set the run's operating threshold (:mod:`.operating_point`) from its best weights, by the config's
        ``operating_rule`` (painted validation pixels' Dice, else benign slides' false-positive rate); what to say.

        A threshold that cannot be set does not undo a finished training: the run keeps its weights, says why,
        and has no operating point (maps are then cut at 0.5) until ``wsimil calibrate`` sets one."""
        from ...errors import WsimilError
        from ..operating_point import FILENAME, calibrate_run, choose_benign_slides, describe

        stale = Path(out_dir) / FILENAME  # set with older weights, or another rate: never left to mislead
        stale.unlink(missing_ok=True)
        if self.config.operating_fpr <= 0:
            return None
        if self.mapper is not None:  # its thread would otherwise compete with the calibration's mapping
            self.mapper.stop()
        slides, source = choose_benign_slides(self.train_slides, self.val_slides)
        try:
            point = calibrate_run(out_dir, slides, self.config.operating_fpr, source=source,
                                  device=self.config.device, rule=getattr(self.config, "operating_rule", "auto"),
                                  painted=lambda net, dev: self.painted_val_levels(net, dev, lambda m, x: m(x)))
        except (WsimilError, OSError, ValueError, RuntimeError) as exc:
            return f"no operating threshold ({exc}); masks are cut at 0.5 until 'wsimil calibrate' sets one"
        return describe(point) if point else "no benign tissue to set an operating threshold on; masks are cut at 0.5"

    def close(self) -> None:
        if self.mapper is not None:
            self.mapper.stop()
        for s in self.train_slides + self.val_slides:
            s.close()


def poolable_logits(logits: torch.Tensor, cfg: SegConfig) -> torch.Tensor:
    """What Pinchaud's slide logits pool: the raw pixel logits (the paper) or their log-softmax.

    Public because two modules pool them: Pinchaud's training step (:mod:`.pinchaud`) and the validation
    loss every method reports (:meth:`SegMethod.val_loss`, here)."""
    return F.log_softmax(logits, dim=1) if getattr(cfg, "normalise_logits", False) else logits

def _nonempty(tissue: torch.Tensor, context: int = 0) -> torch.Tensor:
    """A patch without tissue pixels (rotated off the tissue, or at its edge) pools over all its pixels
    (those inside its ``context`` ring)."""
    empty = ~tissue.flatten(1).any(1)
    if bool(empty.any()):
        tissue = tissue.clone()
        c = context
        tissue[empty, c:tissue.shape[-2] - c, c:tissue.shape[-1] - c] = True
    return tissue


def _stack(pats: Sequence[Patch]) -> Batch:
    from ..loader import stack

    return stack(pats)


__all__ = ["SegMethod", "load_init_weights", "poolable_logits"]
