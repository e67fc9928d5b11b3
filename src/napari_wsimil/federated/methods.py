"""The federated methods by name, each a ``"module:Class"`` string imported on first use.

Why strings: the server and every site look a method up by the name on the command line, and importing a
method pulls in its family (torch, the U-Nets ...); a table of strings costs nothing until one is used, and a
method whose module is missing fails with a clear message instead of breaking the others.
"""

from __future__ import annotations

import importlib

from ..errors import WsimilError
from .protocol import FederatedMethod

METHODS: dict[str, str] = {
    "histofl": "napari_wsimil.federated.histofl:HistoFL",
    "fedmix": "napari_wsimil.federated.fedmix:FedMix",
}


def load_method(name: str) -> FederatedMethod:
    """An instance of the federated method ``name``; an unknown name or an unimportable method is a
    :class:`WsimilError` naming it."""
    target = METHODS.get(name)
    if target is None:
        raise WsimilError(f"no federated method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    module, _, cls_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError) as exc:
        raise WsimilError(f"the federated method {name} ({target}) cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, FederatedMethod)):
        raise WsimilError(f"{target} is not a FederatedMethod")
    return cls()


__all__ = ["METHODS", "load_method"]
