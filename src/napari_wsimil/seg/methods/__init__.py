"""Pinchaud, Hybrid Supervision and ConfKD as methods of the one training engine.

The engine (:mod:`napari_wsimil.train.engine`) owns seeding, the optimiser, checkpoints, resume, early
stopping and events; a method here supplies the network, each epoch's batches and each step's losses:

* **Pinchaud**: patches inherit their slide's label; per patch, slide logits (mean benign logit, mean of
  the top-η % malignant logits) go through the generalised KL. A :class:`~..mapper.MappingWorker` recomputes
  maps with the weights of the last epoch while the trainer trains; each epoch's patches are drawn from the
  latest maps (:mod:`..sampling`). Painted pixels, where a slide has them, add cross-entropy (``w_pixel``).
* **Hybrid**: every ``epochs_per_round`` epochs an E-step maps the training slides with the current model;
  the M-step trains on a batch mix of painted pixels, pseudo-labelled malignant patches (clip(Q·V, 0, 1),
  patches whose max Q < T skipped) and hard negatives from benign slides, with soft-label BCE. At the end of
  each round the stage-2 loss (BCE of the top-K patch mean against slide labels) is the validation loss, so
  ``best.safetensors`` is the round with the lowest stage-2 loss.
* **ConfKD**: labelled patches (painted pixels, and benign slides, all of whose pixels are benign) train the
  teacher decoder; weakly labelled malignant patches train the student through entropy and
  KL(teacher ‖ student). Maps come from the student by default.

One module per method (:mod:`.pinchaud`, :mod:`.hybrid`, :mod:`.confkd`) over :mod:`.base`, which holds
what they share (:class:`SegMethod`); this package exports them and :func:`make_method`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...train.engine import TrainingError
from ..configs import ConfKDConfig, HybridConfig, PinchaudConfig, SegConfig
from ..data import SegSlide
from ..nets import build_net
from .base import SegMethod, load_init_weights
from .confkd import ConfKDMethod
from .hybrid import HybridMethod
from .pinchaud import PinchaudMethod

METHOD_CLASSES: dict[str, tuple[type[SegMethod], type[SegConfig]]] = {
    "pinchaud": (PinchaudMethod, PinchaudConfig),
    "hybrid": (HybridMethod, HybridConfig),
    "confkd": (ConfKDMethod, ConfKDConfig),
}


def make_method(name: str, config: SegConfig, train_slides: Sequence[SegSlide], val_slides: Sequence[SegSlide],
                **kw: Any) -> SegMethod:
    cls, cfg_cls = METHOD_CLASSES[name]
    if not isinstance(config, cfg_cls):
        raise TrainingError(f"{name} needs a {cfg_cls.__name__}, got {type(config).__name__}")
    return cls(config, train_slides, val_slides, **kw)


__all__ = [
    "METHOD_CLASSES",
    "ConfKDMethod",
    "HybridMethod",
    "PinchaudMethod",
    "SegMethod",
    "build_net",
    "load_init_weights",
    "make_method",
]
