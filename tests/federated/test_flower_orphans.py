"""A ``wsimil federate`` process killed outright (SIGKILL: no ``finally`` runs) takes Flower's processes with it:
the server's SuperLink frees its port, a site's SuperNode stops answering. Real processes on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from napari_wsimil.federated.launch import flower_processes, free_port, start, stop

pytestmark = pytest.mark.slow
PY = [sys.executable, "-m", "napari_wsimil.cli", "federate"]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped by its parent) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return True


def _until(check, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")
def test_a_server_killed_with_sigkill_frees_its_port(tmp_path: Path) -> None:
    run, port = tmp_path / "run", free_port()
    server = start([*PY, "server", "--rounds", "1", "--min-sites", "1", "--out", str(run), "--address",
                    f"127.0.0.1:{port}", "--wait-timeout", "120"], dict(os.environ), tmp_path / "server.out")
    home = run / ".flower"
    try:
        assert _until(lambda: (home / "ready").exists(), 90) is not None, (tmp_path / "server.out").read_text()
        assert not _port_free(port) and flower_processes(home)  # the SuperLink (and its SuperExec) run
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        freed = _until(lambda: _port_free(port), 10)
        assert freed is not None, "the SuperLink still holds the port 10 s after its server was killed"
        print(f"port free {freed:.1f} s after the server's SIGKILL")
        assert _until(lambda: not [p for p in flower_processes(home) if _alive(p)], 20) is not None
    finally:
        stop(server, home=home)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")
def test_a_site_killed_with_sigkill_takes_its_supernode_along(site_csvs: list[Path], tmp_path: Path) -> None:
    work = tmp_path / "site"  # no server listens: the SuperNode keeps trying to connect until it is stopped
    site = start([*PY, "site", str(site_csvs[0]), "--server", f"127.0.0.1:{free_port()}", "--insecure",
                  "--workdir", str(work)], dict(os.environ), tmp_path / "site.out")
    try:
        assert _until(lambda: (work / "supernode.pid").exists(), 60) is not None, (tmp_path / "site.out").read_text()
        node = int((work / "supernode.pid").read_text())
        assert _until(lambda: _alive(node), 5) is not None
        time.sleep(1)
        os.kill(site.pid, signal.SIGKILL)
        site.wait(10)
        assert _until(lambda: not _alive(node), 20) is not None, "the SuperNode outlived its site process"
        assert _until(lambda: not [p for p in flower_processes(work / ".flower") if _alive(p)], 20) is not None
    finally:
        stop(site, home=work / ".flower")
