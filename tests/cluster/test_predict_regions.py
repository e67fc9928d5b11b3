"""`wsimil predict --cluster --region-patches N`: a huge slide's bag is encoded as region tasks (the very jobs of
`wsimil features --cluster`), merged, and the slide is then predicted from it. The predictions, attention,
heatmaps and the bags themselves equal the single-process path's; a finished region is not encoded again; a
corrupt slide still goes to failures.csv; a second run predicts nothing again."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.cli import main
from napari_wsimil.cluster.runner import run_slides
from napari_wsimil.cluster.tasks import PredictJob, RegionJob, bag_job, extract_task, predict_task
from napari_wsimil.features.regions import REGIONS_DIR

from .test_cluster import same_bags

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")

# 128 px at 0.5 µm/px: 80-100 tissue patches per 2048² synthetic slide; predict extracts in batches of 64, so
# --region-patches 40 cuts each slide into regions 0:64 and 64:n
REGION_PATCHES = 40


@pytest.fixture(scope="module")
def run(abmil_run: Path) -> Path:
    return abmil_run


def new_slides(synth_cohort: Path, folder: Path, prefix: str) -> Path:
    """Two slides under new names: the run's bag store has no bags for them yet."""
    folder.mkdir()
    for i, p in enumerate(sorted(synth_cohort.glob("slide_*[0-9].tiff"))[:2]):
        (folder / f"{prefix}_{i}.tiff").symlink_to(p)
    return folder


def table(folder: Path) -> list[list[str]]:
    with open(folder / "predictions.csv", newline="") as fh:
        return [row[:-1] for row in csv.reader(fh)]  # all but the seconds column


def store_of(run: Path) -> Path:
    return run.parent / "features" / "handcrafted"


def test_predict_runs_region_tasks_then_the_model_and_resumes_finished_regions(run, synth_cohort, tmp_path) -> None:
    new = new_slides(synth_cohort, tmp_path / "new", "serial")
    ids = sorted(p.stem for p in new.iterdir())
    single = tmp_path / "single"
    assert main(["predict", str(run), "--cohort", str(new), "--out", str(single), "--device", "cpu"]) == 0
    ref = tmp_path / "ref_bags"
    ref.mkdir()
    for sid in ids:  # the single process's bags, kept aside: the region path must make them again
        shutil.move(store_of(run) / f"{sid}.npz", ref / f"{sid}.npz")

    jobs = [PredictJob(sid, str(new / f"{sid}.tiff"), str(run), str(new), str(tmp_path / "pred"), device="cpu",
                       region_patches=REGION_PATCHES) for sid in ids]
    first = bag_job(jobs[0])
    assert first is not None and Path(first.out) == store_of(run) and (first.patch, first.mpp) == (128, 0.5)
    # a killed earlier run had finished one region of the first slide: it is kept, not encoded again
    assert extract_task(RegionJob(first, 0, 64))["status"] == "done"

    seen: list[tuple[str, str, str]] = []

    def recorder(job):
        res = predict_task(job)
        seen.append((type(job).__name__, job.slide_id, res["status"]))
        return res

    res = run_slides(None, recorder, jobs)
    assert [r["status"] for r in res] == ["done", "done"] and all(r["regions"] == 2 for r in res)
    for sid in ids:
        kinds = [(k, s) for k, i, s in seen if i == sid]
        assert kinds[0] == ("PredictJob", "split") and kinds[-1] == ("PredictJob", "done")
        assert [k for k, _ in kinds[1:-1]] == ["RegionJob", "RegionJob", "MergeJob"]
    assert [s for k, i, s in seen if k == "RegionJob" and i == ids[0]] == ["skipped", "done"]
    same_bags(ref, store_of(run), ids)
    assert not (store_of(run) / REGIONS_DIR).exists()
    assert [r["row"][1:-1] for r in res] == [row[1:] for row in table(single)[1:]]


@pytest.mark.slow
def test_predict_on_a_cluster_with_region_tasks_matches_the_single_process(run, synth_cohort, tmp_path,
                                                                           capsys) -> None:
    import tifffile

    new = new_slides(synth_cohort, tmp_path / "new", "cluster")
    ids = sorted(p.stem for p in new.iterdir())
    single, clustered = tmp_path / "single", tmp_path / "cluster"
    assert main(["predict", str(run), "--cohort", str(new), "--out", str(single), "--device", "cpu"]) == 0
    ref = tmp_path / "ref_bags"
    ref.mkdir()
    for sid in ids:
        shutil.move(store_of(run) / f"{sid}.npz", ref / f"{sid}.npz")
    (new / "broken.svs").write_bytes(b"II*\x00" + bytes(range(256)) * 8)  # a truncated, corrupt scan
    capsys.readouterr()

    args = ["predict", str(run), "--cohort", str(new), "--out", str(clustered), "--device", "cpu",
            "--cluster", "local:2", "--region-patches", str(REGION_PATCHES)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("as 2 region tasks") == 2 and "1 slides could not be predicted" in err, err
    assert table(single) == table(clustered)
    with open(clustered / "failures.csv", newline="") as fh:
        assert [f["slide_id"] for f in csv.DictReader(fh)] == ["broken"]
    for sid in ids:
        assert np.array_equal(tifffile.imread(single / "heatmaps" / f"{sid}.tif"),
                              tifffile.imread(clustered / "heatmaps" / f"{sid}.tif"))
        with np.load(single / "attention" / f"{sid}.npz") as x, np.load(clustered / "attention" / f"{sid}.npz") as y:
            assert all(np.array_equal(x[k], y[k]) for k in x.files)
    same_bags(ref, store_of(run), ids)
    assert not (store_of(run) / REGIONS_DIR).exists() and not list((store_of(run) / ".claims").glob("*"))
    assert not list(clustered.glob(".parts/*")) and not list(clustered.glob(".claims/*"))

    # again, as after a killed client: nothing is predicted or encoded again
    stamps = {p: p.stat().st_mtime_ns for p in [*clustered.glob(".done/*"), *store_of(run).glob("cluster_*.npz")]}
    assert len(stamps) == 4
    assert main(args) == 1
    assert "region tasks" not in capsys.readouterr().err
    assert all(p.stat().st_mtime_ns == m for p, m in stamps.items())
    assert table(single) == table(clustered)


def test_a_region_that_cannot_be_decoded_fails_its_slide_alone(run, synth_cohort, tmp_path) -> None:
    """A slide whose full-resolution tiles are noise tiles fine (tissue is found on a lower level) but its regions
    cannot be decoded: it is in failures.csv with the reason, the other slide is predicted."""
    from napari_wsimil.cluster.cohorts import predict_on_cluster

    from .test_plain_failures import corrupt_tiles

    new = new_slides(synth_cohort, tmp_path / "new", "bad")
    source = sorted(synth_cohort.glob("slide_*[0-9].tiff"))[2]
    (new / "bad_1.tiff").unlink()
    corrupt_tiles(source)(new / "bad_1.tiff")
    pred = tmp_path / "pred"
    res = predict_on_cluster(None, run, new, pred, device="cpu", region_patches=REGION_PATCHES)
    assert {r["slide_id"]: r["status"] for r in res} == {"bad_0": "done", "bad_1": "failed"}
    assert all(r["regions"] == 2 for r in res)  # both were split; bad_1 failed in its regions, not before
    with open(pred / "failures.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide_id"] for r in rows] == ["bad_1"] and rows[0]["reason"], rows
    assert [row[0] for row in table(pred)[1:]] == ["bad_0"]
    assert not (store_of(run) / "bad_1.npz").exists() and (store_of(run) / "bad_0.npz").exists()
