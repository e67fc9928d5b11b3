"""Networks only (nn.Modules and their losses); training lives in :mod:`napari_wsimil.train`."""

from .attention import GatedAttention
from .losses import ms_clam_attention_loss, normalised_entropy, smooth_top1_svm, SmoothTop1SVM
from .mil import ABMIL, CLAMMB, CLAMSB, MILOutput

__all__ = ["ABMIL", "CLAMMB", "CLAMSB", "GatedAttention", "MILOutput", "SmoothTop1SVM",
           "ms_clam_attention_loss", "normalised_entropy", "smooth_top1_svm"]
