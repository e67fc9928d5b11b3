"""Real federations on loopback (Flower's SuperLink, SuperNodes and their app processes, free ports):
``wsimil federate simulate`` with TLS and site keys made on the fly, what the server receives, a site killed
mid-round that rejoins, and a site whose data cannot be used."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from napari_wsimil.cli import main
from napari_wsimil.federated.launch import free_port, start, stop, stop_all

pytestmark = pytest.mark.slow
SETTINGS = ["--set", 'classes=["0","1"]', "--set", 'mil={"hidden": 16, "attn_hidden": 8}']


def _with_site_column(site_csvs: list[Path], n: int, out: Path) -> Path:
    rows = []
    for k, path in enumerate(site_csvs[:n]):
        for r in csv.DictReader(path.open()):
            r["path"] = str((path.parent / r["path"]).resolve())
            r["gt_mask"] = str((path.parent / r["gt_mask"]).resolve())
            rows.append({**r, "site": f"h{k}"})
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def test_simulate_with_tls_and_the_server_receives_only_weights_and_numbers(site_csvs, tmp_path, capfd):
    cohort = _with_site_column(site_csvs, 2, tmp_path / "cohort.csv")
    run = tmp_path / "run"
    assert main(["federate", "simulate", str(cohort), "--rounds", "1", "--out", str(run), "--round-timeout", "60",
                 *SETTINGS]) == 0
    # the sites are stopped (SIGTERM) because the federation ended: nothing may read as if a person interrupted it
    err = capfd.readouterr().err
    assert "interrupted" not in err, err[-2000:]
    info = json.loads((run / "run.json").read_text())
    assert set(info["rounds"][0]["sites"]) == {"h0", "h1"} and not info["rounds"][0]["rejected"]
    assert set(info["rounds"][0]["final_evaluation"]) == {"h0", "h1"}
    assert "TLS, registered sites only" in (run / "server.log").read_text() or (run / "keys" / "ca.pem").exists()
    model_keys = {k[6:] for k in load_file(str(run / json.loads((run / "last.json").read_text())["tensors"]))}
    messages = [json.loads(line) for line in (run / "messages.jsonl").read_text().splitlines()]
    assert {m["kind"] for m in messages} == {"train", "evaluate"} and len(messages) == 4
    for m in messages:  # every message the server received: the site's name, numbers, and the model's weights
        assert m["error"] is None
        assert set(m["records"]) <= {"arrays", "metrics", "site"}
        assert m["records"]["site"] == {"kind": "config", "keys": ["name"]}  # (a failing site adds "failed")
        assert m["records"]["metrics"]["kind"] == "metrics"
        assert all(k.startswith(("global_", "local_", "val_", "train_", "n_", "num-", "dp_"))
                   for k in m["records"]["metrics"]["keys"])
        if m["kind"] == "train":
            assert set(m["records"]["arrays"]["keys"]) == model_keys
        else:
            assert "arrays" not in m["records"]


def _wait_for(path: Path, text: str, timeout: float) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


PY = [sys.executable, "-m", "napari_wsimil.cli", "federate"]


def _server(run: Path, address: str, rounds: int, log: Path) -> subprocess.Popen:
    # round 1 starts once both sites are connected (--start-sites 2), later rounds go on with one (--min-sites 1):
    # without it, round 1 could start with whichever site connected first and never ask the other
    return start([*PY, "server", "--rounds", str(rounds), "--min-sites", "1", "--start-sites", "2", "--out", str(run),
                  "--address", address, "--round-timeout", "120", "--wait-timeout", "60", *SETTINGS],
                 {**os.environ}, log)


def _site(name: str, source: Path, address: str, workdir: Path) -> subprocess.Popen:
    return start([*PY, "site", str(source), "--server", address, "--name", name, "--workdir", str(workdir)],
                 {**os.environ}, None)


def test_a_site_killed_mid_round_is_left_out_once_flower_misses_it_and_rejoins(site_csvs, tmp_path):
    run, address = tmp_path / "run", f"127.0.0.1:{free_port()}"
    server = _server(run, address, 2, tmp_path / "server.out")
    sites = {}
    try:
        time.sleep(2)
        for name, source in (("a", site_csvs[0]), ("b", site_csvs[1])):
            sites[name] = _site(name, source, address, tmp_path / name)
        assert _wait_for(tmp_path / "b" / "site.log", "Start `flwr-clientapp` process", 90)
        # the site dies in the middle of its round-1 training: its SuperNode is killed outright, and the
        # 'wsimil federate site' process, seeing it gone, stops what Flower had started for it
        os.kill(int((tmp_path / "b" / "supernode.pid").read_text()), signal.SIGKILL)
        assert sites["b"].wait(30) != 0
        sites["b"] = _site("b", site_csvs[1], address, tmp_path / "b")  # and back
        assert server.wait(240) == 0, (tmp_path / "server.out").read_text()[-3000:]
    finally:
        stop_all([*sites.values(), server], grace=40)  # each stops its own Flower processes first
    info = json.loads((run / "run.json").read_text())
    assert [r["round"] for r in info["rounds"]] == [1, 2]
    log = (run / "server.log").read_text()
    # the killed site is left out as soon as Flower misses its heartbeats, not after the round timeout (120 s)
    assert "left the federation during the round" in log and "did not answer within" not in log
    first = info["rounds"][0]
    assert set(first["sites"]) == {"a"} and len(first["left"]) == 1 and first["silent"] == 0
    assert not first["rejected"]  # a site that is gone is not a refused update
    assert set(info["rounds"][-1]["sites"]) == {"a", "b"}  # it rejoined


def test_a_site_whose_data_cannot_be_used_is_rejected_and_the_round_goes_on(site_csvs, tmp_path):
    bad = tmp_path / "bad.csv"  # labels outside the federation's classes: the site fails with a clear reason
    rows = list(csv.DictReader(site_csvs[2].open()))
    with bad.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "path": str((site_csvs[2].parent / r["path"]).resolve()), "label": "7"} for r in rows)
    run, address = tmp_path / "run", f"127.0.0.1:{free_port()}"
    server = _server(run, address, 1, tmp_path / "server.out")
    sites = []
    try:
        time.sleep(2)
        sites = [_site(name, source, address, tmp_path / name) for name, source in (("a", site_csvs[0]), ("c", bad))]
        assert server.wait(240) == 0, (tmp_path / "server.out").read_text()[-3000:]
    finally:
        stop_all([*sites, server], grace=40)
    info = json.loads((run / "run.json").read_text())
    (row,) = info["rounds"]
    assert set(row["sites"]) == {"a"} and not row["left"]
    assert "CohortError" in row["rejected"]["c"]  # why, in a word: the details stay at the site
    log = (run / "server.log").read_text()
    assert "the update of site c is rejected" in log
    assert "label '7'" in (tmp_path / "c" / "site.log").read_text() and "label '7'" not in log


def test_the_server_killed_mid_run_resumes_from_its_last_round_and_the_sites_rejoin(site_csvs, tmp_path):
    run, address = tmp_path / "run", f"127.0.0.1:{free_port()}"
    env = {**os.environ}
    py = [sys.executable, "-m", "napari_wsimil.cli", "federate"]
    server_cmd = [*py, "server", "--rounds", "2", "--min-sites", "2", "--out", str(run), "--address", address,
                  "--round-timeout", "90", "--wait-timeout", "120", *SETTINGS]
    server = start(server_cmd, env, tmp_path / "server.out")
    sites = []
    try:
        time.sleep(2)
        for name, source in (("a", site_csvs[0]), ("b", site_csvs[1])):
            sites.append(start([*py, "site", str(source), "--server", address, "--name", name, "--workdir",
                                str(tmp_path / name)], env, None))
        assert _wait_for(run / "last.json", '"round": 1', 150)
        stop(server, grace=30)  # killed during round 2 (SIGTERM: it stops its SuperLink on the way out)
        assert [r["round"] for r in json.loads((run / "run.json").read_text())["rounds"]] == [1]
        server = start([*server_cmd, "--resume"], env, tmp_path / "server2.out")
        assert server.wait(240) == 0, (tmp_path / "server2.out").read_text()[-3000:]
    finally:
        stop_all([*sites, server], grace=40)
    info = json.loads((run / "run.json").read_text())
    assert [r["round"] for r in info["rounds"]] == [1, 2]
    assert set(info["rounds"][1]["sites"]) == {"a", "b"}  # both came back to the restarted server
    own = [json.loads(line) for line in (tmp_path / "a" / "rounds.jsonl").read_text().splitlines()]
    assert {r["round"] for r in own if r["kind"] == "train"} >= {1, 2} and all("train_loss" in r for r in own
                                                                              if r["kind"] == "train")
    assert "resuming" in (run / "server.log").read_text() or "resuming" in (tmp_path / "server2.out").read_text()
