"""Guards the fuzzer asked for in the TIFF backend: an IFD chain that loops, or a directory past the end of the file,
is a SlideError at once instead of a reader spinning."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from napari_wsimil.errors import SlideError
from napari_wsimil.slide import open_slide


def _ifd_offsets(data: bytes) -> list[tuple[int, int]]:
    """(IFD offset, position of its next pointer) of a classic little-endian TIFF."""
    out, off = [], struct.unpack("<I", data[4:8])[0]
    while off:
        n = struct.unpack("<H", data[off:off + 2])[0]
        nxt = off + 2 + 12 * n
        out.append((off, nxt))
        off = struct.unpack("<I", data[nxt:nxt + 4])[0]
    return out


@pytest.fixture
def tiff(small_cohort_dir: Path) -> bytes:
    data = next(small_cohort_dir.glob("*.tif*")).read_bytes()
    if data[:4] != b"II*\x00":
        pytest.skip("the synthetic slide is not a classic little-endian TIFF")
    return data


def test_ifd_loop_is_named_not_followed(tiff: bytes, tmp_path: Path):
    ifds = _ifd_offsets(tiff)
    buf = bytearray(tiff)
    struct.pack_into("<I", buf, ifds[-1][1], ifds[0][0])  # the last IFD points back to the first
    path = tmp_path / "loop.tiff"
    path.write_bytes(bytes(buf))
    t = time.perf_counter()
    with pytest.raises(SlideError, match="loops back on itself"):
        open_slide(path)
    assert time.perf_counter() - t < 5


def test_directory_past_the_end_is_named(tiff: bytes, tmp_path: Path):
    ifds = _ifd_offsets(tiff)
    buf = bytearray(tiff)
    struct.pack_into("<I", buf, ifds[0][1], len(tiff) + 4096)
    path = tmp_path / "past.tiff"
    path.write_bytes(bytes(buf))
    with pytest.raises(SlideError, match="lies past its end"):
        open_slide(path)
