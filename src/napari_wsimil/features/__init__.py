"""Patch encoders and per-slide feature bags (compute only: no Qt, no napari).

``build_encoder("handcrafted" | "resnet18" | "resnet50" | "resnet50-trunc" | "timm:ARCH" | a plugin's name,
weights=FILE)`` gives an :class:`Encoder`; :func:`evaluate_encoder` probes one on labelled tiles; :func:`extract_features` turns a slide into a :class:`Bag` (coords + features);
:func:`extract_cohort` writes one bag per slide and skips the ones already current. Names load on
first use, so importing the package does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "Encoder": "encoder_base", "TorchEncoder": "encoder_base", "EncoderError": "encoder_base",
    "build_encoder": "encoders",
    "register_encoder": "encoders", "available_encoders": "encoders", "load_weights": "weights",
    "refresh_encoders": "encoders", "evaluate_encoder": "evaluate",
    "HandcraftedEncoder": "handcrafted", "handcrafted_features": "handcrafted",
    "Bag": "bags", "BagError": "bags", "read_bag": "bags", "is_stale": "bags", "stale_reasons": "bags",
    "extract_features": "extract", "extract_cohort": "extract", "CohortEvent": "extract",
    "CohortResult": "extract", "ExtractionCancelled": "extract",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
