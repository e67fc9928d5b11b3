"""Feature extraction and prediction on a real dask LocalCluster (worker processes): the same outputs as the
single-process commands, a worker killed mid-slide, a client killed and resumed, two clients on one cohort, an
unreachable scheduler and a corrupt slide."""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.cli import main
from napari_wsimil.features import read_bag

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")

EXTRACT = dict(patch=64, mpp=0.5, batch=32)


@pytest.fixture(scope="module")
def handle():
    from napari_wsimil.cluster.spec import connect

    with connect("local:2") as h:
        yield h


@pytest.fixture(scope="module")
def slides(synth_cohort: Path) -> list[Path]:
    return sorted(synth_cohort.glob("slide_*[0-9].tiff"))


def same_bags(a: Path, b: Path, ids: list[str]) -> None:
    for sid in ids:
        x, y = read_bag(a / f"{sid}.npz"), read_bag(b / f"{sid}.npz")
        assert np.array_equal(x.coords, y.coords) and np.array_equal(x.features, y.features), sid
        assert x.attrs == y.attrs, sid


def no_leftovers(out: Path) -> None:
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".claims"]
    assert not list((out / ".claims").glob("*"))


def test_extraction_on_the_cluster_writes_the_single_process_bags(handle, slides, reference, tmp_path) -> None:
    from napari_wsimil.cluster.cohorts import extract_on_cluster

    seen: list[tuple[int, int]] = []
    res = extract_on_cluster(handle, slides, tmp_path, "handcrafted", device="cpu",
                             progress=lambda d, t, r: seen.append((d, t)), **EXTRACT)
    assert sorted(r["status"] for r in res) == ["done"] * len(slides)
    assert len({r["pid"] for r in res}) == 2  # both worker processes took slides
    assert seen[0] == (0, len(slides)) and seen[-1] == (len(slides), len(slides))
    same_bags(reference, tmp_path, [p.stem for p in slides])
    no_leftovers(tmp_path)
    again = extract_on_cluster(handle, slides, tmp_path, "handcrafted", device="cpu", **EXTRACT)
    assert {r["status"] for r in again} == {"skipped"}
    # one BLAS thread per one-thread worker; no MALLOC_TRIM_THRESHOLD_ (it doubled the system CPU time)
    env = handle.client.run(lambda: (os.environ.get("OMP_NUM_THREADS"), os.environ.get("MALLOC_TRIM_THRESHOLD_")))
    assert set(env.values()) == {("1", None)}
    import dask

    assert set(handle.client.run(lambda: dask.config.get("distributed.worker.profile.enabled")).values()) == {False}
    # idle processes wake up less often (benchmarks/bench_cluster_idle.py): the periodic callbacks of the workers,
    # their nannies and the scheduler, in ms (dask's defaults: tick 20, monitor 500, memory_monitor 100)
    def every(server):
        return {k: server.periodic_callbacks[k].callback_time for k in ("tick", "monitor", "memory_monitor")
                if k in server.periodic_callbacks}

    calm = {"tick": 1000, "monitor": 2000, "memory_monitor": 1000}
    assert list(handle.client.run(lambda dask_worker: every(dask_worker)).values()) == [calm] * 2
    assert [every(n) for n in handle.cluster.workers.values()] == [calm] * 2
    assert handle.client.run_on_scheduler(lambda dask_scheduler: every(dask_scheduler)) == \
        {"tick": 1000, "monitor": 2000}


