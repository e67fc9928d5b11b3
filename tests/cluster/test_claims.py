"""Claims: one owner per slide, stale claims of dead processes taken over, and two real extractions on one
cohort sharing the slides instead of both doing all of them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from napari_wsimil.io.claims import Claim, ClaimOwner, claim_path, try_claim


def test_a_live_claim_is_refused_and_released(tmp_path: Path) -> None:
    first = try_claim(tmp_path, "s1")
    assert isinstance(first, Claim)
    second = try_claim(tmp_path, "s1")
    assert isinstance(second, ClaimOwner) and second.pid == os.getpid() and second.token == first.owner.token
    first.release()
    assert not claim_path(tmp_path, "s1").exists()
    third = try_claim(tmp_path, "s1")
    assert isinstance(third, Claim)
    third.release()


def test_a_dead_process_claim_is_taken_over(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)  # a pid that has exited (reuse within the test is vanishingly unlikely)
    path = claim_path(tmp_path, "s1")
    path.parent.mkdir(parents=True)
    import socket

    path.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "token": "old", "since": time.time(),
                                "lease_s": 3600}))
    got = try_claim(tmp_path, "s1")
    assert isinstance(got, Claim) and got.owner.pid == os.getpid()
    got.release()


def test_another_hosts_claim_expires_with_its_lease(tmp_path: Path) -> None:
    path = claim_path(tmp_path, "s1")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "token": "t", "since": time.time(),
                                "lease_s": 60}))
    assert isinstance(try_claim(tmp_path, "s1"), ClaimOwner)  # fresh: its owner may be working
    old = time.time() - 120
    os.utime(path, (old, old))
    got = try_claim(tmp_path, "s1")
    assert isinstance(got, Claim)
    got.release()


def test_the_heartbeat_keeps_a_claim_fresh(tmp_path: Path) -> None:
    got = try_claim(tmp_path, "s1", lease_s=0.4)
    assert isinstance(got, Claim)
    old = time.time() - 100
    os.utime(got.path, (old, old))
    time.sleep(0.3)
    assert time.time() - got.path.stat().st_mtime < 1.0
    got.release()


@pytest.mark.slow
def test_two_extractions_on_one_cohort_do_each_slide_once(synth_cohort: Path, tmp_path: Path) -> None:
    """Two real `wsimil features` processes started together on the same slides and output folder: every slide
    is computed by exactly one of them, both finish with every bag present and equal to a lone run's."""
    slides = sorted(str(p) for p in synth_cohort.glob("slide_*[0-9].tiff"))
    out = tmp_path / "bags"
    cmd = [sys.executable, "-m", "napari_wsimil.cli", "features", *slides, "--out", str(out), "--mpp", "0.5",
           "--patch", "64", "--batch", "32"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    computed = [int(re.search(r"(\d+) computed", err).group(1)) for _, err in outs]
    assert sum(computed) == len(slides), outs
    assert sorted(p.stem for p in out.glob("*.npz")) == sorted(Path(s).stem for s in slides)
    assert not list((out / ".claims").glob("*.claim"))
    from napari_wsimil.features import extract_features, read_bag

    alone = extract_features(slides[0], "handcrafted", 64, 0.5, 32, device="cpu")
    shared = read_bag(out / f"{Path(slides[0]).stem}.npz")
    assert (alone.features == shared.features).all() and (alone.coords == shared.coords).all()


def test_stale_claims_are_swept_and_live_ones_kept(tmp_path) -> None:
    """A process killed between writing a bag and releasing its claim leaves the claim behind; the rerun skips
    that finished slide, so the sweep at the end of a run is what removes it. A live owner's claim stays."""
    import json as _json

    from napari_wsimil.io.claims import claim_path, sweep_stale, try_claim

    import socket
    import time

    live = try_claim(tmp_path, "a.npz")
    dead = claim_path(tmp_path, "b.npz")
    dead.write_text(_json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname(), "token": "gone",
                                 "since": time.time(), "lease_s": 120.0}))  # this host, a pid above pid_max
    try:
        assert sweep_stale(tmp_path) == 1
        assert not dead.exists() and claim_path(tmp_path, "a.npz").exists()
        assert sweep_stale(tmp_path / "nowhere") == 0
    finally:
        live.release()
