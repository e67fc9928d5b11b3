"""Slides: lazy pyramids in µm/px, tissue masks, patch grids and synthetic cohorts."""

from .slide import Slide, open_slide

__all__ = ["Slide", "open_slide"]
