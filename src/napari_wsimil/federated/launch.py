"""Flower's processes for ``wsimil federate``: the SuperLink (server), a SuperNode per site, ``flwr run``.

Why processes and not an in-Python API: Flower 1.42's deployment engine *is* these programs (a SuperLink
serving one HTTP(S) port, SuperNodes that start a ClientApp process per message); using them as shipped is
what a hospital's IT will run. The Flower app given to ``flwr run`` is a generated folder whose
``pyproject.toml`` names :mod:`.flower_apps` and carries the run's settings; Flower's own state (its
``config.toml``, installed apps) lives in ``RUN/.flower`` (``FLWR_HOME``), never in the user's home.

Security: away from loopback, TLS and site authentication are required (``--keys DIR`` from ``wsimil federate
keys``); turning them off needs ``--insecure``. Each child process gets its own process group, so stopping the
server or a site stops everything it started.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Stopped, WsimilError
from ..io.atomic import write_text
from .keys import CA, SERVER_CERT, SERVER_KEY, check_server_keys, site_public_keys

APP_NAME = "wsimil-federation"
#: A site's own record of its rounds, in its work folder (one JSON line per message it answered).
SITE_HISTORY = "rounds.jsonl"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise WsimilError(f"give the address as HOST:PORT, e.g. 127.0.0.1:9092, not {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Security:
    """TLS and site authentication of one federation: ``keys`` (a ``wsimil federate keys`` folder) or none."""

    tls: bool
    auth: bool
    keys: Path | None = None


def server_security(host: str, keys: str | None, insecure: bool) -> Security:
    """On by default away from loopback; off only with ``insecure`` (or on loopback without keys)."""
    if keys and insecure:
        raise WsimilError("--keys and --insecure contradict each other: choose one")
    if keys:
        return Security(True, True, check_server_keys(keys))
    if insecure or is_loopback(host):
        return Security(False, False)
    raise WsimilError(f"{host} is reachable from other machines: the federation needs TLS and registered sites. "
                      "Give --keys DIR (made with 'wsimil federate keys DIR --sites N'), or --insecure to send "
                      "the weights in clear text to anyone who connects")


def bin_path(name: str) -> str:
    """A Flower program, from this Python's environment first (the venv may not be on PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise WsimilError(f"Flower's {name} is not installed: pip install 'napari-wsimil[federated]'")
    return found


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    # Flower's SuperExec looks for a message to start an app process for once a second by default: every 0.5 s
    # saves ~0.25 s per message on each side (the server's and each site's). Not shorter: an idle check costs
    # CPU (measured: 0.2 s cost 2 % of a core per SuperExec, 1 s 0.5 %)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.5")
    # Flower's programs start each other by name (flower-superexec, flwr-serverapp ...): this environment's first
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [env.get("PATH")])])
    src = str(Path(__file__).resolve().parents[2])  # the apps import napari_wsimil from where this runs
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def write_app(folder: Path, settings: dict[str, Any]) -> Path:
    """The Flower app folder ``flwr run`` packs: a pyproject naming our apps and the run's settings."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    write_text(folder / "pyproject.toml", "\n".join([
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", f'name = "{APP_NAME}"', 'version = "1.0.0"', "dependencies = []", "",
        "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
        "[tool.flwr.app]", 'publisher = "wsimil"', "",
        "[tool.flwr.app.components]", 'serverapp = "napari_wsimil.federated.flower_apps:server_app"',
        'clientapp = "napari_wsimil.federated.flower_apps:client_app"', "",
        "[tool.flwr.app.config]", *lines, ""]))
    return folder


def write_connection(home: Path, address: str, security: Security) -> None:
    """``FLWR_HOME/config.toml``: the SuperLink connection ``flwr run``/``flwr supernode`` use."""
    home.mkdir(parents=True, exist_ok=True)
    conn = [f"address = {json.dumps(address)}"]
    if security.tls and security.keys is not None:
        conn.append(f"root-certificates = {json.dumps(str(security.keys / CA))}")
    else:
        conn.append("insecure = true")
    write_text(home / "config.toml", "\n".join(["[superlink]", 'default = "wsimil"', "",
                                                 "[superlink.wsimil]", *conn, ""]))


def superlink_cmd(host: str, port: int, security: Security) -> list[str]:
    cmd = [bin_path("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if security.tls and security.keys is not None:
        k = security.keys
        cmd += ["--ssl-certfile", str(k / SERVER_CERT), "--ssl-keyfile", str(k / SERVER_KEY),
                "--ssl-ca-certfile", str(k / CA)]
    else:
        cmd.append("--insecure")
    if security.auth:
        cmd.append("--enable-supernode-auth")
    return cmd


#: Seconds between a SuperNode's heartbeats as it announces them to the SuperLink: 10, the shortest Flower's
#: SuperLink accepts (Flower's SuperNode always announces 30). The SuperLink counts a SuperNode as gone when
#: it has heard nothing for 2 x this, and then answers every message waiting for that node with a "node
#: unavailable" error: the round goes on without a crashed site 16-20 s after it died instead of 40-60 s
#: (or the whole round timeout, when that is shorter). A heartbeat is one small request (~every 4 s).
SUPERNODE_HEARTBEAT_S = 10.0

#: Flower's SuperNode program with its heartbeat interval set (it is a module constant in Flower 1.42, with no
#: option): the value the SuperNode announces and the one its heartbeat thread paces itself by. Nothing else
#: changes; a Flower without these names runs as shipped (and says so in the site's log).
_SUPERNODE = (
    "import sys\n"
    "interval = float(sys.argv.pop(1))\n"
    "try:\n"
    "    import flwr.supercore.heartbeat as hb, flwr.supernode.fleet_http_connection as fc\n"
    "    if not (hasattr(hb, 'HEARTBEAT_DEFAULT_INTERVAL') and hasattr(fc, 'HEARTBEAT_DEFAULT_INTERVAL')):\n"
    "        raise ImportError('no HEARTBEAT_DEFAULT_INTERVAL')\n"
    "    hb.HEARTBEAT_DEFAULT_INTERVAL = fc.HEARTBEAT_DEFAULT_INTERVAL = interval\n"
    "except ImportError as exc:\n"
    "    print(f'wsimil: the SuperNode keeps Flower\\'s heartbeat interval ({exc})', file=sys.stderr)\n"
    "from flwr.supernode.cli import flower_supernode\n"
    "sys.argv[0] = 'flower-supernode'\n"
    "sys.exit(flower_supernode())\n")


def supernode_cmd(server: str, source: Path, workdir: Path, name: str, *, root_cert: str | None,
                  key: str | None, insecure: bool, port: int | None = None) -> list[str]:
    host, _ = split_address(server)
    if (root_cert is None) != (key is None):
        raise WsimilError("give both --root-cert (the federation's ca.pem) and --key (this site's .key), or "
                          "neither (--insecure)")
    if root_cert is None and not insecure and not is_loopback(host):
        raise WsimilError(f"the server {host} is on the network: give --root-cert CA.pem and --key SITE.key "
                          "(from 'wsimil federate keys'), or --insecure to join without TLS")
    node_config = " ".join(f"{k}={json.dumps(str(v))}" for k, v in
                           (("source", Path(source).resolve()), ("workdir", Path(workdir).resolve()),
                            ("name", name)))
    bin_path("flower-supernode")  # Flower is installed (else a clear message)
    cmd = [sys.executable, "-c", _SUPERNODE, str(SUPERNODE_HEARTBEAT_S), "--superlink", server, "--node-config",
           node_config, "--port", str(port or free_port())]
    if root_cert is not None and key is not None:
        cmd += ["--root-certificates", str(root_cert), "--auth-supernode-private-key", str(key)]
    else:
        cmd.append("--insecure")
    return cmd


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise WsimilError(f"the Flower server stopped at start (exit {proc.returncode}); see its log")
        try:
            with socket.create_connection((host if host != "0.0.0.0" else "127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise WsimilError(f"the Flower server did not open {host}:{port} within {timeout:g} s")


#: Run in a fresh interpreter between fork and the Flower program: ask Linux to send a signal when the parent
#: dies (``prctl(PR_SET_PDEATHSIG)``, kept across ``exec``), give up if the parent is already gone, then become
#: the program. A wrapper and not ``preexec_fn``, which is unsafe in a process with threads (grpc, torch).
_DIE_WITH_PARENT = (
    "import ctypes, os, sys\n"
    "ppid, sig = int(sys.argv[1]), int(sys.argv[2])\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(1, sig, 0, 0, 0) != 0: raise OSError(ctypes.get_errno(), 'prctl(PR_SET_PDEATHSIG)')\n"
    "if os.getppid() != ppid: os.kill(os.getpid(), sig)\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n")


def dying_with_parent(cmd: Sequence[str], sig: int = signal.SIGTERM) -> list[str]:
    """``cmd`` so that it gets ``sig`` when this process dies, even by SIGKILL (Linux; elsewhere unchanged).

    Why: the server's SuperLink, or a site's SuperNode, runs in its own session so that :func:`stop` can end
    all it started; a ``wsimil federate`` process killed outright runs no ``finally`` and would leave it
    holding its port (or, at a site, still answering the server)."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), str(int(sig)), *cmd]


