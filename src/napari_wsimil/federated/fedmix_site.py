"""One FedMix site: two U-Nets trained on the site's own slides, whatever labels it has.

The site's supervision is what its drawings are (``supervision='auto'``): painted pixels or polygons make a
*pixel* site, tumour boxes only a *box* site, nothing a *slide* site (slide labels only). Each round:

1. the two global nets (A, B) arrive; the local nets start as copies of them;
2. a fresh seeded plan of ``patches_per_round`` patches: half from benign slides (all normal), half from the
   malignant slides, centred on the paint or inside the boxes (a quarter of a box site's uniformly over its
   boxed slides, so that tissue outside the boxes is seen as normal), or uniform over tissue on a slide site;
   a pixel site's painted patches alternate between tumour and normal paint (lesions are small);
3. per batch, the global nets' masks choose the pseudo-labels (:mod:`.fedmix_selection`); each local net is
   trained with the Dice loss on its targets (Adam, one optimiser for both);
4. the update holds both nets, the number of kept patches (|D_i|) and the round's mean loss (L_i).

Patch reading, augmentation and validation are the segmentation family's (:class:`~napari_wsimil.seg.
methods.base.SegMethod`), so a FedMix site reads slides exactly like a centralised segmentation run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import WsimilError
from .fedmix_config import SUPERVISION, FedMixConfig
from .fedmix_selection import masked_dice_loss, select
from .protocol import Arrays, SiteTrainer, SiteUpdate

NETS = ("a", "b")


def net_arrays(net: torch.nn.Module, prefix: str) -> Arrays:
    """A net's state as numpy arrays named ``PREFIX.<tensor>`` (what travels between site and server)."""
    return {f"{prefix}.{k}": np.array(v.detach().cpu().numpy(), order="C") for k, v in net.state_dict().items()}


def load_net(cfg: FedMixConfig, arrays: Arrays, prefix: str) -> torch.nn.Module:
    """A U-Net of the config's shape with the ``PREFIX.*`` arrays loaded; a mismatch is a clear error."""
    from ..seg.nets import build_net

    net = build_net(cfg)
    state = {k[len(prefix) + 1:]: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()
             if k.startswith(prefix + ".")}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise WsimilError(f"the global weights do not fit a U-Net of width {cfg.width}, depth {cfg.depth}: "
                          f"{str(exc).splitlines()[0]}") from exc
    return net


def supervision_of(slides: Sequence[Any], wanted: str = "auto") -> str:
    """'pixel', 'box' or 'slide': what the site's drawings are (see the module doc), checked against
    ``wanted`` when the user names it."""
    if wanted not in SUPERVISION:
        raise WsimilError(f"supervision is one of {', '.join(SUPERVISION)}, not {wanted!r}")
    drawn = [s for s in slides if s.annotated]
    painted = any(s.labels.lookup is not None for s in drawn)
    anns = [a for s in drawn for a in (s.labels.annotations or ())]
    boxes_only = bool(anns) and all(a.kind == "box" for a in anns)
    found = "pixel" if painted or (anns and not boxes_only) else "box" if boxes_only else "slide"
    if wanted == "auto" or wanted == "slide":
        return found if wanted == "auto" else "slide"
    if wanted == "pixel" and found != "pixel":
        raise WsimilError("supervision 'pixel' needs painted pixels or drawn tumour/normal regions on some "
                          "training slide of this site, and there are none")
    if wanted == "box" and not anns:
        raise WsimilError("supervision 'box' needs tumour boxes drawn on some malignant training slide of this "
                          "site, and there are none")
    return wanted


