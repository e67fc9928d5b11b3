"""The ``wsimil`` commands' ``--device`` default is the default device setting (``NAPARI_WSIMIL_DEVICE``,
auto when unset), the one the Training widget starts a new run with; ``--help`` says so, and an unusable
value is one line and exit status 2."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

#: every command that computes on a device, with the arguments it requires
COMMANDS = {
    "features": ["slides/"],
    "features-eval": ["tiles/"],
    "train": ["proj", "--method", "clam-sb", "--out", "run"],
    "predict": ["run", "--cohort", "proj", "--out", "pred"],
    "pretrain": ["proj", "--out", "seg"],
    "calibrate": ["run"],
}


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch):
    from napari_wsimil import settings

    monkeypatch.delenv("NAPARI_WSIMIL_DEVICE", raising=False)
    settings.reset()
    yield
    monkeypatch.undo()
    settings.reset()


def _devices() -> dict[str, str]:
    """command -> the device it would use when --device is not given."""
    from napari_wsimil.cli import _build_parser

    parser = _build_parser()
    return {cmd: parser.parse_args([cmd, *argv]).device for cmd, argv in COMMANDS.items()}


def test_every_device_option_follows_the_setting(monkeypatch):
    from napari_wsimil import settings
    from napari_wsimil.cli import _build_parser

    sub = next(a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    with_device = {name for name, p in sub.choices.items() if any(a.dest == "device" for a in p._actions)}
    assert with_device == set(COMMANDS)  # a new command with --device must join this test
    assert set(_devices().values()) == {"auto"}  # unset: auto
    monkeypatch.setenv("NAPARI_WSIMIL_DEVICE", "cpu")
    settings.reset()
    assert set(_devices().values()) == {"cpu"}
    settings.update(default_device="mps")  # what napari's Preferences copy in, in a napari session
    assert set(_devices().values()) == {"mps"}
    assert _build_parser().parse_args(["train", *COMMANDS["train"], "--device", "cuda:1"]).device == "cuda:1"


def test_help_names_the_setting_and_a_bad_value_is_one_line():
    env = {**os.environ, "NAPARI_WSIMIL_DEVICE": "cpu"}
    cmd = [sys.executable, "-c",
           "import sys; from napari_wsimil.cli import main; sys.exit(main(sys.argv[1:]))"]
    out = subprocess.run([*cmd, "train", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "(default cpu: the default device setting, NAPARI_WSIMIL_DEVICE, auto when unset)" in text

    bad = subprocess.run([*cmd, "predict", "--help"], env={**env, "NAPARI_WSIMIL_DEVICE": "gpu"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and not bad.stdout
    assert bad.stderr.strip().splitlines() == [
        "wsimil: error: NAPARI_WSIMIL_DEVICE must be one of auto, cpu, cuda, mps, got 'gpu'"]