def start(cmd: Sequence[str], env: dict[str, str], log: Path | None, *,
          die_with_parent: int | None = None) -> subprocess.Popen:
    """A child in its own process group (so that :func:`stop` reaches its own children too); with
    ``die_with_parent`` (a signal), it gets that signal when the calling process dies, however it dies.
    Call it from a thread that outlives the child: Linux sends the signal when the *thread* that started it
    ends."""
    out = open(log, "ab") if log is not None else None  # noqa: SIM115 - closed with the process
    if die_with_parent is not None:
        cmd = dying_with_parent(cmd, die_with_parent)
    try:
        return subprocess.Popen(list(cmd), env=env, stdout=out or None, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
    finally:
        if out is not None:
            out.close()


def flower_processes(home: Path) -> list[int]:
    """Processes started for ``FLWR_HOME`` = ``home`` (Flower detaches its SuperExec and app processes into
    their own sessions, so a process group does not reach them); Linux /proc only, else none."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return []
    key = f"FLWR_HOME={home}".encode()
    found = []
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if key in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop(proc: subprocess.Popen, grace: float = 5.0, home: Path | None = None) -> None:
    """SIGTERM to the child's process group, SIGKILL after ``grace`` seconds; with ``home``, also every
    process Flower started for that ``FLWR_HOME`` (its detached SuperExec and app processes)."""
    stop_all([proc], grace, home)


def stop_all(procs: Sequence[subprocess.Popen], grace: float = 5.0, home: Path | None = None) -> None:
    """:func:`stop` for several children at once: each process group gets one SIGTERM, all at the same time,
    so that their goodbyes (a site stops its SuperNode, a SuperNode leaves the SuperLink) overlap instead of
    adding up; whatever still runs ``grace`` seconds later gets SIGKILL. One SIGTERM only: a second one would
    interrupt a ``wsimil federate`` process in the middle of stopping its own Flower processes."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        try:  # anything left in the group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in flower_processes(home) if home is not None else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@contextmanager
def terminated_on_signal() -> Iterator[None]:
    """SIGTERM raises :class:`~napari_wsimil.errors.Stopped` (a KeyboardInterrupt) here, so that ``finally``
    blocks stop the children."""
    fired = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal fired
        if not fired:  # once: a second SIGTERM must not cut short the clean-up the first one started
            fired = True
            raise Stopped

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def register_sites(keys: Path, env: dict[str, str], log: Path, parallel: int = 8) -> int:
    """Register every ``sites/*.pub`` with the running SuperLink (only these may join). Each registration is a
    ``flwr`` process (~1.3 s, mostly its start-up), so up to ``parallel`` run at once."""
    pubs = site_public_keys(keys)
    if not pubs:
        raise WsimilError(f"{keys / 'sites'} holds no site keys (*.pub): add sites with 'wsimil federate keys'")
    for i in range(0, len(pubs), parallel):
        batch = [(pub, subprocess.Popen([bin_path("flwr"), "supernode", "register", str(pub), "--name", pub.stem],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                 for pub in pubs[i:i + parallel]]
        failed = None
        for pub, proc in batch:
            try:
                out, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            with open(log, "a") as f:
                f.write(out + err)
            if proc.returncode != 0 and failed is None:
                failed = (pub, err or out)
        if failed is not None:
            raise WsimilError(f"could not register site {failed[0].stem} with the server: "
                              f"{failed[1].strip().splitlines()[-1:]}")
    return len(pubs)


__all__ = ["SITE_HISTORY", "SUPERNODE_HEARTBEAT_S", "Security", "dying_with_parent", "flower_env", "free_port", "is_loopback", "register_sites",
           "server_security", "split_address", "start", "stop", "stop_all", "superlink_cmd", "supernode_cmd",
           "terminated_on_signal", "wait_for_port", "write_app", "write_connection"]
