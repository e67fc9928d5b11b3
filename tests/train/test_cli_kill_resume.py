"""``wsimil train`` killed with SIGKILL mid-training, then ``--resume``: at most the epoch in flight is lost.

The first run is a real ``python -m napari_wsimil.cli train`` subprocess in its own process group. The
CLI prints an ``epoch N/TOTAL`` line only after the engine has committed that epoch's checkpoint
(``ckpt-NNNN.safetensors`` then ``last.json``), so once the ``epoch 3/40`` line is read the kill is certain
to land after epoch 3 was saved; wherever it lands, the resumed run must continue at ``last.json``'s
epoch + 1. Epochs take ~0.1 s on this tiny cohort and there are 37 more to go, so the kill always
lands mid-training (asserted: the killed run's ``last.json`` is not finished).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from napari_wsimil.cli import main as wsimil_main

EPOCHS = 40
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)\s")
TIMEOUT = 120.0  # seconds for any one subprocess; far above the ~10 s they take


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_wsimil.slide.synthetic import synthesize_cohort

    # 1024 px at 0.5 µm/px → 5–9 tissue patches of 128 px at 1 µm/px per slide: extraction takes ~2 s
    return synthesize_cohort(tmp_path_factory.mktemp("cohort"), 8, seed=0, size=1024, workers=2)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _train_argv(cohort: Path, run: Path, *extra: str) -> list[str]:
    return ["train", str(cohort), "--method", "clam-sb", "--out", str(run), "--epochs", str(EPOCHS),
            "--seed", "0", "--patch", "128", "--mpp", "1.0", "--device", "cpu", *extra]


def _start(argv: list[str]) -> subprocess.Popen[str]:
    """``wsimil ARGV`` in its own process group, stdout and stderr merged into one text pipe."""
    return subprocess.Popen([sys.executable, "-m", "napari_wsimil.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
                            env=_env(), start_new_session=True)


def _line_reader(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """A thread moving the child's output lines to a queue (None at EOF), so reads can time out."""
    q: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            q.put(line.rstrip("\n"))
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _kill_group(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not get ignored
        pass


def _epochs(lines: list[str]) -> list[int]:
    out = []
    for line in lines:
        m = EPOCH_LINE.match(line)
        if m:
            assert int(m.group(2)) == EPOCHS, line
            out.append(int(m.group(1)))
    return out


def _check_checkpoint(run: Path) -> dict:
    """last.json parses, names a tensor file that exists and loads, for the epoch it claims."""
    state = json.loads((run / "last.json").read_text())
    ckpt = run / state["tensors"]
    assert ckpt.is_file(), f"last.json names {ckpt.name}, which is missing"
    assert ckpt.name == f"ckpt-{state['epoch']:04d}.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        assert f.metadata()["epoch"] == str(state["epoch"])
        keys = list(f.keys())
        assert any(k.startswith("model.") for k in keys) and any(k.startswith("optim.") for k in keys)
        for k in keys:
            f.get_tensor(k)  # every tensor is readable: the file is complete
    with safe_open(str(run / "best.safetensors"), framework="pt") as f:
        assert int(f.metadata()["epoch"]) <= state["epoch"]
        assert list(f.keys())
    return state


def test_kill_9_then_resume_loses_at_most_one_epoch(cohort: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run, pred = tmp_path / "run", tmp_path / "pred"

    # ---- first run: SIGKILL as soon as epoch 3 is reported (i.e. committed) ----
    first = _start(_train_argv(cohort, run))
    seen: list[str] = []
    try:
        lines = _line_reader(first)
        deadline = time.monotonic() + TIMEOUT
        while True:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "train exited before epoch 3:\n" + "\n".join(seen)
            seen.append(line)
            m = EPOCH_LINE.match(line)
            if m and int(m.group(1)) >= 3:
                break
        os.killpg(first.pid, signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
        while (line := lines.get(timeout=10)) is not None:  # what it printed before dying
            seen.append(line)
    except queue.Empty:
        pytest.fail("train printed nothing for too long:\n" + "\n".join(seen))
    finally:
        _kill_group(first)

    printed = _epochs(seen)
    assert printed == list(range(1, len(printed) + 1)) and printed[-1] >= 3, seen
    state = _check_checkpoint(run)
    e = state["epoch"]
    # every printed epoch was committed; the kill lost at most the epoch that was in flight
    assert printed[-1] <= e < EPOCHS, (printed, e)
    assert state["stopped"] is None, "the first run finished before the kill: nothing was tested"
    assert (run / "run.json").is_file()

    # ---- the same command without --resume is refused and touches nothing ----
    before = (run / "last.json").read_bytes()
    capsys.readouterr()
    assert wsimil_main(_train_argv(cohort, run)) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "already holds a training run" in err, err
    assert (run / "last.json").read_bytes() == before

    # ---- --resume: continues at E+1, runs to the end ----
    second = _start(_train_argv(cohort, run, "--resume"))
    try:
        out, _ = second.communicate(timeout=TIMEOUT)
    finally:
        _kill_group(second)
    assert second.returncode == 0, out
    resumed = _epochs(out.splitlines())
    assert resumed == list(range(e + 1, EPOCHS + 1)), f"expected epochs {e + 1}..{EPOCHS}:\n{out}"
    assert f"done after epoch {EPOCHS} (finished)" in out, out
    final = _check_checkpoint(run)
    assert final["epoch"] == EPOCHS and final["stopped"] == "finished"
    assert sorted(p.name for p in run.glob("ckpt-*.safetensors")) == [f"ckpt-{EPOCHS:04d}.safetensors"]

    # ---- the resumed run predicts ----
    capsys.readouterr()
    assert wsimil_main(["predict", str(run), "--cohort", str(cohort), "--out", str(pred), "--device", "cpu",
                        "--no-heatmaps"]) == 0
    rows = (pred / "predictions.csv").read_text().splitlines()
    assert rows[0] == "slide_id,prob_0,prob_1,patches_encoded,seconds" and len(rows) == 1 + 8
    for row in rows[1:]:
        p0, p1 = map(float, row.split(",")[1:3])
        assert p0 + p1 == pytest.approx(1.0, abs=1e-6)
