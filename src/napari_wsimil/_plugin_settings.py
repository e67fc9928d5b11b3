"""napari's *Preferences > Plugins > WSI MIL* values, copied into :mod:`napari_wsimil.settings`.

The manifest's ``configurations`` make napari (0.9+) build a settings model for the plugin, saved in
napari's own settings folder. The library never imports napari, so the reader and the widgets call
:func:`sync_from_napari` when they start: it copies napari's values in and, the first time, connects to
their change events so that an edit in Preferences applies at once (the tile cache takes its new size
from the next tile on). Without napari, or with a napari too old for plugin settings, nothing changes
and the library keeps its defaults (``settings.from_environment``).
"""

from __future__ import annotations

import logging
from typing import Any

from . import settings

log = logging.getLogger(__name__)

PLUGIN = "napari-wsimil"
#: the manifest's configuration key that holds the properties below
SECTION = "performance"
PROPERTIES = ("tile_cache_mb", "default_device")

_connected: list[Any] = []  # the sections already followed (kept alive, so no id is ever reused)


def napari_plugin_settings() -> Any | None:
    """napari's settings model of this plugin's section, or None without napari or plugin settings."""
    try:
        from napari.settings import get_plugin_settings
    except ImportError:
        return None
    try:
        return getattr(get_plugin_settings(PLUGIN), SECTION)
    except (KeyError, AttributeError):  # the plugin is not registered with napari, or an older manifest
        log.debug("napari has no settings for %s", PLUGIN, exc_info=True)
        return None
    except Exception:  # a damaged settings file must not stop a slide from opening: keep the defaults
        log.warning("napari's settings for %s could not be read; using the defaults", PLUGIN, exc_info=True)
        return None


def _copy(section: Any) -> settings.Settings:
    values = {name: getattr(section, name) for name in PROPERTIES}
    try:
        return settings.update(**values)
    except ValueError as exc:  # napari validated them already; a hand-edited file may still be off
        log.warning("napari-wsimil keeps its settings: %s", exc)
        return settings.current()


def sync_from_napari() -> settings.Settings:
    """Copy napari's values into :mod:`napari_wsimil.settings` and follow later changes; returns the
    settings in force."""
    section = napari_plugin_settings()
    if section is None:
        return settings.current()
    if not any(s is section for s in _connected):
        _connected.append(section)
        for name in PROPERTIES:
            getattr(section.events, name).connect(lambda _event, s=section: _copy(s))
    return _copy(section)


__all__ = ["PLUGIN", "PROPERTIES", "SECTION", "napari_plugin_settings", "sync_from_napari"]
