"""``wsimil features`` as registered by features.cli.register (the lead wires it into the main CLI)."""

from __future__ import annotations

import argparse

from napari_wsimil.features import read_bag
from napari_wsimil.features.cli import register
from napari_wsimil.slide.synthetic import synthesize_slide


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wsimil")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_features_command(tmp_path, capsys) -> None:
    slide = tmp_path / "one.tif"
    synthesize_slide(slide, 1024, seed=1, malignant=False)
    out = tmp_path / "bags"
    assert _run(["features", str(slide), "--out", str(out), "--patch", "128", "--mpp", "1.0"]) == 0
    bag = read_bag(out / "one.npz")
    assert bag.attrs["encoder"] == "handcrafted" and bag.attrs["mpp"] == 1.0
    assert _run(["features", str(slide), "--out", str(out), "--patch", "128", "--mpp", "1.0"]) == 0
    assert "up to date" in capsys.readouterr().err
    assert _run(["features", str(slide)]) == 2  # slide files need --out
