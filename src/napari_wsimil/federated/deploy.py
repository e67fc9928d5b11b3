"""``wsimil federate server | site | simulate`` as functions: start Flower's processes, run, stop them.

The server blocks until its ServerApp has finished (``RUN/server-status.json``) and stops its SuperLink; a
site runs its SuperNode until stopped. ``simulate`` is both on one workstation: one CSV per value of a site
column, keys made on the fly, the server and each site as separate processes on loopback, with TLS and site
authentication as a real deployment would have them.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import WsimilError
from ..io.atomic import write_text
from .launch import (SUPERNODE_HEARTBEAT_S, bin_path, flower_env, free_port, register_sites, server_security,
                     split_address, start, stop, stop_all, superlink_cmd, supernode_cmd, terminated_on_signal,
                     wait_for_port, write_app, write_connection)
from .methods import load_method

Report = Callable[[str], None]
FLOWER_DIR = ".flower"
READY = "ready"
#: Seconds a site waits before starting a new SuperNode when its last one gave up on the server.
REJOIN_S = 2.0
#: Seconds a site with a key keeps trying when the server refuses to activate it. Flower refuses an
#: unregistered key and a key whose previous SuperNode still counts as connected (a site restarted right
#: after a crash: the SuperLink forgets it 2 heartbeat intervals after its last heartbeat) with the same
#: error, so the site tries for that long before it concludes that its key is not registered.
REFUSED_GRACE_S = 2 * SUPERNODE_HEARTBEAT_S + 5.0
#: What Flower's SuperNode logs when it decides to leave (the server gone, or refusing it), before its exit
#: handlers run.
LEAVING_LINE = "SuperNode terminated gracefully"
#: Seconds a SuperNode may take to exit after logging :data:`LEAVING_LINE` before the site stops it itself.
LEAVE_HANG_S = 10.0


def federation_config(method_name: str, settings: dict[str, Any], rounds: int) -> tuple[Any, dict[str, Any]]:
    """The method and its config from ``--set`` values (JSON-decoded where they parse), checked here, before
    any process starts; ``rounds`` is passed to configs that plan with it (DP-SGD)."""
    from .flower_apps import make_config

    method = load_method(method_name)
    values = dict(settings)
    if "rounds" in {f for f in getattr(method.config_cls, "__dataclass_fields__", {})}:
        values.setdefault("rounds", rounds)
    try:
        config = make_config(method, values)
    except TypeError as exc:
        raise WsimilError(f"{method_name}: {exc}") from None
    return method, asdict(config)


def serve(method_name: str, out: Path, rounds: int, min_sites: int, address: str, *, keys: str | None,
          insecure: bool, settings: dict[str, Any], resume: bool = False, round_timeout: float = 600.0,
          wait_timeout: float = 600.0, seed: int = 0, start_sites: int | None = None,
          say: Report = print) -> dict[str, Any]:
    """Run the federation's server until its rounds are done; returns ``RUN/run.json``. ``start_sites``: sites
    to wait for before the first round (default ``min_sites``)."""
    if min_sites < 1 or (start_sites is not None and start_sites < min_sites):
        raise WsimilError(f"--min-sites must be at least 1 and --start-sites at least --min-sites "
                          f"(got {min_sites} and {start_sites})")
    host, port = split_address(address)
    security = server_security(host, keys, insecure)
    _method, config = federation_config(method_name, settings, rounds)
    out = Path(out).resolve()
    if (out / "last.json").exists() and not resume:
        raise WsimilError(f"{out} already holds a federated run; add --resume to continue it or choose another --out")
    home = out / FLOWER_DIR
    home.mkdir(parents=True, exist_ok=True)
    (out / "server-status.json").unlink(missing_ok=True)
    (home / READY).unlink(missing_ok=True)
    env = flower_env(home)
    write_connection(home, f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", security)
    app = write_app(home / "app", {"method": method_name, "settings": json.dumps(config), "out": str(out),
                                   "rounds": rounds, "min-sites": min_sites, "round-timeout": float(round_timeout),
                                   "wait-timeout": float(wait_timeout), "resume": bool(resume), "seed": seed,
                                   "start-sites": int(start_sites or min_sites)})
    log = out / "server.log"
    say(f"federation server on {host}:{port} ({'TLS, registered sites only' if security.tls else 'NO TLS'}); "
        f"{method_name}, {rounds} rounds, at least {min_sites} sites -> {out} (log: {log})")
    with terminated_on_signal():
        # the SuperLink dies with this process, even one killed by SIGKILL, so its port is not left taken
        link = start(superlink_cmd(host, port, security), env, log, die_with_parent=signal.SIGTERM)
        try:
            wait_for_port(host, port, link)
            if security.auth and security.keys is not None:
                say(f"registered {register_sites(security.keys, env, log)} site key(s)")
            write_text(home / READY, str(port))  # sites may join now (simulate waits for this)
            with open(log, "ab") as sink:
                res = subprocess.run([bin_path("flwr"), "run", str(app), "--stream"], env=env, stdout=sink,
                                     stderr=subprocess.STDOUT)
            status = _status(out)
            if status is None:
                raise WsimilError(f"the federation stopped without finishing (flwr run exit {res.returncode}); "
                                  f"see {log}")
        finally:
            stop(link, grace=1.0, home=home)  # its state is in memory and done with: no long goodbye
    if not status.get("ok"):
        raise WsimilError(status.get("error", "the federation failed"))
    info = json.loads((out / "run.json").read_text())
    say(f"done: {len(info.get('rounds', []))} rounds in {out}")
    return info


def _status(out: Path) -> dict[str, Any] | None:
    path = out / "server-status.json"
    return json.loads(path.read_text()) if path.is_file() else None


def join(source: Path, server: str, *, name: str | None, workdir: Path | None, root_cert: str | None,
         key: str | None, insecure: bool, rejoin: bool = True, say: Report = print) -> int:
    """Run this site's SuperNode until it is stopped; returns its exit status.

    Flower's SuperNode gives up when the server has been gone for a while (a server restarted with
    ``--resume``); with ``rejoin`` it is started again, so a site stays in the federation until its operator
    stops it. A site the server refuses (key not registered) stops with that reason, after trying for
    :data:`REFUSED_GRACE_S` (Flower refuses a key whose previous SuperNode it still counts as connected the
    same way); a SuperNode killed by a signal ends the site."""
    source = Path(source)
    if not source.exists():
        raise WsimilError(f"{source} does not exist: give the site's project folder or cohort CSV")
    name = name or (source.name if source.is_dir() else source.stem)
    workdir = Path(workdir) if workdir else (source / "federated" if source.is_dir()
                                             else source.parent / f"federated-{name}")
    cmd = supernode_cmd(server, source, workdir, name, root_cert=root_cert, key=key, insecure=insecure)
    workdir.mkdir(parents=True, exist_ok=True)  # only once the command is known to be usable
    home = workdir / FLOWER_DIR
    home.mkdir(parents=True, exist_ok=True)
    say(f"site {name} joins {server} with {source} ({'TLS' if root_cert else 'NO TLS'}); its slides stay here; "
        f"log: {workdir / 'site.log'}")
    log = workdir / "site.log"
    refused_since: float | None = None
    with terminated_on_signal():
        while True:
            offset = log.stat().st_size if log.exists() else 0
            proc = start(cmd, flower_env(home), log, die_with_parent=signal.SIGTERM)  # no orphaned site
            write_text(workdir / "supernode.pid", str(proc.pid))
            try:
                rc = wait_supernode(proc, log, offset)
            finally:
                stop(proc, home=home)
            text = _output_since(log, offset)
            if "Exit Code: 305" in text and key is not None:
                refused_since = refused_since or time.monotonic()
                if time.monotonic() - refused_since < REFUSED_GRACE_S:
                    say(f"site {name}: the server does not accept this site's key yet (its SuperNode from before a "
                        f"restart may still count as connected for up to {2 * SUPERNODE_HEARTBEAT_S:g} s); "
                        f"trying again in {REJOIN_S:g} s")
                    time.sleep(REJOIN_S)
                    continue
            if "Exit Code: 305" in text:
                raise WsimilError(f"the server refused site {name}: its key is not registered there (or the server "
                                  "is not ready yet); ask the server's operator to add sites/<name>.pub")
            refused_since = None
            if rc < 0:
                say(f"site {name}: its SuperNode was stopped by signal {-rc} ({signal.Signals(-rc).name}); the site "
                    "ends (start it again to rejoin)")
            if not rejoin or rc < 0:
                return rc
            say(f"site {name}: the server is gone (exit {rc}); joining again in {REJOIN_S:g} s (Ctrl-C stops the "
                "site)")
            time.sleep(REJOIN_S)  # the SuperNode has already backed off while it tried to reconnect


def wait_supernode(proc: subprocess.Popen, log: Path, offset: int = 0, *, hang_s: float = LEAVE_HANG_S,
                   poll_s: float = 1.0) -> int:
    """Wait for a site's SuperNode to end; its exit status, or 0 when it hung on its way out.

    Why not ``proc.wait()``: when a restarted server no longer knows the node (HTTP 401), Flower 1.42's SuperNode
    logs :data:`LEAVING_LINE` and exits by sending itself SIGINT, which can interrupt its own exit handler (joining
    its local HTTP thread). The process then stays alive, retrying a connection nobody answers, and the site
    would never rejoin the federation (seen once in 3 fresh-clone runs of the server-resume test). So once that
    line is in the log (after ``offset``, where this SuperNode's output starts) and the process has not exited
    within ``hang_s``, it is stopped here and counted as having left (0: the caller rejoins). When that SIGINT
    does end it (the same fault, seen in a later fresh-clone run), the status is a signal's, which would end the
    site: after that line it also counts as having left. A SIGINT without the line, or any other signal, is
    returned as it is (the site ends)."""
    pos, tail, leaving_since = offset, "", None
    while True:
        try:
            rc = proc.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            pass
        else:
            return 0 if rc in SELF_SIGINT and LEAVING_LINE in _output_since(log, offset) else rc
        if leaving_since is None and log.exists():
            with open(log, "rb") as f:
                f.seek(pos)
                data = f.read()
            pos += len(data)
            chunk = data.decode(errors="replace")
            tail = (tail + chunk)[-4 * len(LEAVING_LINE):]  # the line may straddle two reads
            if LEAVING_LINE in tail:
                leaving_since = time.monotonic()
        if leaving_since is not None and time.monotonic() - leaving_since > hang_s:
            stop(proc, grace=2.0)
            return 0


#: How a process that sent itself SIGINT ends: killed by it, or Python's exit status for an unhandled one.
SELF_SIGINT = (-signal.SIGINT, 128 + signal.SIGINT)


def _output_since(log: Path, offset: int) -> str:
    """This SuperNode's output: ``log`` from ``offset`` (where it started writing); empty when there is none."""
    if not log.exists():
        return ""
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _wait_ready(marker: Path, server: subprocess.Popen, timeout: float) -> None:
    t0 = time.monotonic()
    while not marker.exists():
        if server.poll() is not None:
            raise WsimilError(f"the federation server stopped at start (exit {server.returncode})")
        if time.monotonic() - t0 > timeout:
            raise WsimilError(f"the federation server was not ready after {timeout:g} s")
        time.sleep(0.3)


def split_by_site(csv_path: Path, column: str, out: Path) -> dict[str, Path]:
    """One cohort CSV per value of ``column`` (slide paths made absolute), in ``out``."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fields = list(reader.fieldnames or [])
    if column not in fields:
        raise WsimilError(f"{csv_path.name} has no column {column!r} (its columns: {', '.join(fields)})")
    groups: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        if not r[column]:
            raise WsimilError(f"slide {r.get('slide_id', '?')} has no {column} in {csv_path.name}")
        for key in ("path", "gt_mask"):
            if r.get(key) and not os.path.isabs(r[key]):
                r[key] = str((csv_path.parent / r[key]).resolve())
        groups.setdefault(r[column], []).append(r)
    if len(groups) < 2:
        raise WsimilError(f"{csv_path.name} has one {column} only ({', '.join(groups)}): a federation needs 2 or more")
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for site, items in groups.items():
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in site)
        paths[safe] = out / f"{safe}.csv"
        with open(paths[safe], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(items)
    return paths


def simulate(csv_path: Path, column: str, method_name: str, out: Path, rounds: int, *, min_sites: int | None,
             settings: dict[str, Any], resume: bool = False, round_timeout: float = 600.0, seed: int = 0,
             secure: bool = True, say: Report = print) -> dict[str, Any]:
    """The server and one site per ``column`` value, each its own process, on loopback; returns run.json."""
    from .keys import make_keys

    out = Path(out).resolve()
    federation_config(method_name, settings, rounds)  # a bad setting fails before any process starts
    sites = split_by_site(Path(csv_path), column, out / "sites")
    keys = out / "keys"
    if secure and not (keys / "ca.pem").exists():
        make_keys(keys, list(sites))
    address = f"127.0.0.1:{free_port()}"
    py = [sys.executable, "-m", "napari_wsimil.cli", "federate"]
    server = [*py, "server", "--method", method_name, "--rounds", str(rounds), "--min-sites",
              str(min_sites or len(sites)), "--start-sites", str(max(min_sites or 0, len(sites))), "--out", str(out),
              "--address", address, "--round-timeout", str(round_timeout), "--seed", str(seed),
              *(["--resume"] if resume else []),
              *([f"--set={k}={json.dumps(v)}" for k, v in settings.items()]),
              *(["--keys", str(keys)] if secure else [])]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    say(f"simulating {len(sites)} sites ({', '.join(sites)}) on {address}")
    with terminated_on_signal():
        procs: list[subprocess.Popen] = []
        try:
            srv = start(server, env, None)
            procs.append(srv)
            _wait_ready(out / FLOWER_DIR / READY, srv, 180)
            for name, site_csv in sites.items():
                cmd = [*py, "site", str(site_csv), "--server", address, "--name", name, "--workdir",
                       str(out / "site-work" / name)]
                cmd += (["--root-cert", str(keys / "ca.pem"), "--key", str(keys / "sites" / f"{name}.key")]
                        if secure else ["--insecure"])
                procs.append(start(cmd, env, None))
            rc = srv.wait()
        finally:
            stop_all(procs[::-1])
    if rc != 0:
        raise WsimilError(f"the federation server failed (exit {rc}); see {out / 'server.log'}")
    return json.loads((out / "run.json").read_text())


__all__ = ["REFUSED_GRACE_S", "federation_config", "join", "serve", "simulate", "split_by_site"]
