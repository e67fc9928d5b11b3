"""A user's install: ``pip install "napari-wsimil[all]"`` into a fresh environment, WITHOUT the lock
(requirements/lock.txt), resolves and the plugin imports and registers with napari.

Slow (a few minutes; pip's cache is reused) and needs the package index: skipped without a network.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import venv
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _index_reachable(timeout: float = 3.0) -> bool:
    url = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    host = urlparse(url).hostname or "pypi.org"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


CHECK = """
import napari, npe2, PyQt6
import napari_wsimil
from napari_wsimil._qt.slide_widget import SlideWidget
from napari_wsimil._qt.project_widget import ProjectWidget
from napari_wsimil._qt.labelling_widget import LabellingWidget
from napari_wsimil._qt.training_widget import TrainingWidget
from napari_wsimil._qt.batch_panel import BatchPanel
pm = npe2.PluginManager.instance()
pm.discover()
manifest = pm.get_manifest("napari-wsimil")
assert len(manifest.contributions.widgets) == 6, manifest.contributions.widgets
print("napari", napari.__version__)
"""


@pytest.mark.timeout(1500)
def test_pip_install_all_without_the_lock_imports_the_plugin(tmp_path):
    if not _index_reachable():
        pytest.skip("no network: the package index cannot be reached")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_CONSTRAINT", "VIRTUAL_ENV")}

    def pip(*args: str) -> None:
        run = subprocess.run([str(py), "-m", "pip", "install", "-q", *args], env=env, capture_output=True,
                             text=True, timeout=1200)
        assert run.returncode == 0, f"pip install {' '.join(args)} failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"

    # the CPU build of torch first, as the Makefile does: a plain `torch` requirement pulls a CUDA build
    pip("torch==2.13.0")
    pip(f"{ROOT}[all]")  # no -c requirements/lock.txt: what pip resolves from pyproject.toml's ranges
    run = subprocess.run([str(py), "-c", CHECK], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().startswith("napari 0.9."), run.stdout
