"""The cached sample slide's helpers: is a cached pyramid whole, and one writer at a time.

Why apart: ``sample_slide_path`` (in the package's ``__init__``) regenerates a missing or damaged sample under
a lock; these two are its only file-system logic, kept out of the generator's modules.
"""

from __future__ import annotations

from pathlib import Path


def pyramid_ok(path: Path, shape: tuple[int, int] | None = None) -> bool:
    """Whether a cached file is complete: it opens, has the expected size, and its last tiles decode."""
    if not path.is_file():
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            pages = list(tf.pages)
            if not pages or (shape is not None and tuple(pages[0].shape[:2]) != shape):
                return False
            end = max(o + c for p in pages for o, c in zip(p.dataoffsets, p.databytecounts))
            if end > path.stat().st_size:
                return False
            pages[-1].asarray()
        return True
    except Exception:  # any failure to read means "regenerate"; the reason does not matter here
        return False


class file_lock:
    """Exclusive advisory lock on a file (POSIX); elsewhere a no-op, atomic renames still keep files whole."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = None

    def __enter__(self) -> file_lock:
        try:
            import fcntl
        except ImportError:
            return self
        self.fh = open(self.path, "a+")
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            import fcntl

            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
