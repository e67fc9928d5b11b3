"""TLS and site authentication with Flower's real SuperLink and SuperNodes on free loopback ports: a registered
site joins, an unregistered key is refused, a plain-text site never gets in; and the rules for turning them off."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from napari_wsimil.errors import WsimilError
from napari_wsimil.federated.keys import make_keys
from napari_wsimil.federated.launch import (flower_env, free_port, register_sites, server_security, start, stop,
                                            superlink_cmd, supernode_cmd, wait_for_port, write_connection)


@pytest.fixture(scope="module")
def secure_link(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("secure")
    keys = make_keys(root / "keys", ["good", "stranger"])
    stranger = root / "stranger.key"
    (keys / "sites" / "stranger.key").rename(stranger)
    (keys / "sites" / "stranger.pub").unlink()  # a key the server never registered
    port = free_port()
    security = server_security("127.0.0.1", str(keys), insecure=False)
    assert security.tls and security.auth
    home = root / "home"
    env = flower_env(home)
    write_connection(home, f"127.0.0.1:{port}", security)
    link = start(superlink_cmd("127.0.0.1", port, security), env, root / "link.log")
    try:
        wait_for_port("127.0.0.1", port, link)
        assert register_sites(keys, env, root / "link.log") == 1
        yield {"root": root, "keys": keys, "stranger": stranger, "address": f"127.0.0.1:{port}", "env": env}
    finally:
        stop(link)


def _node(link: dict, name: str, *, key: Path | None, insecure: bool = False) -> list[str]:
    root_cert = None if insecure else str(link["keys"] / "ca.pem")
    return supernode_cmd(link["address"], link["root"], link["root"] / name, name, root_cert=root_cert,
                         key=None if insecure else str(key), insecure=insecure) + ["--max-retries", "2",
                                                                                   "--max-wait-time", "15"]


def _joined(log: Path, proc: subprocess.Popen, timeout: float) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        if log.exists() and "SuperNode ID" in log.read_text(errors="replace"):
            return True
        time.sleep(0.3)
    return log.exists() and "SuperNode ID" in log.read_text(errors="replace")


def test_a_registered_site_joins(secure_link):
    log = secure_link["root"] / "good.log"
    proc = start(_node(secure_link, "good", key=secure_link["keys"] / "sites" / "good.key"), secure_link["env"], log)
    try:
        assert _joined(log, proc, 40), log.read_text(errors="replace")[-2000:]
    finally:
        stop(proc)


def test_an_unregistered_site_is_refused(secure_link):
    log = secure_link["root"] / "stranger.log"
    proc = start(_node(secure_link, "stranger", key=secure_link["stranger"]), secure_link["env"], log)
    try:
        rc = proc.wait(45)
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    assert rc != 0 and "SuperNode ID" not in text
    assert "305" in text or "Failed to activate" in text


def test_a_plain_text_site_is_refused(secure_link):
    log = secure_link["root"] / "plain.log"
    proc = start(_node(secure_link, "plain", key=None, insecure=True), secure_link["env"], log)
    try:
        joined = _joined(log, proc, 25)
    finally:
        stop(proc)
    assert not joined and "Connection attempt failed" in log.read_text(errors="replace")


def test_security_is_required_away_from_loopback(tmp_path):
    with pytest.raises(WsimilError, match="--keys DIR"):
        server_security("0.0.0.0", None, insecure=False)
    assert not server_security("0.0.0.0", None, insecure=True).tls  # only when asked for explicitly
    assert not server_security("127.0.0.1", None, insecure=False).tls
    with pytest.raises(WsimilError, match="--root-cert"):
        supernode_cmd("10.1.2.3:9092", tmp_path, tmp_path, "x", root_cert=None, key=None, insecure=False)
    assert "--insecure" in supernode_cmd("10.1.2.3:9092", tmp_path, tmp_path, "x", root_cert=None, key=None,
                                         insecure=True)
    with pytest.raises(WsimilError, match="already holds a CA"):
        make_keys(tmp_path / "k", ["a"]) and make_keys(tmp_path / "k", ["a"])


def test_a_registered_site_restarted_right_after_a_crash_joins_again(secure_link, tmp_path):
    """A site whose SuperNode dies and that is started again at once: Flower still counts its key's previous
    SuperNode as connected (until 2 heartbeat intervals have passed) and refuses to activate the key, with the
    error an unregistered key gets. The site tries again until Flower lets go, and joins."""
    import os
    import signal
    import sys

    work, source = tmp_path / "good", tmp_path / "cohort.csv"
    source.write_text("slide_id,path,label\n")  # no message comes: the site never reads it
    cmd = [sys.executable, "-m", "napari_wsimil.cli", "federate", "site", str(source), "--server",
           secure_link["address"], "--name", "good", "--workdir", str(work), "--root-cert",
           str(secure_link["keys"] / "ca.pem"), "--key", str(secure_link["keys"] / "sites" / "good.key")]
    first = start(cmd, dict(os.environ), tmp_path / "first.out")
    try:
        assert _joined(work / "site.log", first, 60), (tmp_path / "first.out").read_text()[-2000:]
        os.kill(int((work / "supernode.pid").read_text()), signal.SIGKILL)  # the crash
        assert first.wait(30) != 0
    finally:
        stop(first)
    offset = (work / "site.log").stat().st_size
    again = start(cmd, dict(os.environ), tmp_path / "again.out")
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60 and again.poll() is None:
            if "SuperNode ID" in (work / "site.log").read_text(errors="replace")[offset:]:
                break
            time.sleep(0.3)
        out = (tmp_path / "again.out").read_text(errors="replace")
        assert "SuperNode ID" in (work / "site.log").read_text(errors="replace")[offset:], out[-2000:]
        assert "does not accept this site's key yet" in out  # it was refused first, then let in
    finally:
        stop(again, home=work / ".flower")
