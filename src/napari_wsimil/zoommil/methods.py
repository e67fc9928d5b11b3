"""The ZoomMIL method the registry lists."""

from __future__ import annotations

from ..train.registry import MethodInfo
from .configs import ZoomMILConfig
from .family import FAMILY

METHODS = [MethodInfo("zoommil", ZoomMILConfig, FAMILY)]

__all__ = ["METHODS"]
