"""Training: one generator-based engine, method families plugged in by name.

    from napari_wsimil.train import BagDataset, build, make_config, train
    method = build("clam-sb", BagDataset.from_arrays(feats, labels), config=make_config("clam-sb", epochs=20))
    for event in train(method, "runs/clam", resume=True):
        print(event.kind, event.epoch, event.losses)
"""

from .engine import TrainConfig, TrainingError, load_model_weights, pick_device, train
from .events import ProgressEvent
from .mil import Bag, BagDataset, MILMethod, attention_scores, predict
from .registry import ABMILConfig, CLAMConfig, MSCLAMConfig, build, get, make_config, methods

__all__ = ["ABMILConfig", "Bag", "BagDataset", "CLAMConfig", "MILMethod", "MSCLAMConfig", "ProgressEvent",
           "TrainConfig", "TrainingError", "attention_scores", "build", "get", "load_model_weights",
           "make_config", "methods", "pick_device", "predict", "train"]
