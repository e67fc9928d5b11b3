"""Per-item claim files, so that two processes (or two machines, or two dask clients) never do one slide twice.

A claim is a small JSON file created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFSv3+),
holding who made it: pid, host, a random token and a lease. While the owner works, a heartbeat thread touches the
file, so its modification time says the owner is alive. A claim is *stale*, and may be taken over, when

- its owner ran on this host and that pid is gone (a worker killed with ``kill -9``: no wait at all), or
- its modification time is older than the lease (an owner on another machine that died; hosts' clocks must
  roughly agree, which a shared file system needs anyway).

Taking over renames the stale file to a unique name first (``os.rename`` succeeds for one contender only) and
checks it renamed the stale claim it read, so two processes that find the same stale claim still end with one
owner. An advisory ``flock`` would be simpler but is unreliable across machines on network file systems, which is
where many workers share one project.

This lives in ``io/`` (the storage layer) because both the single-process extraction (``features/``) and the
cluster tasks (``cluster/``) take claims.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CLAIMS_DIR = ".claims"
CLAIM_SUFFIX = ".claim"
#: seconds without a heartbeat after which another host's claim counts as abandoned
DEFAULT_LEASE_S = 120.0


@dataclass(frozen=True)
class ClaimOwner:
    """Who holds a claim, as written into its file."""

    pid: int
    host: str
    token: str
    since: float
    lease_s: float

    def describe(self) -> str:
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"pid {self.pid}{where} since {time.strftime('%H:%M:%S', time.localtime(self.since))}"


def claim_path(folder: str | os.PathLike[str], key: str) -> Path:
    """Where the claim on ``key`` (a slide id) lives: ``folder/.claims/<key>.claim``."""
    return Path(folder) / CLAIMS_DIR / f"{key}{CLAIM_SUFFIX}"


def read_owner(path: Path) -> ClaimOwner | None:
    """The owner written in a claim file; None when it is gone, or unreadable (being written, or torn)."""
    try:
        d = json.loads(path.read_text())
        return ClaimOwner(int(d["pid"]), str(d["host"]), str(d["token"]), float(d["since"]), float(d["lease_s"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def is_stale(path: Path, owner: ClaimOwner | None, now: float | None = None) -> bool:
    """Whether the claim at ``path`` (written by ``owner``) was abandoned: see the module docstring. A claim whose
    content cannot be read yet is stale only once it is older than the default lease (its writer may be
    between creating and filling it)."""
    now = time.time() if now is None else now
    try:
        age = now - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if owner is None:
        return age > DEFAULT_LEASE_S
    if owner.host == socket.gethostname() and not _pid_alive(owner.pid):
        return True
    return age > owner.lease_s


class Claim:
    """A held claim: ``release()`` (or leaving the ``with`` block) deletes it; a heartbeat keeps it fresh."""

    def __init__(self, path: Path, owner: ClaimOwner) -> None:
        self.path = path
        self.owner = owner
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name=f"claim {path.stem}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        period = max(self.owner.lease_s / 4.0, 0.05)
        while not self._stop.wait(period):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def held(self) -> bool:
        """Still ours (nobody declared it stale and took it over)."""
        owner = read_owner(self.path)
        return owner is not None and owner.token == self.owner.token

    def release(self) -> None:
        self._stop.set()
        if self._beat is not threading.current_thread():
            self._beat.join(timeout=1.0)
        if self.held():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _create(path: Path, owner: ClaimOwner) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump({"pid": owner.pid, "host": owner.host, "token": owner.token, "since": owner.since,
                   "lease_s": owner.lease_s}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def try_claim(folder: str | os.PathLike[str], key: str, lease_s: float = DEFAULT_LEASE_S) -> Claim | ClaimOwner:
    """Claim ``key`` in ``folder``: a :class:`Claim` when it is now ours, else the live :class:`ClaimOwner` that holds
    it. A stale claim is taken over (see the module docstring)."""
    path = claim_path(folder, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        owner = ClaimOwner(os.getpid(), socket.gethostname(), uuid.uuid4().hex, time.time(), float(lease_s))
        if _create(path, owner):
            return Claim(path, owner)
        current = read_owner(path)
        if not is_stale(path, current):
            return current or ClaimOwner(0, "?", "", time.time(), lease_s)
        grave = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            continue  # another contender moved it first: try to create again
        moved = read_owner(grave)
        if current is not None and (moved is None or moved.token != current.token):
            # we moved a claim made after we read the stale one: put it back if nobody claimed meanwhile
            with contextlib.suppress(OSError):
                os.link(grave, path)
        with contextlib.suppress(OSError):
            grave.unlink()
    current = read_owner(path)
    return current or ClaimOwner(0, "?", "", time.time(), lease_s)


@contextlib.contextmanager
def claimed(folder: str | os.PathLike[str], key: str, lease_s: float = DEFAULT_LEASE_S
            ) -> Iterator[Claim | ClaimOwner]:
    """``try_claim`` as a context: the claim is released on leaving, whatever happens."""
    got = try_claim(folder, key, lease_s)
    try:
        yield got
    finally:
        if isinstance(got, Claim):
            got.release()


def sweep_stale(folder: str | os.PathLike[str]) -> int:
    """Remove the stale claims in ``folder`` (owners that died between finishing an item and releasing its claim:
    a rerun skips that finished item and would otherwise never touch the claim again); returns how many. Each is
    taken over through :func:`try_claim` and released, so a live owner's claim is never removed."""
    claims = Path(folder) / CLAIMS_DIR
    if not claims.is_dir():
        return 0
    swept = 0
    for path in sorted(claims.glob(f"*{CLAIM_SUFFIX}")):
        if not is_stale(path, read_owner(path)):
            continue
        got = try_claim(folder, path.name[: -len(CLAIM_SUFFIX)])
        if isinstance(got, Claim):
            got.release()
            swept += 1
    return swept


__all__ = ["CLAIMS_DIR", "Claim", "ClaimOwner", "DEFAULT_LEASE_S", "claim_path", "claimed", "is_stale", "sweep_stale",
           "read_owner", "try_claim"]
