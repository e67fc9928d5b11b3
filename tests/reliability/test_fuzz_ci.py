"""The fuzzing harness's CI subset (issue #21, part 1): ~100 seeded malformed slides and structured inputs, each
in a child process limited to 10 s and 1 GB; none may crash, hang, run out of memory, give an unclear message or
leave something half-written. The full run (benchmarks/fuzz.py without --ci) gives the figures in
docs/reliability.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fuzz_ci_subset(tmp_path: Path):
    out = tmp_path / "fuzz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), "--ci", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bad"] == [], run.stdout[-4000:]
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    # the real slides in ../shared/data/slides bring about half the cases; a clone without ../shared beside it
    # (the other real-data tests skip there) fuzzes the synthetic slide and the structured inputs only
    assert summary["cases"] >= (100 if (SHARED_DATA / "slides").is_dir() else 50)
    assert {k.split("/")[1] for k in summary["by_source"] if k.startswith("input/")} >= {
        "geojson", "cohort_csv", "bag", "checkpoint", "run_json", "project_json", "label_chunk"}
    slides = {k for k in summary["by_source"] if k.startswith("slide/")}
    assert "slide/synthetic.tiff" in slides
    assert summary["outcomes"].get("error", 0) > 20 and summary["outcomes"].get("ok", 0) > 10  # it does mutate
    assert summary["max_rss_mb"] < 1024
