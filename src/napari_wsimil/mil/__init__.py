"""Attention MIL: ABMIL, CLAM-SB/MB and MS-CLAM on feature bags, one method family.

    from napari_wsimil.mil import BagDataset, build
    from napari_wsimil.train import make_config, train
    method = build("clam-sb", BagDataset.from_arrays(feats, labels), config=make_config("clam-sb", epochs=20))
    for event in train(method, "runs/clam", resume=True):
        print(event.kind, event.epoch, event.losses)
"""

from .configs import ABMILConfig, CLAMConfig, MSCLAMConfig
from .family import FAMILY, MILFamily, build
from .predict import LoadedRun, load_run, predict_bag
from .training import Bag, BagDataset, MILMethod, attention_scores, predict

__all__ = ["FAMILY", "ABMILConfig", "Bag", "BagDataset", "CLAMConfig", "LoadedRun", "MILFamily", "MILMethod",
           "MSCLAMConfig", "attention_scores", "build", "load_run", "predict", "predict_bag"]
