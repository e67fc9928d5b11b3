"""napari-wsimil: weakly- and mixed-supervised learning on whole-slide images.

The compute (slides, tiling, models, training) never imports Qt or napari; widgets live in ``_qt``.
Heavy modules are imported on first use so that ``import napari_wsimil`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import MissingMppError, SlideError, WsimilError

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .slide import Slide, open_slide

__all__ = ["Slide", "SlideError", "MissingMppError", "WsimilError", "open_slide", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Slide", "open_slide"):
        from . import slide

        return getattr(slide, name)
    raise AttributeError(name)
