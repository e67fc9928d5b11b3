"""The user's settings the library itself reads: the tile-cache size and the default training device.

Why a module of its own: napari shows these under *Preferences > Plugins* (the manifest's
``configurations``), but the library also runs without napari (the ``wsimil`` command line, scripts,
child processes of a training run). So the values live here, plain and importable everywhere, with sane
defaults that environment variables may change (``NAPARI_WSIMIL_TILE_CACHE_MB``,
``NAPARI_WSIMIL_DEVICE``); :mod:`napari_wsimil._plugin_settings` copies napari's values in when napari
runs, and again whenever the user changes them. Nothing here imports napari.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from typing import Any

#: devices a run may be asked to use by default ("auto": CUDA, then Apple MPS, then CPU)
DEVICES = ("auto", "cpu", "cuda", "mps")
#: bounds of the tile cache, MB: below 16 MB napari re-decodes the tiles of one screen while panning
TILE_CACHE_MB_RANGE = (16, 1 << 20)


class SettingsError(ValueError):
    """A setting's value is unusable (one line that says which and why); the ``wsimil`` command line turns
    it into its one-line error and exit status 2."""


@dataclass(frozen=True)
class Settings:
    """``tile_cache_mb``: decoded slide tiles kept in memory, shared by every open slide;
    ``default_device``: the device a new run in the Training widget starts with (the user may pick
    another)."""

    tile_cache_mb: int = 256
    default_device: str = "auto"

    @property
    def tile_cache_bytes(self) -> int:
        return int(self.tile_cache_mb) * 2**20


def check(settings: Settings) -> Settings:
    """``settings`` if every value is usable, else ValueError with one line that says which and why."""
    lo, hi = TILE_CACHE_MB_RANGE
    mb = settings.tile_cache_mb
    if isinstance(mb, bool) or not isinstance(mb, int) or not lo <= mb <= hi:
        raise SettingsError(f"the tile cache size must be a whole number of MB from {lo} to {hi}, got {mb!r}")
    if settings.default_device not in DEVICES:
        raise SettingsError(f"the default device must be one of {', '.join(DEVICES)}, "
                         f"got {settings.default_device!r}")
    return settings


def from_environment(env: dict[str, str] | None = None) -> Settings:
    """The defaults, changed by ``NAPARI_WSIMIL_TILE_CACHE_MB`` and ``NAPARI_WSIMIL_DEVICE`` when set."""
    env = os.environ if env is None else env
    out = Settings()
    if (mb := env.get("NAPARI_WSIMIL_TILE_CACHE_MB", "").strip()):
        try:
            out = replace(out, tile_cache_mb=int(mb))
        except ValueError:
            raise SettingsError(f"NAPARI_WSIMIL_TILE_CACHE_MB must be a whole number of MB, "
                             f"got {mb!r}") from None
    if (device := env.get("NAPARI_WSIMIL_DEVICE", "").strip()):
        if device not in DEVICES:
            raise SettingsError(f"NAPARI_WSIMIL_DEVICE must be one of {', '.join(DEVICES)}, got {device!r}")
        out = replace(out, default_device=device)
    return check(out)


_lock = threading.Lock()
_current: Settings | None = None


def current() -> Settings:
    """The settings in force (read from the environment on first use)."""
    global _current
    with _lock:
        if _current is None:
            _current = from_environment()
        return _current


def update(**changes: object) -> Settings:
    """Change some settings (``update(tile_cache_mb=512)``); invalid values change nothing and raise."""
    global _current
    with _lock:
        base = _current if _current is not None else from_environment()
        unknown = set(changes) - set(Settings.__dataclass_fields__)
        if unknown:
            raise SettingsError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(Settings.__dataclass_fields__)}")
        _current = check(replace(base, **changes))  # type: ignore[arg-type]
        return _current


def reset() -> Settings:
    """Back to the environment's values (tests, and a napari session that is closed)."""
    global _current
    with _lock:
        _current = from_environment()
        return _current


def add_device_argument(parser: Any, examples: str = "cpu, cuda, cuda:1, mps") -> None:
    """A command's ``--device`` option, its default the default device setting (``NAPARI_WSIMIL_DEVICE``;
    auto when unset), as a new run in the Training widget starts with it: one setting decides where work
    runs, whether it is started from napari or from a shell. Raises SettingsError for an unusable
    ``NAPARI_WSIMIL_DEVICE`` (the command line reports it in one line)."""
    default = current().default_device
    parser.add_argument(
        "--device", default=default, metavar="DEVICE",
        help=f"where to compute: auto (CUDA, then Apple MPS, then CPU), {examples} (default {default}: the "
             "default device setting, NAPARI_WSIMIL_DEVICE, auto when unset)")


__all__ = ["DEVICES", "Settings", "SettingsError", "add_device_argument", "check", "current",
           "from_environment", "reset", "update"]
