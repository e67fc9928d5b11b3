"""Crashes while saving leave the previous version readable; newer schemas are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.project import Project, ProjectError
from napari_wsimil.io import atomic
from napari_wsimil.io import raster_store as pl


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((atomic.TMP_SUFFIX, ".partial"))]


def test_project_json_survives_failed_replace(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    path = project.root / "project.json"
    before = path.read_bytes()
    classes = project.classes

    def fail(src: object, dst: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        project.add_class("stroma")
    assert path.read_bytes() == before and project.classes == classes  # memory rolled back too
    assert _leftovers(project.root) == []
    monkeypatch.undo()
    project.add_class("stroma")
    assert json.loads(path.read_text())["classes"][-1]["name"] == "stroma"


def test_project_json_survives_failed_write(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    path = project.root / "project.json"
    before = path.read_bytes()
    real_fsync = os.fsync

    def fail_after_half(fd: int) -> None:  # data is in the temporary file, then the "disk" fails
        raise OSError("simulated I/O error")

    monkeypatch.setattr(atomic.os, "fsync", fail_after_half)
    with pytest.raises(OSError):
        project.set_split("slide_000", "train")
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    assert path.read_bytes() == before and project.record("slide_000").split is None
    project.close()
    with Project.open(project.root) as p:
        assert p.record("slide_000").split is None and _leftovers(p.root) == []


def test_label_chunks_survive_failed_save(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    with Project.create(project.root.parent / "fine", label_mpp=0.5) as p:  # 2048² labels, 16 chunks
        sid = p.add_slide(project.slide_path("slide_000")).slide_id
        old = np.ones((2048, 2048), np.uint8)
        p.save_pixel_labels(sid, old)
        calls = []
        real = pl._durable_put

        def flaky(path: Path, data: object) -> None:
            calls.append(path)
            if len(calls) == 5:
                raise OSError("simulated crash mid-save")
            real(path, data)

        monkeypatch.setattr(pl, "_durable_put", flaky)
        with pytest.raises(OSError, match="mid-save"):
            p.save_pixel_labels(sid, np.full((2048, 2048), 2, np.uint8))
        monkeypatch.undo()
        got = p.pixel_labels(sid)
        blocks = got.reshape(4, 512, 4, 512).transpose(0, 2, 1, 3).reshape(16, -1)
        assert all(len(np.unique(b)) == 1 for b in blocks)  # every chunk is the old or the new one
        assert (blocks[:, 0] == 1).any()
        deadline = time.monotonic() + 10  # the save's other chunk writes (zarr threads) may still be finishing
        while _leftovers(p.root) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _leftovers(p.root) == []


def test_chunk_writes_are_fsynced(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    lab = project.pixel_labels("slide_000")
    lab[:4, :4] = 1
    project.save_pixel_labels("slide_000", lab, dirty=[(0, 4, 0, 4)])
    assert len(synced) >= 4  # chunk file, its folder, zarr.json, its folder


_CHILD = """
import sys, numpy as np
from napari_wsimil.project import Project
p = Project.open(sys.argv[1])
sid = p.slide_ids[0]
i = 0
while True:
    i += 1
    p.save_pixel_labels(sid, np.full(p.label_geometry(sid).shape, 1 + i % 2, np.uint8))
    p.set_slide_label(sid, ["benign", "malignant"][i % 2])
    print(i, flush=True)
"""


def test_killed_mid_save(project: Project, tmp_path: Path) -> None:
    root = tmp_path / "fine"
    with Project.create(root, label_mpp=0.5) as p:
        p.add_slide(project.slide_path("slide_000"))
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_CHILD))
    for delay in (0.05, 0.13, 0.31):
        child = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "1"  # one save done; now kill it somewhere in another
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            child.stdout.close()
        with Project.open(root) as p:  # the lock died with the child
            assert not p.readonly and p.slides[0].label in ("benign", "malignant")
            got = p.pixel_labels(p.slide_ids[0])
            blocks = got.reshape(4, 512, 4, 512).transpose(0, 2, 1, 3).reshape(16, -1)
            assert all(len(np.unique(b)) == 1 and b[0] in (1, 2) for b in blocks)
            assert _leftovers(root) == []  # opening for writing removed the dead writer's temporaries


def test_newer_schema_and_damaged_file(project: Project) -> None:
    root = project.root
    project.close()
    path = root / "project.json"
    (root / ".project.json.wsimil-prev").unlink()  # with a previous good copy it opens read-only (tests/reliability)
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"schema": 2}))
    with pytest.raises(ProjectError, match=r"newer napari-wsimil \(project schema 2; this version reads up to 1\)"):
        Project.open(root)
    path.write_text(json.dumps(data)[:-20])
    with pytest.raises(ProjectError, match="not valid JSON"):
        Project.open(root)
    path.write_text(json.dumps(data | {"classes": [{"id": 1, "name": "x", "color": "#000000"}]}))
    with pytest.raises(ProjectError, match="id 0"):
        Project.open(root)
