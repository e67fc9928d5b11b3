"""One writer per project folder, across processes and windows.

The lock is an OS advisory lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on
``DIR/.lock``, held through an open file for as long as the project is open. The kernel drops it
when the process dies, so a crash never leaves a stale lock to clean up by hand. ``flock`` locks
belong to an open file description, so a second ``Project.open`` in the *same* process (a second
napari window) is refused too, which is what we want: two painters on one label file would
overwrite each other's strokes.

The holder writes who it is (pid, host, time) into the lock file, so the read-only opener can say
which window to close.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LOCK_NAME = ".lock"


@dataclass(frozen=True)
class LockOwner:
    """Who holds a project's lock, as it wrote itself into the lock file (may be unknown: pid 0)."""

    pid: int
    host: str
    since: str = ""

    def __str__(self) -> str:
        if not self.pid:
            return "another process"
        where = f" on {self.host}" if self.host and self.host != socket.gethostname() else ""
        return f"pid {self.pid}{where}"


class ProjectLock:
    """An exclusive lock on a project folder; ``acquire`` returns False when someone else holds it."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._fh: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self) -> bool:
        if self._fh is not None:
            return True
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            if not _try_lock(fh):
                fh.close()
                return False
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
            fh.flush()
        except BaseException:
            fh.close()
            raise
        self._fh = fh
        return True

    def owner(self) -> LockOwner:
        """Who holds the lock, read from the file; unknown (pid 0) if it cannot be read."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8") or "{}")
            return LockOwner(int(info.get("pid", 0)), str(info.get("host", "")), str(info.get("since", "")))
        except (OSError, ValueError, TypeError, AttributeError):
            return LockOwner(0, "")

    def held_elsewhere(self) -> bool:
        """Whether another open file (this process's or another's) holds the lock, asked without taking it
        for long and without writing the file (the check of a project must change nothing)."""
        if self._fh is not None or not self.path.exists():
            return False
        try:
            fh = open(self.path, encoding="utf-8")
        except OSError:
            return False
        try:
            if not _try_lock(fh):
                return True
            _unlock(fh)
            return False
        finally:
            fh.close()

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is None:
            return
        with contextlib.suppress(OSError):
            fh.seek(0)
            fh.truncate()
            fh.flush()
        _unlock(fh)
        fh.close()

    def __del__(self) -> None:  # the kernel would release it anyway; this just closes the file early
        with contextlib.suppress(Exception):
            self.release()


def _try_lock(fh: IO[str]) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks (some network mounts): better open than refuse
        return True


def _unlock(fh: IO[str]) -> None:
    try:
        import fcntl
    except ImportError:
        import msvcrt

        with contextlib.suppress(OSError):
            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        return
    with contextlib.suppress(OSError):
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
