"""Huge slides as region tasks (``--region-patches``): the merged bag equals the single-process bag array for array
and attribute for attribute (also for a CNN, whose output could depend on how patches are batched), a worker killed
mid-region is redone, finished regions of a killed run are not encoded again, and a merge with a part missing
writes nothing."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from napari_wsimil.cluster.runner import run_slides
from napari_wsimil.cluster.tasks import ExtractJob, MergeJob, RegionJob, extract_task
from napari_wsimil.features import read_bag
from napari_wsimil.features.extract import extract_cohort
from napari_wsimil.features.regions import REGIONS_DIR, region_ranges

from .test_cluster import same_bags

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")

SMALL = dict(patch=64, mpp=0.5, batch=32)  # 340-372 tissue patches per 2048² synthetic slide


@pytest.fixture(scope="module")
def slides(synth_cohort: Path) -> list[Path]:
    return sorted(synth_cohort.glob("slide_*[0-9].tiff"))[:3]


def jobs_for(slides: list[Path], out: Path, encoder: str = "handcrafted", region_patches: int = 100,
             **kw) -> list[ExtractJob]:
    s = {**SMALL, **kw}
    return [ExtractJob(p.stem, str(p), None, str(out), encoder, None, s["patch"], s["mpp"], s["batch"], "cpu", 0.5, 2,
                       False, region_patches) for p in slides]


def no_leftovers(out: Path) -> None:
    assert not (out / REGIONS_DIR).exists()
    assert not list((out / ".claims").glob("*")), list((out / ".claims").glob("*"))


class Recorder:
    """extract_task, noting each job's kind and result status (the serial engine runs it in this process)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def __call__(self, job):
        res = extract_task(job)
        self.seen.append((type(job).__name__, job.slide_id, res["status"]))
        return res


def test_region_ranges_start_on_batch_boundaries() -> None:
    assert region_ranges(372, 32, 100) == [(0, 96), (96, 192), (192, 288), (288, 372)]
    assert region_ranges(50, 32, 10) == [(0, 32), (32, 50)]  # never smaller than a batch
    assert region_ranges(0, 32, 100) == [(0, 0)]


def test_region_tasks_merge_into_the_single_process_bag(slides, reference, tmp_path) -> None:
    rec = Recorder()
    seen: list[tuple[int, int]] = []
    res = run_slides(None, rec, jobs_for(slides, tmp_path), lambda d, t, r: seen.append((d, t)))
    assert [r["status"] for r in res] == ["done"] * 3 and [r["slide_id"] for r in res] == [p.stem for p in slides]
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]  # progress counts slides, not regions
    kinds = [k for k, _, _ in rec.seen]
    assert kinds.count("ExtractJob") == 3 and kinds.count("MergeJob") == 3 and kinds.count("RegionJob") == 12
    assert all(r["n_patches"] == len(read_bag(tmp_path / f"{r['slide_id']}.npz")) for r in res)
    same_bags(reference, tmp_path, [p.stem for p in slides])
    no_leftovers(tmp_path)
    again = run_slides(None, extract_task, jobs_for(slides, tmp_path))
    assert {r["status"] for r in again} == {"skipped"}


def test_a_cnn_gives_the_same_bag_whether_split_or_not(slides, tmp_path) -> None:
    """resnet18 on regions that start at batch boundaries: the encoder sees the very batches of the single path."""
    from napari_wsimil.train.cohort import cohort_encoder

    enc = cohort_encoder("resnet18", None, "cpu", 1.0)  # the instance the tasks of this process use
    single = tmp_path / "single"
    assert [r.status for r in extract_cohort(slides[:1], single, enc, 64, 1.0, 16, device="cpu")] == ["done"]
    rec = Recorder()
    split = tmp_path / "split"
    res = run_slides(None, rec, jobs_for(slides[:1], split, "resnet18", 40, mpp=1.0, batch=16))
    assert [r["status"] for r in res] == ["done"]
    assert [k for k, _, _ in rec.seen].count("RegionJob") >= 3
    same_bags(single, split, [slides[0].stem])


def test_finished_regions_are_kept_and_a_dead_workers_region_is_redone(slides, reference, tmp_path) -> None:
    """The state a killed run leaves: two regions encoded, a third claimed by a dead process with its half-written
    temporary file, no bag. The next run encodes only the other regions and merges."""
    import socket

    job = jobs_for(slides[:1], tmp_path)[0]
    split = extract_task(job)
    assert split["status"] == "split"
    parts = split["parts"]
    for part in parts[:2]:
        assert extract_task(part)["status"] == "done"
    dead = parts[2]
    claim = tmp_path / ".claims" / f"{job.slide_id}.npz.{dead.start}-{dead.stop}.claim"
    claim.write_text(json.dumps({"pid": 2 ** 22 + 4321, "host": socket.gethostname(), "token": "gone",
                                 "since": time.time(), "lease_s": 120.0}))
    torn = tmp_path / REGIONS_DIR / job.slide_id / f".{dead.start}-{dead.stop}.npz.999.abcd1234.wsimil-tmp"
    torn.write_bytes(b"half a part")
    assert not (tmp_path / f"{job.slide_id}.npz").exists()

    rec = Recorder()
    res = run_slides(None, rec, [job])
    assert [r["status"] for r in res] == ["done"]
    regions = [s for k, _, s in rec.seen if k == "RegionJob"]
    assert regions == ["skipped", "skipped", "done", "done"]  # the two finished parts were not encoded again
    assert not torn.exists()
    same_bags(reference, tmp_path, [job.slide_id])
    no_leftovers(tmp_path)


def test_a_merge_with_a_missing_part_writes_nothing(slides, tmp_path) -> None:
    job = jobs_for(slides[:1], tmp_path)[0]
    split = extract_task(job)
    for part in split["parts"][1:]:
        assert extract_task(part)["status"] == "done"
    res = extract_task(split["merge"])
    assert res["status"] == "failed" and "missing" in res["message"]
    assert not (tmp_path / f"{job.slide_id}.npz").exists()
    assert not [p for p in tmp_path.glob(".*.npz*")]  # no temporary bag either


@pytest.mark.slow
def test_regions_on_a_cluster_with_a_worker_killed_mid_region(slides, reference, tmp_path) -> None:
    """Real worker processes share one slide's regions; the worker holding a region's claim is killed with
    SIGKILL; dask reruns that region elsewhere and the merged bags equal the single-process ones."""
    from napari_wsimil.cluster.cohorts import extract_on_cluster
    from napari_wsimil.cluster.spec import connect

    with connect("local:2") as handle:
        box: dict = {}
        t = threading.Thread(target=lambda: box.update(res=extract_on_cluster(
            handle, slides, tmp_path, "handcrafted", device="cpu", region_patches=100, **SMALL)))
        t.start()
        killed = None
        deadline = time.monotonic() + 90
        while killed is None and time.monotonic() < deadline and t.is_alive():
            claims = tmp_path / ".claims"
            for claim in claims.glob("*.npz.*-*.claim") if claims.is_dir() else []:
                try:
                    pid = int(json.loads(claim.read_text())["pid"])
                except (OSError, ValueError, KeyError):
                    continue
                os.kill(pid, signal.SIGKILL)  # the worker process, mid-region
                killed = claim.name
                break
            time.sleep(0.02)
        t.join(timeout=180)
        assert killed is not None and not t.is_alive()
        res = box["res"]
        assert [r["status"] for r in res] == ["done"] * len(slides), res
        same_bags(reference, tmp_path, [p.stem for p in slides])
        no_leftovers(tmp_path)
