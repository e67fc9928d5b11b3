"""The YAML (dask-jobqueue) path of ``--cluster``: a real run through dask-jobqueue's ``local`` cluster (its jobs are
subprocesses running the generated job script), the SLURM job script a spec renders (nothing submitted), the GPU
pinning of multi-GPU jobs, and one-line errors for bad spec files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.cli import main
from napari_wsimil.cluster.gpu_pin import pick_gpu
from napari_wsimil.cluster.spec import ClusterError, jobqueue_cluster

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")


def spec(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def script(path: Path) -> tuple[str, str, int, int]:
    cluster, kind, jobs, gpus = jobqueue_cluster(path)
    try:
        tick = cluster.scheduler.periodic_callbacks["tick"].callback_time
        assert tick == 1000  # the scheduler (in this process) is as calm as its workers
        return cluster.job_script(), kind, jobs, gpus
    finally:
        cluster.close()


def test_a_slurm_gpu_spec_renders_the_expected_job_script(tmp_path: Path) -> None:
    text, kind, jobs, gpus = script(spec(tmp_path, """
jobqueue: slurm
jobs: 16
cores: 8
processes: 2
memory: 32GB
gpus: 2
walltime: "04:00:00"
queue: gpu
"""))
    assert (kind, jobs, gpus) == ("slurm", 16, 2)
    directives = [ln.removeprefix("#SBATCH ") for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert {"-p gpu", "--cpus-per-task=8", "-t 04:00:00", "--gres=gpu:2"} <= set(directives), text
    assert any(re.fullmatch(r"--mem=\d+G", d) for d in directives), text
    command = text.strip().splitlines()[-1]
    assert "distributed.cli.dask_worker" in command and "--nworkers 2" in command
    assert "--nthreads 4" in command  # 8 cores over 2 worker processes
    assert "--resources GPU=1" in command  # each process one of the job's 2 GPUs
    assert "--preload napari_wsimil.cluster.gpu_pin" in command  # ... pinned by CUDA_VISIBLE_DEVICES
    assert "--gres" not in command
    # the workers get the settings --cluster local uses (calmer periodic callbacks, no profiler), before the command
    exports = [ln for ln in text.splitlines() if ln.startswith("export DASK_")]
    assert {"export DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=1s", "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False",
            "export DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL=1s"} <= set(exports), text
    assert text.index("export DASK_") < text.index("distributed.cli.dask_worker")

    # one GPU per job, one process: no preload (SLURM's CUDA_VISIBLE_DEVICES is the job's one GPU); a gres the
    # user wrote (a GPU type) is kept, not doubled
    text, *_ = script(spec(tmp_path, """
