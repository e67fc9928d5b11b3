"""Bad files get a SlideError naming the file and the reason: never a hang, a crash or a raw traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from napari_wsimil import SlideError, open_slide
from conftest import REAL_SLIDES, real_slide


def test_missing_file(tmp_path):
    with pytest.raises(SlideError, match="does not exist") as info:
        open_slide(tmp_path / "nope.svs")
    assert "nope.svs" in str(info.value)


def test_folder_empty_and_not_a_slide(tmp_path):
    with pytest.raises(SlideError, match="folder"):
        open_slide(tmp_path)
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(SlideError, match="empty"):
        open_slide(empty)
    text = tmp_path / "notes.tif"
    text.write_text("these are my notes, not a slide\n" * 20)
    with pytest.raises(SlideError, match="not a slide format") as info:
        open_slide(text)
    assert "notes.tif" in str(info.value)


def test_unsupported_tiff_layout(tmp_path):
    import numpy as np
    import tifffile

    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((5, 4, 32, 32), np.uint16))
    with pytest.raises(SlideError, match="not a 2-D RGB"):
        open_slide(path)


def test_truncated_slide_is_reported(tmp_path):
    src = real_slide("CMU-1-Small-Region.svs")
    data = src.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError) as info:
        with open_slide(cut) as slide:
            slide.levels[0].compute()
    assert "cut.svs" in str(info.value)


def test_corrupt_tile_reports_which_tile(tmp_path):
    import tifffile

    src = real_slide("CMU-1-Small-Region.svs")
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[5], page.databytecounts[5]
    data[offset + 2 : offset + count] = b"\xff" * (count - 2)  # keep SOI, destroy the rest of tile 5
    bad = tmp_path / "bad.svs"
    bad.write_bytes(bytes(data))
    with open_slide(bad) as slide:
        slide.read_region((0, 0), (64, 64), level=0)  # other tiles still read
        with pytest.raises(SlideError, match="tile 5"):
            slide.read_region((5 * 240 + 10, 10), (32, 32), level=0)


_FUZZ_WORKER = textwrap.dedent(
    """
    import json, sys, random
    from pathlib import Path
    from napari_wsimil import SlideError, open_slide
    src, out_dir, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    data = src.read_bytes()
    cases = []
    for frac in (0.0005, 0.01, 0.1, 0.3, 0.6, 0.9, 0.999):
        cases.append(("truncate", data[: int(len(data) * frac)]))
    for _ in range(20):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(0, min(len(buf), 4096))  # header and first IFD
            buf[pos] ^= 1 << rng.randrange(8)
        cases.append(("flip", bytes(buf)))
    results = []
    for i, (kind, blob) in enumerate(cases):
        path = out_dir / f"case{i}{src.suffix}"
        path.write_bytes(blob)
        try:
            with open_slide(path) as slide:
                slide.levels[-1].compute()
                w, h = slide.dimensions
                slide.read_region((w // 2, h // 2), (64, 64), level=0)
            results.append([kind, "ok", ""])
        except SlideError as exc:
            results.append([kind, "SlideError", str(exc)])
        except Exception as exc:
            results.append([kind, "OTHER", f"{type(exc).__name__}: {exc}"])
        path.unlink()
    print(json.dumps(results))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_SLIDES)
def test_fuzzed_copies_of_real_slides(name, tmp_path):
    """Truncated copies and header bit flips: each case opens or fails with SlideError, in a child
    process so that a crash in a C library would fail the test instead of killing the suite."""
    src = real_slide(name)
    proc = subprocess.run(
        [sys.executable, "-c", _FUZZ_WORKER, str(src), str(tmp_path), "1234"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"worker crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    others = [r for r in results if r[1] == "OTHER"]
    assert not others, f"unexpected exception types: {others}"
    errors = [r for r in results if r[1] == "SlideError"]
    assert all("case" in msg and "Cannot read" in msg for _, _, msg in errors)
    assert any(kind == "truncate" and outcome == "SlideError" for kind, outcome, _ in results)


def test_openslide_crash_is_contained_in_a_child(monkeypatch, tmp_path):
    """A file that makes OpenSlide's C code crash (seen with fuzzed DICOM) must not take napari down."""
    from napari_wsimil.slide.backends import openslide as backend

    src = real_slide("multiframe_camelyon_challenge_image.dcm")
    copy = tmp_path / "crashes.dcm"
    copy.write_bytes(src.read_bytes())
    monkeypatch.setattr(backend, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    monkeypatch.setattr(backend, "_probe_cache", {})
    with pytest.raises(SlideError, match="crashed") as info:
        open_slide(copy)
    assert "crashes.dcm" in str(info.value)
