"""Wall and CPU time of the Flower tests (issue 18: each should finish within a minute).

Flower detaches its SuperExec and ClientApp processes into their own sessions, so ``time pytest`` misses their
CPU. This runner makes itself a *child subreaper* (Linux ``prctl(PR_SET_CHILD_SUBREAPER)``): every orphaned
descendant is re-parented to it, and once reaped its CPU time counts in ``RUSAGE_CHILDREN``. Each test id runs
in its own pytest process, one after the other; the machine is shared, so read CPU seconds beside wall seconds.

    PYTHONPATH=src python benchmarks/bench_flower_tests.py tests/federated/test_flower_rounds.py::test_x ...
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def _orphans() -> list[str]:
    """Processes re-parented to this runner (left running by the test): pid and command line."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            status = open(f"/proc/{entry}/status").read() if entry.isdigit() else ""
            if f"PPid:\t{me}\n" in status and "State:\tZ" not in status:  # zombies are already dead
                cmd = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
                out.append(f"{entry} {cmd[:150]}")
        except OSError:
            continue
    return out


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            return
        if pid == 0:
            return


def run_one(test: str, extra: list[str]) -> tuple[int, float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", test, *extra])
    if rc != 0:
        print(f"{test}: pytest exit {rc}", flush=True)
    wall = time.perf_counter() - t0
    left = _orphans()
    if left:
        print(f"{test}: {len(left)} process(es) still running after the test:", *left, sep="\n  ", flush=True)
    t1 = time.perf_counter()
    _reap_all()  # orphans left by Flower (killed by the test's clean-up) count too
    if left:
        print(f"  ... they ended {time.perf_counter() - t1:.1f} s later", flush=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return rc, wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tests", nargs="+", help="pytest node ids, each run in its own pytest process")
    ap.add_argument("--pytest-arg", action="append", default=[])
    ap.add_argument("--keep", metavar="DIR", help="keep each test's files (logs) in DIR/<n>")
    args = ap.parse_args()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    rows = []
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)  # pytest makes the basetemp itself, not its parent
    for i, test in enumerate(args.tests):
        keep = [f"--basetemp={args.keep}/{i}"] if args.keep else []
        rows.append((test, *run_one(test, [*args.pytest_arg, *keep])))
    print(f"\n{'test':70s} {'rc':>3s} {'wall s':>7s} {'cpu s':>7s}")
    for test, rc, wall, cpu in rows:
        print(f"{test[-70:]:70s} {rc:3d} {wall:7.1f} {cpu:7.1f}")
    return max(r[1] for r in rows)


if __name__ == "__main__":
    raise SystemExit(main())
