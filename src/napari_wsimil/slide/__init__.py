"""Slides: lazy pyramids in µm/px, tissue masks, patch grids and synthetic cohorts.

``tissue`` and ``tiling`` pull in scikit-image and scipy, so they load on first use.
"""

from __future__ import annotations

from typing import Any

from .slide import Slide, open_slide

_LAZY = {
    "tissue_mask": "tissue", "TissueMask": "tissue",
    "patch_grid": "tiling", "PatchGrid": "tiling", "PatchReader": "tiling",
}

__all__ = ["Slide", "open_slide", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
