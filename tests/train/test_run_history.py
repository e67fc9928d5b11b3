"""A run's saved loss history and run.json, read without Qt (what the Training widget's runs list shows)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from napari_wsimil.errors import WsimilError
from napari_wsimil.mil import build
from napari_wsimil.train import train
from napari_wsimil.workflow.session import InteractiveSession, loss_history, train_loss, val_loss

from .conftest import make_bags, run_all, small_config


def test_history_is_committed_per_epoch_and_survives_a_resume(tmp_path):
    data, val = make_bags(n_bags=10), make_bags(n_bags=6, seed=1)
    cfg = lambda: small_config("clam-sb", epochs=3)  # noqa: E731
    events, _ = run_all(train(build("clam-sb", data, val, cfg()), tmp_path / "full"))
    full = loss_history(tmp_path / "full")
    live_train = [(e.epoch, train_loss(e.losses)) for e in events if e.kind == "epoch"]
    live_val = [(e.epoch, val_loss(e.losses)) for e in events if e.kind == "validation"]
    assert full == {"train": live_train, "val": live_val}  # exactly what the live plot showed
    assert [e for e, _ in full["train"]] == [1, 2, 3]

    gen = train(build("clam-sb", data, val, cfg()), tmp_path / "killed")
    for ev in gen:
        if ev.kind == "checkpoint" and ev.epoch == 2:
            break  # killed after epoch 2 was committed
    gen.close()
    assert [e for e, _ in loss_history(tmp_path / "killed")["train"]] == [1, 2]
    run_all(train(build("clam-sb", data, val, cfg()), tmp_path / "killed", resume=True))
    assert loss_history(tmp_path / "killed") == full

    state = json.loads((tmp_path / "full" / "last.json").read_text())
    assert [row["epoch"] for row in state["history"]] == [1, 2, 3]
    first = state["history"][0]
    assert {"total", "bag"} <= set(first["losses"]) and "bag" in first["val_losses"]


def test_history_without_validation_and_of_old_runs(tmp_path):
    run_all(train(build("abmil", make_bags(n_bags=6), None, small_config("abmil", epochs=2)), tmp_path / "r"))
    h = loss_history(tmp_path / "r")
    assert [e for e, _ in h["train"]] == [1, 2] and h["val"] == []
    state = json.loads((tmp_path / "r" / "last.json").read_text())
    del state["history"]  # a run written before the history was kept
    (tmp_path / "r" / "last.json").write_text(json.dumps(state))
    assert loss_history(tmp_path / "r") == {"train": [], "val": []}
    assert loss_history(tmp_path / "nowhere") == {"train": [], "val": []}


def test_session_accessors_read_the_run_folder(tmp_path):
    api = InteractiveSession(SimpleNamespace(root=tmp_path))  # only the project's folder is used here
    assert api.next_run_name("clam-sb") == "clam-sb-1"
    run = api.run_dir("clam-sb-1")
    run_all(train(build("abmil", make_bags(n_bags=6), None, small_config("abmil", epochs=2)), run))
    (run / "run.json").write_text(json.dumps({"method": "abmil", "patch": 128, "mpp": 1.0}))
    assert api.next_run_name("clam-sb") == "clam-sb-2"
    assert api.run_info("clam-sb-1")["patch"] == 128
    assert [e for e, _ in api.loss_history("clam-sb-1")["train"]] == [1, 2]
    with pytest.raises(WsimilError, match="cannot be read"):
        api.run_info("missing")
