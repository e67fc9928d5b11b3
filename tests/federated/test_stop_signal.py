"""SIGTERM reads as "stopped", Ctrl-C as "interrupted".

``wsimil federate simulate`` ends by stopping its sites with SIGTERM; each site used to print "interrupted", so a
federation that succeeded ended with lines that read like a failure. Both still run every ``finally`` (clean-up
of the Flower processes) and exit with 130."""

from __future__ import annotations

import argparse
import os
import signal
import time

import pytest

from napari_wsimil import cli
from napari_wsimil.errors import Stopped
from napari_wsimil.federated.launch import terminated_on_signal


def test_sigterm_raises_stopped_which_is_still_a_keyboard_interrupt() -> None:
    cleaned = False
    with pytest.raises(Stopped):
        try:
            with terminated_on_signal():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        finally:
            cleaned = True
    assert cleaned and issubclass(Stopped, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is not None  # the old handler is back


@pytest.mark.parametrize("exc, word", [(Stopped, "stopped"), (KeyboardInterrupt, "interrupted")])
def test_the_command_line_says_which(monkeypatch, capsys, exc, word) -> None:
    def raise_it(args):
        raise exc

    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="wsimil")
        p.set_defaults(func=raise_it, command="federate")
        return p

    monkeypatch.setattr(cli, "_build_parser", parser)
    assert cli.main([]) == 130
    assert capsys.readouterr().err.strip() == f"wsimil federate: {word}"