class FedMixSite(SiteTrainer):
    """A site's local FedMix training (see the module doc). ``source``: the site's project or cohort CSV."""

    def __init__(self, source: Path, config: FedMixConfig, workdir: Path, report: Callable[[str], None] | None = None):
        from ..seg.data import open_seg_slides
        from ..seg.methods.base import SegMethod
        from ..train.cohort import assign_splits
        from ..train.engine import TrainingError, pick_device
        from ..train.run import RunSpec, labelled_slides

        self.config = cfg = config
        self.source = Path(source)
        self.workdir = Path(workdir)
        self.say = report or (lambda _m: None)
        classes = [c.strip() for c in cfg.classes.split(",") if c.strip()] or None
        spec = RunSpec(source=self.source, method="fedmix", out=self.workdir, classes=classes)
        cohort, usable, self.classes = labelled_slides(spec)
        if len(self.classes) != 2:
            raise WsimilError(f"FedMix segments tumour: a site needs two slide classes (benign first, then "
                              f"malignant), got {', '.join(self.classes)}; set classes=BENIGN,MALIGNANT")
        slides = assign_splits(usable, self.classes, cfg.seed, cfg.val_fraction)
        tr = [s for s in slides if s.split == "train"]
        va = [s for s in slides if s.split == "val"]
        cache = self.workdir / "tissue"  # detected once, not in every message's fresh process
        train = open_seg_slides(cohort, tr, self.classes, tissue_cache=cache)
        val = open_seg_slides(cohort, va, self.classes, tissue_cache=cache) if va else []
        self.seg = SegMethod(cfg, train, val, mpp=cfg.mpp, patch=cfg.patch)
        try:
            self.seg.check()
            self.kind = supervision_of(train, cfg.supervision)
        except TrainingError as exc:
            self.close()
            raise WsimilError(f"site {self.source.name}: {exc}") from exc
        except WsimilError as exc:
            self.close()
            raise WsimilError(f"site {self.source.name}: {exc}") from exc
        self.device = pick_device(cfg.device)
        self._points: dict[int, dict[int, np.ndarray]] = {}
        # a site's own stream of randomness: two sites with the same seed still draw different patches
        self._site_seed = sum(self.source.name.encode()) % 100_003
        self.say(f"site {self.source.name}: {self.kind} supervision, {len(train)} training / {len(val)} "
                 f"validation slides")

    # ------------------------------------------------------------------------------------ the plan
    def plan(self, rng: np.random.Generator) -> list[Callable[[], Any]]:
        """This round's patch jobs (see the module doc, step 2)."""
        seg, n = self.seg, self.config.patches_per_round
        slides = seg.train_slides
        benign = [i for i, s in enumerate(slides) if s.label == 0]
        malignant = [i for i, s in enumerate(slides) if s.label == 1]
        drawn = [i for i, s in enumerate(slides) if s.annotated]
        jobs = [seg._job(seg._centre(int(i), rng), "benign") for i in rng.choice(benign, n // 2)]
        rest = n - n // 2
        if self.kind == "pixel":
            jobs += [seg._job(self._drawn_centre(int(i), int(c), rng), "pixel")
                     for i, c in zip(rng.choice(drawn, rest), np.arange(rest) % 2)]
        elif self.kind == "box":
            boxed = [i for i in drawn if slides[i].label == 1] or drawn
            uniform = rest // 4
            jobs += [seg._job(seg._painted_centre(int(i), rng), "box") for i in rng.choice(boxed, rest - uniform)]
            jobs += [seg._job(seg._centre(int(i), rng), "box") for i in rng.choice(boxed, uniform)]
        else:
            jobs += [seg._job(seg._centre(int(i), rng), "weak") for i in rng.choice(malignant, rest)]
        return [jobs[j] for j in rng.permutation(len(jobs))]

    def _drawn_centre(self, i: int, cls: int, rng: np.random.Generator) -> Any:
        """A patch centred on a painted pixel of class ``cls`` (0 normal, 1 tumour) of slide ``i``, or on any
        painted pixel when the slide has none of that class. Why by class: lesions are a few per cent of the
        tissue, so patches centred on any painted pixel would hardly ever show tumour to the Dice loss."""
        from ..seg.sampling import PatchRequest

        s = self.seg.train_slides[i]
        if i not in self._points:  # drawn once per slide (seeded), then reused every round
            pts = s.labelled_points(self.config.mpp, rng=np.random.default_rng(i))
            cls_at = s.centre_labels(pts, self.config.mpp).astype(int)
            self._points[i] = {k: pts[cls_at == k] for k in (0, 1)}
        pts = self._points[i][cls]
        if not len(pts):
            return self.seg._painted_centre(i, rng)
        cx, cy = pts[int(rng.integers(len(pts)))]
        half = self.config.patch / 2 * s.downsample(self.config.mpp)
        jitter = rng.uniform(-half / 2, half / 2, 2)
        return PatchRequest(i, cx - half + jitter[0], cy - half + jitter[1])

    # ----------------------------------------------------------------------------------- protocol
    def fit(self, global_arrays: Arrays, server_round: int) -> SiteUpdate:
        from ..seg.loader import PatchBatches
        from ..train.engine import TrainingError

        cfg = self.config
        torch.manual_seed(cfg.seed * 100_003 + server_round * 101 + self._site_seed)
        rng = np.random.default_rng([cfg.seed, server_round, self._site_seed])
        glob = {p: load_net(cfg, global_arrays, p).to(self.device).eval() for p in NETS}
        # the global model this round starts from (round r-1's), measured on this site's held-out slides: the
        # server sums these numbers over sites to choose the run's checkpoint (:mod:`.fedmix_validation`)
        measured = {f"global_{k}": v for k, v in self.validate(glob["a"]).items()} if server_round > 1 else {}
        local = {p: load_net(cfg, global_arrays, p).to(self.device).train() for p in NETS}
        params = [q for p in NETS for q in local[p].parameters()]
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses: list[float] = []
        kept = offered = 0
        by_kind: dict[str, int] = {}
        for batch in PatchBatches(self.plan(rng), cfg.batch_size, rng, workers=cfg.read_workers):
            t = self.seg._input(local["a"], batch, self.device)  # augmented (same view for all four nets)
            with torch.no_grad():
                pa, pb = (torch.softmax(glob[p](t["x"]).float(), 1)[:, 1] for p in NETS)
            sel = select(batch.kinds, t["labels"], pa, pb, agree=cfg.agree_dice, box_min=cfg.box_dice)
            loss_a = masked_dice_loss(local["a"](t["x"]), sel.target_a, sel.known)
            loss_b = masked_dice_loss(local["b"](t["x"]), sel.target_b, sel.known)
            loss = loss_a + loss_b
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"site {self.source.name}: the loss became {value} in round "
                                    f"{server_round}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(value / 2)
            kept += sel.n_kept
            offered += len(batch.kinds)
            for k, ok in zip(batch.kinds, sel.kept.tolist()):
                by_kind[k] = by_kind.get(k, 0) + int(ok)
        if not losses:
            raise TrainingError(f"site {self.source.name}: no batch this round (patches_per_round "
                                f"{cfg.patches_per_round} < batch_size {cfg.batch_size})")
        arrays = {**net_arrays(local["a"], "a"), **net_arrays(local["b"], "b")}
        metrics = {"loss": float(np.mean(losses)), "selected": float(kept), "offered": float(offered),
                   "supervision_code": float(("pixel", "box", "slide").index(self.kind))}
        metrics.update({f"selected_{k}": float(v) for k, v in by_kind.items()})
        metrics.update(measured)
        return SiteUpdate(arrays, kept, metrics)

    def validate(self, net: torch.nn.Module, benign: bool = False) -> dict[str, float]:
        """Numbers only: ``net`` (a global net A) on this site's held-out slides (:func:`.fedmix_validation.
        site_numbers`); with ``benign``, the map levels of its benign slides' tissue too, for the threshold."""
        from .fedmix_validation import site_numbers

        was = net.training
        net.eval()  # the maps of the benign slides are computed as predict computes them
        try:
            return site_numbers(self.seg, net, self.device, benign=benign)
        finally:
            net.train(was)

    def evaluate(self, global_arrays: Arrays) -> dict[str, float]:
        """Global net A on the site's validation slides: slide AUC (max pixel), the segmentation family's
        validation loss, with painted validation slides the pixel Dice and its level histograms, and the map
        levels of its benign slides' tissue (:mod:`.fedmix_validation`). Numbers only."""
        net = load_net(self.config, global_arrays, "a").to(self.device)
        return self.validate(net, benign=True)

    def close(self) -> None:
        self.seg.close()


__all__ = ["FedMixSite", "load_net", "net_arrays", "supervision_of"]
