"""Kills at random moments (issue #21, part 3): a seeded subset of benchmarks/kills.py (one kill -9 during painting
with autosave, export, feature extraction and training) must lose nothing acknowledged and leave nothing
half-written that passes for finished. The 50-trial run gives the figures in docs/reliability.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kill_trials_subset(tmp_path: Path):
    out = tmp_path / "kills"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kills.py"), "--trials", "4", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "kills.json").read_text())
    assert summary["bad_trials"] == 0 and summary["strokes_lost"] == 0 and summary["garbage_cells"] == 0
    assert summary["by_activity"] == {"paint": 1, "export": 1, "extract": 1, "train": 1}
    assert summary["strokes_acknowledged"] > 0  # the kill landed while strokes were being saved
    assert summary["files_checked"] > 0


def test_stroke_check_finds_a_lost_stroke_and_garbage():
    """The painting check can fail: a missing acknowledged stroke and a foreign value are both reported."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from kills import CELL, cell_check
    finally:
        sys.path.pop(0)
    labels = np.zeros((4 * CELL, 4 * CELL), np.uint8)
    for i in range(6):
        y, x = (i // 4) * CELL, (i % 4) * CELL
        labels[y:y + CELL, x:x + CELL] = 1 + i % 2
    assert cell_check(labels, set(range(6))) == ([], [])
    labels[0:CELL, CELL:2 * CELL] = 0  # stroke 1 lost
    labels[3 * CELL, 3 * CELL] = 7  # a value no stroke painted
    assert cell_check(labels, set(range(6))) == ([1], [15])
