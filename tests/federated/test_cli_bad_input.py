"""``wsimil federate`` refuses bad input with one line and exit status 2, before any process starts or any
file is written."""

from __future__ import annotations

import csv

import pytest

from napari_wsimil.cli import main


@pytest.mark.parametrize("args, words", [
    (["--method", "fedprox"], "no federated method"),
    (["--address", "0.0.0.0:9999"], "--keys DIR"),
    (["--set", "alpha=-1"], "alpha must be"),
    (["--set", "bogus=1"], "no option(s) bogus"),
    (["--set", "mil_method=ms-clam"], "'abmil' or 'clam-sb'"),
    (["--keys", "nowhere"], "lacks ca.pem"),
])
def test_server_refuses_bad_settings_without_writing(tmp_path, capsys, args, words):
    out = tmp_path / "run"
    assert main(["federate", "server", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_keys_and_simulate_refuse_what_they_cannot_use(tmp_path, capsys):
    assert main(["federate", "keys", str(tmp_path / "k"), "--names", "lyon,turin"]) == 0
    assert sorted(p.name for p in (tmp_path / "k" / "sites").iterdir()) == ["lyon.key", "lyon.pub", "turin.key",
                                                                         "turin.pub"]
    assert (tmp_path / "k" / "sites" / "lyon.key").stat().st_mode & 0o077 == 0  # private keys: owner only
    assert main(["federate", "keys", str(tmp_path / "k"), "--sites", "2"]) == 2
    assert "already holds a CA" in capsys.readouterr().err
    cohort = tmp_path / "c.csv"
    with cohort.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "path", "label", "hospital"])
        w.writerow(["s1", "s1.tiff", "0", "lyon"])
    assert main(["federate", "simulate", str(cohort), "--out", str(tmp_path / "run")]) == 2
    assert "no column 'site'" in capsys.readouterr().err
    assert main(["federate", "simulate", str(cohort), "--site-column", "hospital", "--out",
                 str(tmp_path / "run")]) == 2
    assert "a federation needs 2 or more" in capsys.readouterr().err
    assert main(["federate", "site", str(tmp_path / "missing.csv"), "--server", "10.0.0.1:9092"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["federate", "site", str(cohort), "--server", "10.0.0.1:9092"]) == 2
    assert "--root-cert" in capsys.readouterr().err
    assert not (tmp_path / "federated-c").exists()
