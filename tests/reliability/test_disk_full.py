"""Disk full (issue #21, part 6): on a real 2 MB tmpfs (mounted in a user namespace), saves that run out of
space leave the previous state whole and say how much space they needed. Skipped where mounting is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from napari_wsimil.errors import DiskFullError
    from napari_wsimil.features.bags import Bag
    from napari_wsimil.project import Project
    from napari_wsimil.project.export import export_project

    drive, cohort = sys.argv[1], sys.argv[2]
    root = os.path.join(drive, "proj")
    res = {}
    p = Project.create_from_csv(root, cohort)
    sid = p.slide_ids[0]
    lab = np.zeros(p.label_geometry(sid).shape, np.uint8)
    lab[:50, :50] = 1
    p.save_pixel_labels(sid, lab)
    pj = os.path.join(root, "project.json")
    before_json = open(pj).read()
    with open(os.path.join(drive, "filler"), "wb", buffering=0) as f:  # fill the drive to the last block
        try:
            while True:
                f.write(os.urandom(16384))
        except OSError:
            pass
        try:
            while True:
                f.write(b"x")
        except OSError:
            pass

    def attempt(name, func):
        try:
            func()
            res[name] = "saved"
        except DiskFullError as exc:
            res[name] = str(exc)

    old_label = p.record(sid).label
    new_label = "benign" if old_label == "malignant" else "malignant"
    attempt("project", lambda: p.set_slide_label(sid, new_label))
    res["project_same"] = open(pj).read() == before_json and p.record(sid).label == old_label
    noise = np.random.default_rng(0).integers(1, 3, lab.shape).astype(np.uint8)
    attempt("labels", lambda: p.save_pixel_labels(sid, noise))
    attempt("bag", lambda: Bag(np.zeros((2000, 2), np.int64), np.ones((2000, 64), np.float32)).save(
        os.path.join(root, "features", "b.npz")))
    res["bag_exists"] = os.path.exists(os.path.join(root, "features", "b.npz"))
    attempt("export", lambda: export_project(p, os.path.join(drive, "exp"), format="ome-tiff", pixels_only=True))
    res["export_files"] = sorted(os.listdir(os.path.join(drive, "exp"))) if os.path.isdir(os.path.join(drive, "exp")) else []
    res["temporaries"] = [str(x) for x in __import__("pathlib").Path(drive).rglob("*.wsimil-tmp")]
    p.close()
    with Project.open(root) as q:
        res["labels_same"] = bool(np.array_equal(q.pixel_labels(sid), lab))
        os.remove(os.path.join(drive, "filler"))
        q.set_slide_label(sid, new_label)
        res["after_free"] = q.record(sid).label == new_label
    print("RESULT " + json.dumps(res))
""")


def test_disk_full_leaves_previous_state_and_says_how_much(small_cohort_dir: Path, tmp_path: Path):
    if shutil.which("unshare") is None:
        pytest.skip("no `unshare` here to mount a small tmpfs")
    drive = tmp_path / "drive"
    drive.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(SCRIPT)
    cmd = (f"mount -t tmpfs -o size=2m tmpfs {drive} && exec {sys.executable} {script} {drive} "
           f"{small_cohort_dir / 'cohort.csv'}")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=120)
    if out.returncode != 0 and "RESULT" not in out.stdout and (
            "Operation not permitted" in out.stderr or "mount" in out.stderr or "unshare" in out.stderr):
        pytest.skip(f"this machine does not allow mounting a tmpfs in a user namespace: {out.stderr.strip()[:200]}")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.split("RESULT ", 1)[1])
    for what in ("project", "labels", "bag", "export"):
        assert res[what].startswith(f"the drive of {drive}") and " is full: saving " in res[what], (what, res[what])
        assert "needs about" in res[what] and "is free there" in res[what] and "is intact" in res[what]
    assert "needs about 1." in res["project"] and "KB" in res["project"]  # project.json is ~1-2 KB
    assert res["project_same"] and res["labels_same"], {k: v for k, v in res.items() if "same" in k}
    assert not res["bag_exists"] and res["export_files"] == []
    assert res["temporaries"] == []
    assert res["after_free"]  # with space again, the same save goes through
