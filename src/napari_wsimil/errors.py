"""Errors a pathologist can read.

Every failure that reaches a user names the file involved and says what is wrong in plain words; the
traceback stays in the log. Library code raises these instead of letting low-level exceptions
(struct.error, KeyError, codec failures) escape.
"""

from __future__ import annotations

from pathlib import Path


class WsimilError(Exception):
    """Base class of every error this package raises on purpose."""


class Stopped(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM) rather than interrupted by a person (Ctrl-C).

    A KeyboardInterrupt, so that every ``finally`` that cleans up on Ctrl-C cleans up here too; its own class so
    that the command line can say "stopped" instead of "interrupted": ``wsimil federate simulate`` stops its
    sites with SIGTERM when the federation has finished, and that is not a failure to report."""


class ProjectError(WsimilError):
    """A project folder, its labels or a cohort file cannot be used as asked.

    It always describes something the user can act on (a file that moved, a class that does not exist, a
    project open elsewhere) and names the slide or file concerned. Defined here, at the bottom, because
    the storage below the project package (:mod:`napari_wsimil.io`) raises it too."""


class DiskFullError(ProjectError, OSError):
    """A write failed for lack of space (or quota). The previous version of the file is intact (writes are
    atomic); the message says how much space the write needed and how much is free. Also an ``OSError``,
    so code that already handles failed writes keeps handling this one."""

    def __init__(self, message: str, needed: int = 0, free: int | None = None):
        super().__init__(message)
        self.needed = needed
        self.free = free


def short(exc: BaseException | str, limit: int = 200) -> str:
    """An exception's text fit for a one-line message: its first line, at most ``limit`` characters. Why: a
    low-level error may quote a whole damaged value (a 5,000-character string, a zip header's bytes)."""
    text = str(exc).strip()
    text = text.splitlines()[0] if text else (type(exc).__name__ if isinstance(exc, BaseException) else "")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def printable(text: str) -> str:
    """``text`` with control characters written as ``\\xNN``: a value quoted from a damaged file (a NUL in a
    CSV cell, bytes in a DICOM tag) must not break the one line a person reads."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KB': sizes in messages to a person."""
    size = float(n)
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"


class SlideError(WsimilError):
    """A slide file could not be opened or read."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = None if path is None else Path(path)
        # a reader's message may quote damaged bytes (libdicom: "cannot have VR '\x13Q'"): no control characters
        reason = printable(str(reason))
        self.reason = reason if len(reason) <= 500 else reason[:499] + "…"
        where = f"{self.path.name} ({self.path})" if self.path is not None else "slide"
        super().__init__(f"Cannot read {where}: {self.reason}")


class MissingMppError(SlideError):
    """The slide does not record its pixel size, and a physical size was asked for."""

    def __init__(self, path: str | Path | None):
        super().__init__(
            path,
            "the file does not record its pixel size (µm per pixel). Set it with "
            "open_slide(path, mpp=0.5) or slide.mpp = 0.5 (0.5 µm/px is a typical 20x scan, 0.25 µm/px 40x).",
        )
