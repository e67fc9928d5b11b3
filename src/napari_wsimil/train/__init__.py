"""Training: one generator-based engine, and method families plugged in by name through the registry.

    from napari_wsimil.train import make_config, methods, train

Each method belongs to a family (:mod:`.family`): attention MIL (:mod:`napari_wsimil.mil`), weak
segmentation (:mod:`napari_wsimil.seg`). ``methods()`` lists them all; ``family_of(name)`` says how one
is prepared, trained, predicted and shown.
"""

from .engine import TrainConfig, TrainingError, load_model_weights, pick_device, train
from .events import MapEvent, ProgressEvent
from .family import MethodFamily, PredictRequest
from .registry import MethodInfo, family_of, get, make_config, methods, register, unregister
from .run import PreparedRun, RunSpec

__all__ = ["MapEvent", "MethodFamily", "MethodInfo", "PredictRequest", "PreparedRun", "ProgressEvent",
           "RunSpec", "TrainConfig", "TrainingError", "family_of", "get", "load_model_weights", "make_config",
           "methods", "pick_device", "register", "train", "unregister"]
