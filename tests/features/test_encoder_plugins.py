"""Encoders from other packages through the napari_wsimil.encoders entry-point group: a fake
installed distribution (a *.dist-info folder on sys.path), listed, built, broken ones warned about."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from napari_wsimil.cli import main
from napari_wsimil.features import EncoderError, available_encoders, build_encoder
from napari_wsimil.features.encoders import refresh_encoders

MODULE = '''
"""A lab's own encoders."""
import numpy as np
from napari_wsimil.features.encoders import Encoder


class MeanColour(Encoder):
    """Mean RGB of the patch, 3-d."""

    name = "fake-class"
    version = "1"
    dim = 3

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def encode(self, patches):
        return patches.reshape(len(patches), -1, 3).mean(1).astype(np.float32) * self.scale


def build(weights=None, device="auto", **options):
    """Brightness, 1-d (a builder function)."""
    enc = MeanColour(**options)
    enc.name, enc.dim = "fake-builder", 1
    enc.encode = lambda p: p.reshape(len(p), -1).mean(1, keepdims=True).astype(np.float32)
    enc.weights = weights
    return enc
'''


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "fake_wsimil_encoders.py").write_text(MODULE)
    (site / "fake_wsimil_broken.py").write_text("raise ImportError('needs a GPU library that is not here')\n")
    info = site / "fake_wsimil_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-wsimil-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [napari_wsimil.encoders]
        fake-builder = fake_wsimil_encoders:build
        fake-class = fake_wsimil_encoders:MeanColour
        fake-broken = fake_wsimil_broken:build
        handcrafted = fake_wsimil_encoders:build
        """))
    monkeypatch.syspath_prepend(str(site))
    with pytest.warns(RuntimeWarning) as caught:
        refresh_encoders()
    yield [str(w.message) for w in caught]
    monkeypatch.undo()
    for mod in ("fake_wsimil_encoders", "fake_wsimil_broken"):
        sys.modules.pop(mod, None)
    refresh_encoders()


def test_plugins_are_listed_and_build(fake_plugin) -> None:
    specs = available_encoders()
    assert specs["fake-builder"].source == "fake-wsimil-plugin"
    assert specs["fake-builder"].description == "Brightness, 1-d (a builder function)."
    assert specs["fake-class"].description == "Mean RGB of the patch, 3-d."
    assert not specs["fake-class"].takes_weights
    assert specs["handcrafted"].source == "builtin"  # a plugin cannot take a built-in name
    patches = np.full((2, 8, 8, 3), 100, np.uint8)
    assert build_encoder("fake-class", scale=2.0).encode(patches).tolist() == [[200.0] * 3] * 2
    enc = build_encoder("fake-builder", weights="w.bin")
    assert enc.dim == 1 and enc.weights == "w.bin" and enc.encode(patches).shape == (2, 1)
    with pytest.raises(EncoderError, match="takes no weights"):
        build_encoder("fake-class", weights="w.bin")


def test_broken_plugin_warns_and_says_why(fake_plugin) -> None:
    assert any("fake-broken" in m and "needs a GPU library" in m and "fake-wsimil-plugin" in m
               for m in fake_plugin)
    assert any("handcrafted" in m and "taken" in m for m in fake_plugin)
    assert "fake-broken" not in available_encoders()
    with pytest.raises(EncoderError, match="fake-broken.*could not be loaded.*needs a GPU library"):
        build_encoder("fake-broken")


def test_encoders_command_lists_plugins(fake_plugin, capsys) -> None:
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    assert "fake-class" in out and "[fake-wsimil-plugin]" in out and "timm:vit_large_patch16_224" in out


def test_refresh_forgets_removed_plugins(tmp_path) -> None:
    assert "fake-class" not in refresh_encoders()  # the fixture's folder is off sys.path again
