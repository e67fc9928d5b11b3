"""Shared by the examples: where they write (a temporary folder unless --workdir) and whether to show napari."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def parse(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--workdir", type=Path, default=None, help="folder to write into (default: a temporary one)")
    ap.add_argument("--show", action="store_true", help="open the result in napari (needs a display)")
    args = ap.parse_args()
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wsimil-example-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.show and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        print("(no display: --show ignored)")
        args.show = False
    return args
