"""Encoders from other packages, through the ``napari_wsimil.encoders`` entry-point group.

Why: a lab with its own network (or a foundation model needing code this package does not have)
should not have to fork the plugin to use it. A package declares, in its ``pyproject.toml``::

    [project.entry-points."napari_wsimil.encoders"]
    my-encoder = "my_package.encoders:build"

where the value is a builder ``build(weights=None, device="auto", **options) -> Encoder`` or an
:class:`~napari_wsimil.features.encoders.Encoder` subclass (defined in :mod:`.encoder_base`). The encoder then appears in
``available_encoders()``, ``wsimil encoders`` and every ``--encoder`` option. A plugin that fails
to import is skipped with a warning naming it; asking for it by name repeats why.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

from .encoder_base import Builder, Encoder, EncoderError, EncoderSpec

GROUP = "napari_wsimil.encoders"


def _entry_points() -> list[Any]:
    from importlib.metadata import entry_points

    return list(entry_points(group=GROUP))


def _as_builder(name: str, obj: Any) -> tuple[Builder, bool, str]:
    """(builder, takes weights, description) for an entry point's object."""
    doc = (inspect.getdoc(obj) or "").strip().splitlines()
    text = doc[0] if doc else ""
    if isinstance(obj, type) and issubclass(obj, Encoder):
        params = inspect.signature(obj).parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        takes_weights = "weights" in params or var_kw
        takes_device = "device" in params or var_kw

        def build(weights: str | Path | None = None, device: str = "auto", **options: Any) -> Encoder:
            if weights is not None and not takes_weights:
                raise EncoderError(f"the {name} encoder takes no weights file")
            kwargs = dict(options)
            if takes_weights:
                kwargs["weights"] = weights
            if takes_device:
                kwargs["device"] = device
            enc = obj(**kwargs)
            return enc if takes_device else enc.to(device)

        return build, takes_weights, text
    if callable(obj):
        return obj, bool(getattr(obj, "takes_weights", True)), text
    raise TypeError(f"{obj!r} is neither an Encoder subclass nor a builder function")


def discover_encoders(reserved: set[str] = frozenset()) -> tuple[list[EncoderSpec], dict[str, str]]:
    """Load every entry point of the group: the specs that loaded, and name → reason for those that did not.

    A name in ``reserved`` (a built-in encoder) is not overridden: the plugin is skipped with a warning.
    """
    specs: list[EncoderSpec] = []
    broken: dict[str, str] = {}
    seen: set[str] = set()
    try:
        eps = _entry_points()
    except Exception as exc:  # noqa: BLE001 - a corrupt installed distribution must not stop the registry
        warnings.warn(f"could not read the {GROUP} entry points: {exc}", RuntimeWarning, stacklevel=3)
        return specs, broken
    for ep in eps:
        dist = getattr(getattr(ep, "dist", None), "name", None) or "an unknown package"
        where = f"{ep.name} = {ep.value} (from {dist})"
        if ep.name in reserved or ep.name in seen:
            warnings.warn(f"encoder plugin {where} is ignored: the name {ep.name!r} is taken",
                          RuntimeWarning, stacklevel=3)
            continue
        try:
            builder, takes_weights, text = _as_builder(ep.name, ep.load())
        except Exception as exc:  # noqa: BLE001 - any failure of third-party code: warn, skip, go on
            reason = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"encoder plugin {where} could not be loaded: {reason}", RuntimeWarning,
                          stacklevel=3)
            broken[ep.name] = f"plugin {where} failed to load ({reason})"
            continue
        seen.add(ep.name)
        specs.append(EncoderSpec(ep.name, builder, text or f"from {dist}", takes_weights, source=dist))
    return specs, broken


__all__ = ["GROUP", "discover_encoders"]
