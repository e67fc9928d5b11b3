"""Files that are either the old version or the new one, never half of each.

Every write goes to a temporary file in the same folder (so the rename stays on one file system),
is flushed and fsync'ed, then moved over the target with ``os.replace``, which is atomic on POSIX
and Windows; finally the folder is fsync'ed so that the rename itself survives a power cut. A crash
at any point leaves the previous file intact plus, at worst, a stray ``*.tmp`` that the next
successful write of the same file does not depend on (and ``clean_temporaries`` removes). A write that
runs out of space (ENOSPC, EDQUOT) removes its temporary and raises :class:`~napari_wsimil.errors.DiskFullError`
saying how much it needed and how much is free; the previous file is untouched.

Previous good copies. Writers of files that hold a pathologist's work (project.json, annotation GeoJSON,
label chunks) pass ``keep_previous=True``: just before the rename, the file about to be replaced is
hard-linked to ``.NAME.wsimil-prev`` beside it. A hard link costs no data blocks and one directory
entry, so every save can afford it; if the file system has no hard links the copy is simply skipped.
``wsimil project check --repair`` restores from these copies when the current file is damaged (a disk
error, a sync tool, a hand edit); see napari_wsimil.project.check.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..errors import DiskFullError, human_bytes

TMP_SUFFIX = ".wsimil-tmp"
PREV_SUFFIX = ".wsimil-prev"


def previous_name(path: Path) -> Path:
    """Where the previous good copy of ``path`` is kept (hidden, beside it)."""
    return path.with_name(f".{path.name}{PREV_SUFFIX}")


def keep_previous_copy(path: Path) -> None:
    """Hard-link ``path`` (if it exists) to its previous-copy name, atomically replacing an older copy."""
    if not path.exists():
        return
    prev = previous_name(path)
    tmp = temporary_name(prev)
    try:
        os.link(path, tmp)
        os.replace(tmp, prev)
    except OSError:  # no hard links here (some network or FAT drives): no previous copy, the write goes on
        with contextlib.suppress(OSError):
            tmp.unlink()


def temporary_name(path: Path) -> Path:
    """A unique sibling of ``path``; the pid and a random part keep concurrent writers apart."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def fsync_dir(folder: Path) -> None:
    """Persist a rename or unlink in ``folder``; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and Windows) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", *, encoding: str | None = None,
                 newline: str | None = None, keep_previous: bool = False, size_hint: int = 0) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it replaces ``path``, on an error it vanishes.
    ``size_hint`` (bytes the caller is about to write, if known) goes into the disk-full message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    if "b" in mode:
        fh = open(tmp, mode)
    else:
        fh = open(tmp, mode, encoding=encoding or "utf-8", newline=newline)
    try:
        try:
            with fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            replace(tmp, path, keep_previous=keep_previous)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            attempted = size_hint
            with contextlib.suppress(OSError, ValueError):
                attempted = max(attempted, fh.tell())
            raise disk_full(path, attempted) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def disk_full(path: Path, attempted: int = 0) -> DiskFullError:
    """The error for a write of ``path`` that ran out of space: how much it needed (at least what it had
    written, or the size of the file it replaces, whichever is more) and how much the drive has free."""
    needed = attempted
    with contextlib.suppress(OSError):
        needed = max(needed, path.stat().st_size)
    free = None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent).free
    need = f"about {human_bytes(needed)}" if needed else "more space"
    has = f"; {human_bytes(free)} is free there" if free is not None else ""
    return DiskFullError(f"the drive of {path.parent} is full: saving {path.name} needs {need}{has}. Free some "
                         f"space and save again; the previous {path.name} is intact", needed, free)


def replace(src: Path, dst: Path, keep_previous: bool = False) -> None:
    """Move a finished temporary file into place and make the move durable (keeping the replaced file as
    the previous good copy when asked)."""
    if keep_previous:
        keep_previous_copy(dst)
    os.replace(src, dst)
    fsync_dir(dst.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview,
                keep_previous: bool = False) -> None:
    with atomic_write(path, "wb", keep_previous=keep_previous, size_hint=len(data)) as fh:
        fh.write(data)


def write_text(path: str | os.PathLike[str], text: str, keep_previous: bool = False) -> None:
    with atomic_write(path, "w", newline="\n", keep_previous=keep_previous,
                      size_hint=len(text.encode("utf-8"))) as fh:
        fh.write(text)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], size_hint: int = 0) -> Iterator[Path]:
    """A temporary path for writers that want a file name (tifffile): moved over ``path`` on success.
    ``size_hint``: the most the writer may write (for the disk-full message)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        try:
            yield tmp
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            replace(tmp, path)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            attempted = size_hint
            with contextlib.suppress(OSError):
                attempted = max(attempted, tmp.stat().st_size)
            raise disk_full(path, attempted) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def clean_temporaries(folder: Path, recursive: bool = False) -> int:
    """Remove temporaries left by a crashed writer; returns how many. Only our own suffix is touched."""
    pattern = f"**/.*{TMP_SUFFIX}" if recursive else f".*{TMP_SUFFIX}"
    n = 0
    for p in folder.glob(pattern):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n
