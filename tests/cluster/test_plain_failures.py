"""`wsimil predict` and `wsimil features` without --cluster, on a batch holding real corrupt slide files: the bad
slides are listed with their reason (predict: in PRED/failures.csv), the others complete exactly as in a clean
run, and the exit status is 1."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")


@pytest.fixture(scope="module")
def good(synth_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of three readable slides (new, unlabelled slides to predict)."""
    folder = tmp_path_factory.mktemp("good")
    for p in sorted(synth_cohort.glob("slide_*[0-9].tiff"))[:3]:
        (folder / p.name).symlink_to(p)
    return folder


@pytest.fixture(scope="module")
def run(abmil_run: Path) -> Path:
    return abmil_run


@pytest.fixture(scope="module")
def reference(run: Path, good: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "pred"
    assert main(["predict", str(run), "--cohort", str(good), "--out", str(out), "--device", "cpu"]) == 0
    assert not (out / "failures.csv").exists()
    return out


def with_bad(good: Path, folder: Path, name: str, make) -> Path:
    folder.mkdir()
    for p in good.iterdir():
        (folder / p.name).symlink_to(p.resolve())
    make(folder / name)
    return folder


def truncated_scan(path: Path) -> None:
    path.write_bytes(b"II*\x00" + os.urandom(2000))  # a TIFF header and nothing readable behind it


def corrupt_tiles(source: Path):
    """A slide whose header and pyramid open fine but whose full-resolution tiles are noise: it fails only while
    its patches are decoded, after the family has started predicting the batch."""
    import tifffile

    def make(path: Path) -> None:
        shutil.copy(source, path)
        with tifffile.TiffFile(path) as t:
            tiles = list(zip(t.pages[0].dataoffsets, t.pages[0].databytecounts))
        with open(path, "r+b") as fh:
            for offset, n in tiles:
                fh.seek(offset)
                fh.write(os.urandom(n))

    return make


def table(folder: Path) -> list[list[str]]:
    with open(folder / "predictions.csv", newline="") as fh:
        return [row[:-1] for row in csv.reader(fh)]  # all but the seconds column


def failures(folder: Path) -> list[dict[str, str]]:
    with open(folder / "failures.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def same_maps(a: Path, b: Path, ids: list[str]) -> None:
    import tifffile

    for sid in ids:
        assert np.array_equal(tifffile.imread(a / "heatmaps" / f"{sid}.tif"), tifffile.imread(b / "heatmaps" / f"{sid}.tif"))
        with np.load(a / "attention" / f"{sid}.npz") as x, np.load(b / "attention" / f"{sid}.npz") as y:
            assert all(np.array_equal(x[k], y[k]) for k in x.files)


def test_an_unreadable_slide_is_listed_and_the_others_are_predicted(run, good, reference, tmp_path, capsys) -> None:
    mixed = with_bad(good, tmp_path / "mixed", "broken.svs", truncated_scan)
    out = tmp_path / "pred"
    capsys.readouterr()
    code = main(["predict", str(run), "--cohort", str(mixed), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [ln for ln in err.splitlines() if "FAILED" in ln]
    assert len(lines) == 1 and lines[0].startswith("broken: FAILED: ") and "broken.svs" in lines[0], err
    assert "1 slides could not be predicted" in err and "failures.csv" in err
    assert [(f["slide_id"], Path(f["path"]).name) for f in failures(out)] == [("broken", "broken.svs")]
    assert failures(out)[0]["reason"] in lines[0]
    assert table(out) == table(reference)
    same_maps(reference, out, [p.stem for p in good.iterdir()])
    assert not (out / "heatmaps" / "broken.tif").exists()

    # nothing readable at all: every slide listed, no predictions, still exit 1
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    truncated_scan(only_bad / "broken.svs")
    out2 = tmp_path / "pred2"
    assert main(["predict", str(run), "--cohort", str(only_bad), "--out", str(out2), "--device", "cpu"]) == 1
    assert [f["slide_id"] for f in failures(out2)] == ["broken"] and not (out2 / "predictions.csv").exists()

    # the same folder once the bad slide is gone: an earlier run's failures.csv does not linger
    (mixed / "broken.svs").unlink()
    assert main(["predict", str(run), "--cohort", str(mixed), "--out", str(out), "--device", "cpu"]) == 0
    assert not (out / "failures.csv").exists() and table(out) == table(reference)


def test_a_slide_that_opens_but_cannot_be_decoded_fails_alone(run, good, reference, tmp_path, capsys) -> None:
    first = sorted(good.iterdir())[0].resolve()
    mixed = with_bad(good, tmp_path / "mixed", "noise.tiff", corrupt_tiles(first))
    out = tmp_path / "pred"
    capsys.readouterr()
    code = main(["predict", str(run), "--cohort", str(mixed), "--out", str(out), "--device", "cpu"])
    said = capsys.readouterr()
    err = said.err
    assert code == 1, err
    assert "predicting the slides one at a time" in said.out  # the family's own lines stay on stdout
    lines = [ln for ln in err.splitlines() if ln.startswith(("noise: FAILED", "slide_"))]
    assert len(lines) == 1 and lines[0].startswith("noise: FAILED: ") and "corrupt" in lines[0], err
    assert [f["slide_id"] for f in failures(out)] == ["noise"]
    assert table(out) == table(reference)
    same_maps(reference, out, [p.stem for p in good.iterdir()])
    assert not list(out.glob(".parts/*")) and not list(out.glob(".claims/*"))


def test_plain_features_go_on_past_a_corrupt_slide(good, tmp_path, capsys) -> None:
    mixed = with_bad(good, tmp_path / "mixed", "broken.svs", truncated_scan)
    out = tmp_path / "bags"
    code = main(["features", *sorted(map(str, mixed.iterdir())), "--out", str(out), "--patch", "64", "--mpp", "1",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [ln for ln in err.splitlines() if "FAILED" in ln]
    assert len(lines) == 1 and "broken" in lines[0] and "broken.svs" in lines[0], err
    assert "3 computed, 0 up to date, 1 failed" in err
    assert sorted(p.stem for p in out.glob("*.npz")) == sorted(p.stem for p in good.iterdir())
