"""The generator's shared parameters: the tile size, the argument types, and the checks of user input.

Why a module of its own: the model, the renderers and the cohort writer all tile slides in ``TILE`` px and
check the same arguments (size, µm/px, contrast, shares) with the same one-line messages; every other module
of the package sits above this one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from napari_wsimil.errors import WsimilError

TILE = 256  # every renderer draws level-0 tiles of this many pixels a side

Size = int | tuple[int, int] | Sequence[int]
Progress = Callable[[int, int], None]


def check_share(share: float, what: str = "mucinous share", top: float = 1.0) -> float:
    """``share`` as a float in [0, ``top``], else a one-line ``WsimilError`` naming ``what``.

    Shared by ``SlideModel`` and ``synthesize_cohort``, which checks before it writes anything."""
    try:
        value = float(share)
    except (TypeError, ValueError):
        raise WsimilError(f"the {what} must be a number between 0 and {top:g}, got {share!r}") from None
    if not (0.0 <= value <= top):
        raise WsimilError(f"the {what} must be between 0 and {top:g}, got {share!r}")
    return value


def check_contrast(contrast: float) -> float:
    """``contrast`` as a float in [0, 1], else a one-line ``WsimilError`` (shared as ``check_share`` is)."""
    try:
        value = float(contrast)
    except (TypeError, ValueError):
        raise WsimilError(f"tumour contrast must be a number between 0 and 1, got {contrast!r}") from None
    if not (0.0 <= value <= 1.0):
        raise WsimilError(f"tumour contrast must be between 0 and 1, got {contrast!r}")
    return value


#: The tumour's share of a malignant slide's tissue is drawn log-uniformly from this range unless told otherwise.
DEFAULT_TUMOUR_SHARE = (0.005, 0.08)


def check_tumour_share(share: tuple[float, float] | None) -> tuple[float, float]:
    """``(low, high)``: the range a malignant slide's tumour share of its tissue is drawn from (log-uniform),
    with 0 < low <= high <= 0.5; None is the default range. Else a one-line ``WsimilError``."""
    if share is None:
        return DEFAULT_TUMOUR_SHARE
    try:
        low, high = (float(v) for v in share)
    except (TypeError, ValueError):
        raise WsimilError(f"the tumour share is a range of two numbers, e.g. 0.05,0.3; got {share!r}") from None
    if not (0.0 < low <= high <= 0.5):
        raise WsimilError(f"the tumour share must satisfy 0 < low <= high <= 0.5 (of the tissue); "
                          f"got {low:g},{high:g}")
    return (low, high)


def parse_size(size: Size) -> tuple[int, int]:
    """A slide size (an int for a square, or height and width) as (h, w): a tile to 2^20 px a side.

    Shared by ``synthesize_slide`` and ``synthesize_cohort``, which checks before it writes anything."""
    try:
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            shape = (int(size), int(size))
        else:
            h, w = size  # type: ignore[misc]
            shape = (int(h), int(w))
    except (TypeError, ValueError):
        raise WsimilError(f"slide size must be a number of pixels or (height, width), got {size!r}") from None
    if min(shape) < TILE:
        raise WsimilError(f"slide size must be at least {TILE} pixels a side, got {shape[0]} x {shape[1]}")
    if max(shape) > 2**20:
        raise WsimilError(f"slide size {shape[0]} x {shape[1]} is larger than this generator supports (2^20)")
    return shape


def check_mpp(mpp: float) -> float:
    """µm/px as a float in [0.05, 10], else a one-line ``WsimilError`` (shared as ``parse_size`` is)."""
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise WsimilError(f"pixel size (µm per pixel) must be a number, got {mpp!r}") from None
    if not (0.05 <= value <= 10.0):
        raise WsimilError(f"pixel size must be between 0.05 and 10 µm per pixel, got {mpp!r}")
    return value
