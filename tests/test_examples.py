"""Every script in examples/ runs headless, as a new user would run it, and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXPECT = {
    "01_slide_tissue_patches.py": "patches of 224 px at 1 µm/px on tissue",
    "02_project_paint_export.py": "QuPath GeoJSON: ['slide_000.geojson', 'slide_001.geojson']",
    "03_train_clam_attention.py": "attention map of slide_000",
    "04_pinchaud_masks.py": "slide_005.ome.tif",
    "05_zoommil.py": "patches encoded in",
    "06_federated_histofl.py": "from the federated model",
}


def test_every_example_is_listed() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("[0-9]*.py")) == sorted(EXPECT)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_example_runs(name: str, tmp_path: Path) -> None:
    if name != "01_slide_tissue_patches.py":
        pytest.importorskip("torch")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    done = subprocess.run([sys.executable, str(EXAMPLES / name), "--workdir", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert EXPECT[name] in done.stdout