def test_a_worker_killed_mid_slide_is_retried_and_nothing_is_half_written(handle, slides, reference,
                                                                            tmp_path) -> None:
    from napari_wsimil.cluster.cohorts import extract_on_cluster

    box: dict = {}
    t = threading.Thread(target=lambda: box.update(res=extract_on_cluster(
        handle, slides, tmp_path, "handcrafted", device="cpu", **EXTRACT)))
    t.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline:
        for claim in (tmp_path / ".claims").glob("*.claim") if (tmp_path / ".claims").is_dir() else []:
            try:
                import json

                pid = int(json.loads(claim.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                continue
            os.kill(pid, signal.SIGKILL)  # the worker process, mid-slide
            killed = claim.name.removesuffix(".npz.claim")
            break
        time.sleep(0.02)
    t.join(timeout=120)
    assert killed is not None and not t.is_alive()
    res = box["res"]
    assert sorted(r["status"] for r in res) == ["done"] * len(slides), res
    same_bags(reference, tmp_path, [p.stem for p in slides])
    no_leftovers(tmp_path)
    handle.client.wait_for_workers(2, timeout=30)  # the nanny restarted it, for the next tests


@pytest.mark.slow
def test_a_killed_client_resumes_without_recomputing(slides, reference, tmp_path) -> None:
    out = tmp_path / "bags"
    cmd = [sys.executable, "-m", "napari_wsimil.cli", "features", *map(str, slides), "--out", str(out),
           "--mpp", "0.5", "--patch", "64", "--batch", "32", "--device", "cpu", "--cluster", "local:1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while len(list(out.glob("*.npz"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the client, its scheduler and its workers: a lost machine
        proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    assert 2 <= len(before) < len(slides)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    computed = int(re.search(r"(\d+) computed", r.stderr).group(1))
    assert computed == len(slides) - len(before), r.stderr
    assert all(out.joinpath(n).stat().st_mtime_ns == m for n, m in before.items())
    assert "dashboard http://" in r.stderr and "ETA" in r.stderr
    same_bags(reference, out, [p.stem for p in slides])
    no_leftovers(out)


@pytest.mark.slow
def test_two_clients_on_one_cohort_do_each_slide_once(handle, slides, tmp_path) -> None:
    """Two `wsimil features` processes joining one scheduler with the same slides."""
    out = tmp_path / "bags"
    cmd = [sys.executable, "-m", "napari_wsimil.cli", "features", *map(str, slides), "--out", str(out),
           "--mpp", "0.5", "--patch", "64", "--batch", "32", "--device", "cpu",
           "--cluster", handle.client.scheduler.address]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=150) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    computed = [int(re.search(r"(\d+) computed", err).group(1)) for _, err in outs]
    assert sum(computed) == len(slides), outs
    assert len(list(out.glob("*.npz"))) == len(slides)


def test_an_unreachable_scheduler_is_one_line_and_exit_2(slides, tmp_path, capsys, monkeypatch) -> None:
    from napari_wsimil.cluster import spec

    monkeypatch.setattr(spec, "CONNECT_TIMEOUT_S", 1.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, and nobody listens once closed
    code = main(["features", str(slides[0]), "--out", str(tmp_path), "--cluster", f"tcp://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "cannot reach the dask scheduler" in err and str(port) in err
    assert not list(tmp_path.iterdir())
    assert main(["features", str(slides[0]), "--out", str(tmp_path), "--cluster", "local:zero"]) == 2


@pytest.fixture(scope="module")
def trained_run(synth_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("work") / "run"
    assert main(["train", str(synth_cohort / "cohort.csv"), "--method", "abmil", "--out", str(run), "--epochs", "1",
                 "--encoder", "handcrafted", "--patch", "128", "--mpp", "1.0", "--device", "cpu"]) == 0
    return run


@pytest.mark.slow
def test_prediction_of_new_slides_matches_the_single_process_and_lists_failures(
        handle, trained_run, slides, tmp_path, capsys) -> None:
    import tifffile

    good = tmp_path / "good"
    good.mkdir()
    for p in slides:
        (good / p.name).symlink_to(p)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in slides:
        (mixed / p.name).symlink_to(p)
    (mixed / "broken.svs").write_bytes(b"II*\x00" + os.urandom(2000))  # a truncated, corrupt scan

    single, clustered = tmp_path / "single", tmp_path / "cluster"
    assert main(["predict", str(trained_run), "--cohort", str(good), "--out", str(single), "--device", "cpu"]) == 0
    code = main(["predict", str(trained_run), "--cohort", str(mixed), "--out", str(clustered), "--device", "cpu",
                 "--cluster", handle.client.scheduler.address])
    err = capsys.readouterr().err
    assert code == 1 and "1 slides could not be predicted" in err and "failures.csv" in err

    def table(folder: Path) -> list[list[str]]:
        with open(folder / "predictions.csv", newline="") as fh:
            return [row[:-1] for row in csv.reader(fh)]  # all but the seconds column

    assert table(single) == table(clustered)
    with open(clustered / "failures.csv", newline="") as fh:
        failures = list(csv.DictReader(fh))
    assert [f["slide_id"] for f in failures] == ["broken"] and failures[0]["reason"]
    for p in slides:
        a = tifffile.imread(single / "heatmaps" / f"{p.stem}.tif")
        b = tifffile.imread(clustered / "heatmaps" / f"{p.stem}.tif")
        assert np.array_equal(a, b)
        with np.load(single / "attention" / f"{p.stem}.npz") as x, np.load(clustered / "attention" / f"{p.stem}.npz") as y:
            assert all(np.array_equal(x[k], y[k]) for k in x.files)
    assert not list(clustered.glob(".parts/*")) and not list(clustered.glob(".claims/*"))

    # run again (as after a killed client): committed slides are not predicted again
    stamps = {p: p.stat().st_mtime_ns for p in [*clustered.glob(".done/*"), *clustered.glob("heatmaps/*")]}
    assert len(list(clustered.glob(".done/*"))) == len(slides)
    assert main(["predict", str(trained_run), "--cohort", str(mixed), "--out", str(clustered), "--device", "cpu",
                 "--cluster", handle.client.scheduler.address]) == 1
    assert "slide_000: up to date, skipped" in capsys.readouterr().err
    assert all(p.stat().st_mtime_ns == m for p, m in stamps.items())
    assert table(single) == table(clustered)


@pytest.mark.slow
def test_segmentation_maps_and_masks_on_the_cluster_match_the_single_process(handle, synth_cohort, tmp_path) -> None:
    """`wsimil predict --masks` of a segmentation run: maps, masks and outlines as the single process writes them."""
    import tifffile

    small = ["--mpp", "4", "--patch", "32", "--set", "width=8", "--set", "depth=3", "--set", "patches_per_epoch=32",
             "--set", "batch_size=8", "--set", "map_tile=128", "--set", "val_patches=4", "--set", "read_workers=2",
             "--device", "cpu"]
    cohort, run = synth_cohort / "cohort.csv", tmp_path / "run"
    assert main(["train", str(cohort), "--method", "pinchaud", "--out", str(run), "--epochs", "1", *small]) == 0
    single, clustered = tmp_path / "single", tmp_path / "cluster"
    common = ["predict", str(run), "--cohort", str(cohort), "--device", "cpu", "--masks"]
    assert main([*common, "--out", str(single)]) == 0
    assert main([*common, "--out", str(clustered), "--cluster", handle.client.scheduler.address]) == 0
    with open(single / "predictions.csv") as a, open(clustered / "predictions.csv") as b:
        assert [r.split(",")[:-1] for r in a] == [r.split(",")[:-1] for r in b]
    names = sorted(p.relative_to(single).as_posix() for p in single.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(clustered).as_posix() for p in clustered.rglob("*")
                           if p.is_file() and not p.relative_to(clustered).parts[0].startswith("."))
    for name in names:
        if name.endswith(".tif"):
            assert np.array_equal(tifffile.imread(single / name), tifffile.imread(clustered / name)), name
        elif name.endswith(".geojson"):
            assert (single / name).read_text() == (clustered / name).read_text(), name