jobqueue: slurm
cores: 4
memory: 16GB
gpus: 1
job_extra_directives: ["--gres=gpu:a100:1"]
"""))
    assert text.count("--gres") == 1 and "#SBATCH --gres=gpu:a100:1" in text
    assert "--resources GPU=1" in text and "gpu_pin" not in text and "--nworkers" not in text, text

    text, *_ = script(spec(tmp_path, "jobqueue: slurm\ncores: 4\nmemory: 16GB\n"))  # a CPU-only job
    assert "gres" not in text and "--resources" not in text


def test_each_worker_process_of_a_multi_gpu_job_gets_its_own_gpu() -> None:
    assert pick_gpu("SLURMCluster-3-0", "4,5,6,7") == "4"
    assert pick_gpu("SLURMCluster-3-2", "4,5,6,7") == "6"
    assert pick_gpu("SLURMCluster-3-1", None) == "1"
    assert pick_gpu("worker", "0,1") is None
    # the preload in a real worker process: dask worker --nworkers 2 --preload, as the job script runs it, with the
    # job script's exported dask settings
    from napari_wsimil.cluster.spec import worker_config_exports

    exported = dict(line.removeprefix("export ").split("=", 1) for line in worker_config_exports())
    code = ("import os, sys\nfrom distributed import LocalCluster, Client\n"
            "with LocalCluster(n_workers=0, scheduler_port=0, dashboard_address=None) as c, Client(c) as cl:\n"
            "    import subprocess\n"
            "    p = subprocess.Popen([sys.executable, '-m', 'distributed.cli.dask_worker', c.scheduler_address,\n"
            "        '--name', 'job-7', '--nworkers', '2', '--nthreads', '1', '--preload',\n"
            "        'napari_wsimil.cluster.gpu_pin'], env={**os.environ, **EXPORTED, 'CUDA_VISIBLE_DEVICES': '2,3'},\n"
            "        stderr=subprocess.DEVNULL)\n"
            "    try:\n"
            "        cl.wait_for_workers(2, timeout=60)\n"
            "        seen = cl.run(lambda dask_worker: (dask_worker.name, os.environ['CUDA_VISIBLE_DEVICES'],\n"
            "            dask_worker.periodic_callbacks['tick'].callback_time,\n"
            "            dask_worker.periodic_callbacks['memory_monitor'].callback_time))\n"
            "        print(sorted(seen.values()))\n"
            "    finally:\n"
            "        p.kill(); p.wait()\n")
    code = code.replace("EXPORTED", repr(exported))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[('job-7-0', '2', 1000, 1000), ('job-7-1', '3', 1000, 1000)]", out.stdout


@pytest.mark.parametrize("text, words", [
    ("jobqueue: torque\ncores: 1\nmemory: 1GB\n", ["'torque' is not one of", "slurm", "local"]),
    ("jobqueue: slurm\njobs: 2\n", ["missing cores, memory"]),
    ("cores: 1\nmemory: 1GB\n", ["missing jobqueue"]),
    ("jobqueue: slurm\ncores: 1\nmemory: 1GB\njobs: 0\n", ["jobs must be a whole number ≥ 1"]),
    ("jobqueue: slurm\ncores: 4\nmemory: 1GB\nprocesses: 2\ngpus: 3\n", ["gpus (3) must be a multiple"]),
    ("jobqueue: slurm\ncores: 1\nmemory: 1GB\ngpu_count: 2\n", ["'gpu_count' is not an option of a slurm"]),
    ("jobqueue: [slurm\n", ["cannot read the cluster file"]),
    ("- slurm\n", ["should be a mapping"]),
])
def test_a_bad_spec_file_is_one_line_and_exit_2(tmp_path: Path, capsys, text: str, words: list[str]) -> None:
    path = spec(tmp_path, text)
    with pytest.raises(ClusterError) as err:
        jobqueue_cluster(path)
    assert all(w in str(err.value) for w in words), str(err.value)
    out = tmp_path / "bags"
    assert main(["features", str(path), "--out", str(out), "--cluster", str(path)]) == 2
    msg = capsys.readouterr().err.strip()
    assert len(msg.splitlines()) == 1 and msg.startswith("wsimil features: error: ") and str(path) in msg, msg
    assert not out.exists()


@pytest.mark.slow
def test_features_on_a_local_jobqueue_cluster_write_the_single_process_bags(synth_cohort, tmp_path) -> None:
    """`wsimil features --cluster FILE.yaml` with `jobqueue: local`: two jobs started by dask-jobqueue from its job
    script, as SLURM would start them, and the bags of the single-process path."""
    from napari_wsimil.features import read_bag

    slides = sorted(map(str, synth_cohort.glob("slide_*[0-9].tiff")))[:4]
    yaml = spec(tmp_path, "jobqueue: local\njobs: 2\ncores: 1\nmemory: 2GB\nprocesses: 1\n")
    args = ["--out", "X", "--patch", "64", "--mpp", "1", "--batch", "32", "--device", "cpu"]
    split = ["--region-patches", "40"]  # 86-100 patches a slide: 3 or 4 region tasks each, over the two jobs
    single, clustered = tmp_path / "single", tmp_path / "cluster"
    assert main(["features", *slides, *[str(single) if a == "X" else a for a in args]]) == 0
    r = subprocess.run([sys.executable, "-m", "napari_wsimil.cli", "features", *slides,
                        *[str(clustered) if a == "X" else a for a in args], *split, "--cluster", str(yaml)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cluster local:2 jobs" in r.stderr and f"{len(slides)} computed" in r.stderr, r.stderr[-3000:]
    assert len(re.findall(r"done in [\d.]+ s as [34] region tasks", r.stderr)) == len(slides), r.stderr[-3000:]
    for s in slides:
        a, b = read_bag(single / f"{Path(s).stem}.npz"), read_bag(clustered / f"{Path(s).stem}.npz")
        assert np.array_equal(a.coords, b.coords) and np.array_equal(a.features, b.features) and a.attrs == b.attrs
    assert not list((clustered / ".claims").glob("*"))
