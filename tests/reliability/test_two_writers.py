"""Two writers (issue #21, part 4): napari and the CLI on one project, and two trainings into one run folder.
(Two feature extractions on one project are covered by the per-slide extraction claims in features/.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.errors import WsimilError


def _wsimil(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "napari_wsimil.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.gui
def test_gui_and_cli_on_one_project(make_napari_viewer, qtbot, small_project: Path):
    """napari has the project open for writing: the CLI reads it read-only and says who writes; a process that
    holds the project makes napari open it read-only, naming that process."""
    pytest.importorskip("napari")
    from napari_wsimil._qt.project_widget import ProjectWidget

    viewer = make_napari_viewer(show=False)
    pw = ProjectWidget(viewer)
    pw.open_project(str(small_project))
    assert not pw.session.project.readonly
    out = _wsimil("project", "info", str(small_project))
    assert out.returncode == 0, out.stderr
    assert f"read-only here: the project is open for writing in another window or process (pid {os.getpid()})" \
        in out.stdout
    out = _wsimil("project", "export", str(small_project), "--format", "geojson", "--out",
                  str(small_project.parent / "exp"))
    assert out.returncode == 0 and f"open for writing in another window or process (pid {os.getpid()})" in out.stderr
    pw.close_project()

    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from napari_wsimil.project import Project
        p = Project.open({str(small_project)!r})
        assert not p.readonly
        print("holding", flush=True)
        sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "holding"
        pw.open_project(str(small_project))
        assert pw.session.project.readonly
        assert not pw.banner.isHidden() and f"pid {child.pid}" in pw.banner.text()
        assert not pw.add_btn.isEnabled()
        pw.close_project()
    finally:
        child.stdin.close()
        child.wait(30)
        child.stdout.close()


def _bags(n: int = 8, dim: int = 8):
    from napari_wsimil.mil import BagDataset

    rng = np.random.default_rng(0)
    return BagDataset.from_arrays([rng.normal(size=(10, dim)).astype(np.float32) for _ in range(n)],
                                  [i % 2 for i in range(n)])


def _method(epochs: int):
    from napari_wsimil.mil import build
    from napari_wsimil.train import make_config

    cfg = make_config("abmil", epochs=epochs, seed=0, hidden=16, attn_hidden=8, lr=1e-3, device="cpu")
    return build("abmil", _bags(), None, cfg)


def test_second_training_into_one_run_folder_is_refused(tmp_path: Path, one_torch_thread):
    from napari_wsimil.train import TrainingError, train
    from napari_wsimil.train.run import RunSpec, check_spec

    run = tmp_path / "run"
    first = train(_method(50), run)
    next(first)  # the first training has started and holds the run folder
    second = train(_method(2), run)
    with pytest.raises(TrainingError, match=rf"another training is writing into {run} \(pid {os.getpid()}\)"):
        next(second)
    with pytest.raises(WsimilError, match="another training is writing into"):  # refused before features too
        check_spec(RunSpec(source=tmp_path, method="abmil", out=run))
    first.close()  # stopped: the folder is free again
    for _ in train(_method(1), run, resume=True):
        pass


def test_training_in_another_process_is_refused_until_it_dies(tmp_path: Path, one_torch_thread):
    from napari_wsimil.train import TrainingError, train

    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        torch.set_num_threads(1)
        from test_two_writers import _method
        from napari_wsimil.train import train
        for i, e in enumerate(train(_method(100000), {str(run)!r})):
            if i == 0:
                print("training", flush=True)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "training"
        with pytest.raises(TrainingError, match=rf"pid {child.pid}"):
            next(train(_method(1), run))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
    events = list(train(_method(1), run))  # kill -9 released the lock with the process
    assert events[-1].kind == "done"
