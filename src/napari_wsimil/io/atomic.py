"""Files that are either the old version or the new one, never half of each.

Every write goes to a temporary file in the same folder (so the rename stays on one file system),
is flushed and fsync'ed, then moved over the target with ``os.replace``, which is atomic on POSIX
and Windows; finally the folder is fsync'ed so that the rename itself survives a power cut. A crash
at any point leaves the previous file intact plus, at worst, a stray ``*.tmp`` that the next
successful write of the same file does not depend on (and ``clean_temporaries`` removes).

Previous good copies. Writers of files that hold a pathologist's work (project.json, annotation GeoJSON,
label chunks) pass ``keep_previous=True``: just before the rename, the file about to be replaced is
hard-linked to ``.NAME.wsimil-prev`` beside it. A hard link costs no data blocks and one directory
entry, so every save can afford it; if the file system has no hard links the copy is simply skipped.
``wsimil project check --repair`` restores from these copies when the current file is damaged (a disk
error, a sync tool, a hand edit); see napari_wsimil.project.check.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

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
                 newline: str | None = None, keep_previous: bool = False) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it replaces ``path``, on an error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    if "b" in mode:
        fh = open(tmp, mode)
    else:
        fh = open(tmp, mode, encoding=encoding or "utf-8", newline=newline)
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        replace(tmp, path, keep_previous=keep_previous)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def replace(src: Path, dst: Path, keep_previous: bool = False) -> None:
    """Move a finished temporary file into place and make the move durable (keeping the replaced file as
    the previous good copy when asked)."""
    if keep_previous:
        keep_previous_copy(dst)
    os.replace(src, dst)
    fsync_dir(dst.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview,
                keep_previous: bool = False) -> None:
    with atomic_write(path, "wb", keep_previous=keep_previous) as fh:
        fh.write(data)


def write_text(path: str | os.PathLike[str], text: str, keep_previous: bool = False) -> None:
    with atomic_write(path, "w", newline="\n", keep_previous=keep_previous) as fh:
        fh.write(text)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path for writers that want a file name (tifffile): moved over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        replace(tmp, path)
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
