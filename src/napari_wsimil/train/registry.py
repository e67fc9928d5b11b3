"""Methods by name: each has a config dataclass (defaults + a doc string per field) and a family.

The GUI and CLI list :func:`methods`, show each field's ``doc`` and ask a method's :class:`~.family.
MethodFamily` to prepare, train, predict and map it — nothing else needs to know which method is which.

Where methods come from:
- the built-in families, each a module with a ``METHODS`` list (:data:`BUILTIN_MODULES`), imported on
  first use by name, like a plugin, so that this layer never imports the families above it;
- installed packages, through the ``napari_wsimil.methods`` entry-point group (each entry point is a
  list of :class:`MethodInfo` or a function returning one);
- :func:`register`, at run time (a notebook, a test). These are handed to the training child process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .engine import TrainConfig, TrainingError
from .family import MethodFamily

BUILTIN_MODULES = ("napari_wsimil.mil.methods", "napari_wsimil.seg.family", "napari_wsimil.zoommil.methods",
                   "napari_wsimil.federated.fedmix")
ENTRY_POINT_GROUP = "napari_wsimil.methods"


@dataclass(frozen=True)
class MethodInfo:
    """A trainable method: its name, its settings (``config_cls``), its family and, for families that
    build methods from data with a function (the MIL family's bags), that ``builder``."""

    name: str
    config_cls: type[TrainConfig]
    family: MethodFamily
    builder: Callable[..., Any] | None = None

    @property
    def description(self) -> str:
        return (self.config_cls.__doc__ or "").strip()

    @property
    def kind(self) -> str:
        """The family's name ("mil", "segmentation" ...)."""
        return self.family.name


_METHODS: dict[str, MethodInfo] = {}
_ADDED: dict[str, MethodInfo] = {}
_LOADED = [False]


def _as_infos(obj: Any, where: str) -> list[MethodInfo]:
    items = obj() if callable(obj) and not isinstance(obj, MethodInfo) else obj
    items = [items] if isinstance(items, MethodInfo) else list(items)
    bad = [i for i in items if not isinstance(i, MethodInfo)]
    if bad:
        raise TrainingError(f"{where} offers {bad[0]!r}, not a MethodInfo")
    return items


def _load() -> None:
    """Fill the registry on first use (see the module doc); a broken plugin is skipped, not fatal."""
    if _LOADED[0]:
        return
    _LOADED[0] = True
    for module in BUILTIN_MODULES:
        for info in _as_infos(importlib.import_module(module).METHODS, module):
            _METHODS[info.name] = info
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            infos = _as_infos(ep.load(), f"entry point {ep.name} ({ep.value})")
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not hide the built-in methods
            import warnings

            warnings.warn(f"method plugin {ep.name} ({ep.value}) cannot be loaded: {exc}", stacklevel=2)
            continue
        for info in infos:
            _METHODS.setdefault(info.name, info)
    _METHODS.update(_ADDED)


def register(*infos: MethodInfo, replace: bool = False) -> None:
    """Add methods at run time; a name that exists is an error unless ``replace``."""
    _load()
    for info in infos:
        if not isinstance(info, MethodInfo):
            raise TrainingError(f"register() takes MethodInfo objects, got {info!r}")
        if info.name in _METHODS and not replace:
            raise TrainingError(f"a method named {info.name!r} is registered already")
        _METHODS[info.name] = _ADDED[info.name] = info


def unregister(name: str) -> None:
    """Remove a method added with :func:`register` (built-in methods stay)."""
    _load()
    if _ADDED.pop(name, None) is not None:
        _METHODS.pop(name, None)
        for module in BUILTIN_MODULES:  # a replaced built-in comes back
            for info in importlib.import_module(module).METHODS:
                if info.name == name:
                    _METHODS[name] = info


def added() -> list[MethodInfo]:
    """The methods registered at run time, which a child process must register again."""
    return list(_ADDED.values())


def methods() -> dict[str, MethodInfo]:
    """All registered methods by name."""
    _load()
    return dict(_METHODS)


def get(name: str) -> MethodInfo:
    _load()
    try:
        return _METHODS[name]
    except KeyError:
        raise TrainingError(f"unknown method {name!r}; choose one of {', '.join(_METHODS)}") from None


def family_of(name: str) -> MethodFamily:
    """The family of method ``name``."""
    return get(name).family


def run_family(run_dir: str | Path) -> tuple[MethodFamily, dict[str, Any]]:
    """(family, run.json) of a run folder: the family of the method the run records."""
    from .run import read_run_info

    info = read_run_info(run_dir)
    return family_of(str(info["method"])), info


def make_config(name: str, **overrides: Any) -> TrainConfig:
    """The method's config with its defaults, some replaced; an unknown option is an error, not ignored."""
    cls = get(name).config_cls
    known = {f.name for f in fields(cls)}
    bad = set(overrides) - known
    if bad:
        raise TrainingError(f"{name} has no option(s) {', '.join(sorted(bad))}; "
                            f"options: {', '.join(sorted(known))}")
    return cls(**overrides)


def saved_config(method: str, state: dict[str, Any]) -> TrainConfig:
    """The method's config as a run's ``last.json`` saved it (options the method no longer has are dropped)."""
    cls = get(method).config_cls
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in state.get("config", {}).items() if k in known})


__all__ = ["BUILTIN_MODULES", "ENTRY_POINT_GROUP", "MethodInfo", "added", "family_of", "get", "make_config",
           "methods", "register", "run_family", "saved_config", "unregister"]
