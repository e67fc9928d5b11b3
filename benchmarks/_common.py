"""Helpers shared by the benchmarks: where the real slides are, a synthetic slide on demand, a table printer."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SHARED_SLIDES = Path(
    os.environ.get("WSIMIL_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
) / "slides"


def real_slides(*names: str) -> list[Path]:
    found = [SHARED_SLIDES / n for n in names if (SHARED_SLIDES / n).exists()]
    if len(found) < len(names):
        print(f"(some real slides are missing from {SHARED_SLIDES}; they are left out)")
    return found


def synthetic_slide(size: int, workdir: Path | None = None, seed: int = 3) -> Path:
    """A malignant synthetic slide of size² px, cached across benchmark runs in the temp folder."""
    from napari_wsimil.slide.synthetic import _SAMPLE_VERSION, synthesize_slide

    workdir = workdir or Path(tempfile.gettempdir()) / "wsimil-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"synthetic_v{_SAMPLE_VERSION}_{size}_{seed}.tiff"  # a new renderer makes new files
    if not path.exists():
        t = time.perf_counter()
        synthesize_slide(path, size, seed=seed, malignant=True, mpp=0.5)
        print(f"(made {path.name} in {time.perf_counter() - t:.1f} s)")
    return path


def rate(func: Callable[[], object], n: int) -> float:
    """Calls per second of ``func`` over ``n`` calls."""
    t = time.perf_counter()
    for _ in range(n):
        func()
    return n / (time.perf_counter() - t)


def table(rows: list[list[object]], header: list[str]) -> str:
    cells = [header] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
