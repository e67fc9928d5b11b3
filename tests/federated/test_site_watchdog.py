"""A site's SuperNode that hangs on its way out is stopped, so the site rejoins a restarted server.

Flower 1.42's SuperNode, refused by a restarted SuperLink (HTTP 401), logs that it is leaving and can then hang in
its own exit handler, alive but idle: the site never rejoined and a resumed server waited for it in vain. These
tests use real child processes that write to a real log, as the SuperNode does.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from napari_wsimil.federated.deploy import LEAVING_LINE, wait_supernode
from napari_wsimil.federated.launch import start, stop


def _child(log: Path, lines: list[str], then: str):
    code = ("import sys, time\n"
            f"f = open({str(log)!r}, 'a')\n"
            f"for line in {lines!r}:\n"
            "    f.write(line + '\\n'); f.flush()\n"
            f"{then}\n")
    return start([sys.executable, "-c", code], dict(os.environ), None)


def test_a_supernode_hanging_after_it_left_is_stopped_and_counts_as_gone(tmp_path: Path) -> None:
    log = tmp_path / "site.log"
    proc = _child(log, ["INFO: Sent successfully", f"INFO: {LEAVING_LINE}.", "Traceback ..."], "time.sleep(600)")
    t0 = time.monotonic()
    try:
        assert wait_supernode(proc, log, hang_s=1.0, poll_s=0.2) == 0
        assert time.monotonic() - t0 < 30
        assert proc.poll() is not None  # stopped, not left behind
    finally:
        stop(proc, grace=1.0)


def test_an_exit_status_is_returned_as_is(tmp_path: Path) -> None:
    log = tmp_path / "site.log"
    proc = _child(log, ["INFO: Exit Code: 305"], "sys.exit(3)")
    assert wait_supernode(proc, log, hang_s=1.0, poll_s=0.2) == 3


def test_a_working_supernode_is_left_alone_and_an_earlier_run_s_line_does_not_count(tmp_path: Path) -> None:
    log = tmp_path / "site.log"
    log.write_text(f"INFO: {LEAVING_LINE}.\n")  # the previous SuperNode's goodbye, before this one's output
    offset = log.stat().st_size
    proc = _child(log, ["INFO: Receiving: train message", "INFO: Sent successfully"],
                  "time.sleep(4); sys.exit(0)")
    t0 = time.monotonic()
    try:
        assert wait_supernode(proc, log, offset, hang_s=0.5, poll_s=0.2) == 0
        assert time.monotonic() - t0 > 3  # it ran to its own end: nothing stopped it early
    finally:
        stop(proc, grace=1.0)


#: A child's last statement: it ends itself as Flower's SuperNode does, with SIGINT and no handler for it.
SIGINT_ITSELF = "import os, signal; os.kill(os.getpid(), signal.SIGINT); time.sleep(60)"


def test_a_supernode_ended_by_its_own_sigint_after_it_left_counts_as_gone(tmp_path: Path) -> None:
    """The same fault when Flower's SIGINT does end the process (seen in a fresh-clone run): an unhandled
    KeyboardInterrupt, so a signal's exit status, which would otherwise end the site instead of rejoining."""
    log = tmp_path / "site.log"
    proc = _child(log, ["INFO: Sent successfully", f"INFO: {LEAVING_LINE}."],
                  SIGINT_ITSELF)
    try:
        assert wait_supernode(proc, log, hang_s=30.0, poll_s=0.2) == 0
        assert proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT)  # what the site would have seen
    finally:
        stop(proc, grace=1.0)


def test_a_sigint_without_leaving_is_returned_so_the_site_ends(tmp_path: Path) -> None:
    log = tmp_path / "site.log"
    log.write_text(f"INFO: {LEAVING_LINE}.\n")  # an earlier SuperNode's goodbye does not count
    offset = log.stat().st_size
    proc = _child(log, ["INFO: Receiving: train message"],
                  SIGINT_ITSELF)
    try:
        assert wait_supernode(proc, log, offset, hang_s=30.0, poll_s=0.2) in (-signal.SIGINT, 128 + signal.SIGINT)
    finally:
        stop(proc, grace=1.0)
