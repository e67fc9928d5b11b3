"""One cohort reader: the µm/px of a slide whose file lacks it comes from the CSV's ``mpp`` column or the
project, and reaches feature extraction, training, prediction, evaluation and segmentation."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.errors import WsimilError
from napari_wsimil.workflow.cli import register
from napari_wsimil.train.cohort import CohortError, load_cohort


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wsimil")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WsimilError as exc:
        print(f"wsimil {args.command}: error: {exc}")
        return 2


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def no_mpp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small synthetic slides (0.5 µm/px) rewritten as TIFFs without a pixel size; returns their folder
    with ``plain.csv`` (no mpp column) and ``with_mpp.csv`` (mpp 0.5), both with ground truth."""
    import tifffile

    from napari_wsimil.slide import open_slide
    from napari_wsimil.slide.synthetic import synthesize_cohort
    from napari_wsimil.slide.tiff_writer import write_image_pyramid

    folder = tmp_path_factory.mktemp("nompp")
    cohort = synthesize_cohort(folder / "synth", 4, seed=1, size=1024, workers=1)
    with open(cohort, newline="") as fh:
        rows = list(csv.DictReader(fh))
    plain = []
    for r in rows:
        target = folder / f"{r['slide_id']}.tif"
        write_image_pyramid(target, tifffile.imread(cohort.parent / r["path"]))
        with open_slide(target) as s:
            assert s.mpp is None  # the point of the fixture
        plain.append({"slide_id": r["slide_id"], "path": target.name, "label": r["label"],
                      "gt_mask": str(cohort.parent / r["gt_mask"]), "gt_downsample": r["gt_downsample"]})
    _write_csv(folder / "plain.csv", plain)
    _write_csv(folder / "with_mpp.csv", [{**r, "mpp": "0.5"} for r in plain])
    return folder


def test_csv_mpp_column_trains_predicts_and_evaluates(no_mpp: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--method", "abmil", "--epochs", "1", "--encoder", "handcrafted", "--patch", "64", "--mpp", "1.0",
              "--device", "cpu"]
    # without the column: one error naming a slide and saying where the pixel size goes
    assert run_cli(["train", str(no_mpp / "plain.csv"), "--out", str(tmp_path / "r0"), *common]) == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("wsimil train: error: feature extraction failed for slide_00") and "(and 3 more)" in last
    assert "does not record its pixel size" in last and "mpp column" in last
    assert not (tmp_path / "r0" / "last.json").exists()

    run, pred = tmp_path / "run", tmp_path / "pred"
    cohort = no_mpp / "with_mpp.csv"
    assert run_cli(["train", str(cohort), "--out", str(run), *common]) == 0
    capsys.readouterr()
    from napari_wsimil.features.bags import read_bag_attrs

    feats = tmp_path / "features" / "handcrafted"
    attrs = read_bag_attrs(feats / "slide_000.npz")
    assert attrs["slide_mpp"] == 0.5 and attrs["mpp"] == 1.0

    # prediction (with an overlapping heatmap grid, which re-reads the slide) and evaluation get it too
    assert run_cli(["predict", str(run), "--cohort", str(cohort), "--out", str(pred), "--device", "cpu",
                    "--heatmap-overlap", "0.5"]) == 0
    out = capsys.readouterr()
    assert "no heatmap" not in out.err
    assert len(list((pred / "heatmaps").glob("*.tif"))) == 4
    from napari_wsimil.infer.predictions import read_attention

    assert read_attention(pred / "attention" / "slide_000.npz").slide_mpp == 0.5
    assert run_cli(["evaluate", str(pred), "--cohort", str(cohort)]) == 0
    m = json.loads((pred / "metrics.json").read_text())
    assert m["n_slides"] == 4 and m["localisation"]["n_slides_with_truth"] == 4

    # a corrected pixel size makes the bags stale: they are extracted again at the new one
    _write_csv(tmp_path / "coarser.csv", [{**r, "path": str(no_mpp / r["path"]), "mpp": "0.75"}
                                          for r in csv.DictReader(open(cohort, newline=""))])
    assert run_cli(["predict", str(run), "--cohort", str(tmp_path / "coarser.csv"), "--out", str(tmp_path / "p2"),
                    "--device", "cpu", "--no-heatmaps"]) == 0
    assert read_bag_attrs(feats / "slide_000.npz")["slide_mpp"] == 0.75


def test_project_pixel_size_reaches_training(no_mpp: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from napari_wsimil.project import Project

    proj = tmp_path / "proj"
    with Project.create_from_csv(proj, no_mpp / "plain.csv") as p:
        assert all(r.mpp is None and r.scan_mpp is None for r in p.slides)
        held_out = [r for r in p.slides if r.label == "malignant"][-1].slide_id
        p.set_split(held_out, "test")  # training uses a subset of the project's slides
    args = ["train", str(proj), "--method", "abmil", "--epochs", "1", "--patch", "64", "--mpp", "1.0",
            "--device", "cpu", "--val-fraction", "0"]
    assert run_cli([*args, "--out", str(tmp_path / "r0")]) == 2
    assert "pixel size" in capsys.readouterr().out
    with Project.open(proj) as p:
        for sid in p.slide_ids:
            p.set_slide_mpp(sid, 0.5)  # the user sets the pixel size the files lack
    assert load_cohort(proj).slides[0].mpp == 0.5
    assert run_cli([*args, "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    from napari_wsimil.features.bags import read_bag_attrs

    bags = sorted((proj / "features" / "handcrafted").glob("*.npz"))
    assert [b.stem for b in bags] == sorted({"slide_000", "slide_001", "slide_002", "slide_003"} - {held_out})
    assert all(read_bag_attrs(b)["slide_mpp"] == 0.5 for b in bags)


def test_segmentation_slides_take_the_csv_mpp(no_mpp: Path) -> None:
    from napari_wsimil.seg.data import SegDataError, open_seg_slides

    c = load_cohort(no_mpp / "with_mpp.csv")
    slides = open_seg_slides(c, c.slides[:1], ["0", "1"], with_labels=False)
    assert slides[0].slide_mpp == 0.5 and slides[0].map_shape(2.0) == (256, 256)
    slides[0].close()
    c = load_cohort(no_mpp / "plain.csv")
    with pytest.raises(SegDataError, match="slide_000: .*mpp column"):
        open_seg_slides(c, c.slides[:1], ["0", "1"], with_labels=False)


def test_reader_keeps_every_column(tmp_path: Path) -> None:
    (tmp_path / "a.tif").write_bytes(b"")  # training opens files only when it needs them
    src = _write_csv(tmp_path / "c.csv", [
        {"slide_id": "a", "Path": "a.tif", "label": "tumour", "split": "validation", "MPP": "0.25",
         "gt_mask": "a_gt.tif", "gt_downsample": "8", "textures": "/tiles", "texture_tiles": "held-out"},
        {"slide_id": "b", "Path": str(tmp_path / "b.tif"), "label": "", "split": "", "MPP": "",
         "gt_mask": "", "gt_downsample": "", "textures": "", "texture_tiles": ""}])
    a, b = load_cohort(src).slides
    base = tmp_path.resolve()
    assert (a.slide_id, a.path, a.label, a.split, a.mpp) == ("a", base / "a.tif", "tumour", "val", 0.25)
    assert a.gt_mask == base / "a_gt.tif" and a.gt_downsample == 8.0 and a.line == 2
    assert a.extra == {"textures": "/tiles", "texture_tiles": "held-out"}
    assert (b.label, b.split, b.mpp, b.gt_mask) == (None, None, None, None)


@pytest.mark.parametrize(("value", "needle"), [("abc", "mpp 'abc' is not a number"),
                                                ("-0.5", "mpp must be positive, got '-0.5'"),
                                                ("nan", "mpp must be positive, got 'nan'")])
def test_bad_values_are_one_line_naming_the_row(tmp_path: Path, value: str, needle: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_csv(tmp_path / "c.csv", [{"slide_id": "a", "path": "a.tif", "label": "0", "mpp": ""},
                                          {"slide_id": "b", "path": "b.tif", "label": "1", "mpp": value}])
    with pytest.raises(CohortError) as err:
        load_cohort(src)
    assert str(err.value) == f"c.csv line 3 (b): {needle}"
    assert run_cli(["train", str(src), "--method", "abmil", "--out", str(tmp_path / "run")]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "line 3 (b)" in out[0] and needle in out[0]
    # other bad values: same form; several problems are listed together, one per line
    _write_csv(tmp_path / "d.csv", [{"slide_id": "a", "path": "a.tif", "split": "later", "gt_downsample": "x"},
                                    {"slide_id": "a", "path": "b.tif", "split": "", "gt_downsample": ""}])
    with pytest.raises(CohortError) as err:
        load_cohort(tmp_path / "d.csv")
    lines = str(err.value).splitlines()
    assert lines[0] == "d.csv has 3 problems:"
    assert any("line 2 (a): split 'later'" in x for x in lines)
    assert any("line 2 (a): gt_downsample 'x' is not a number" in x for x in lines)
    assert any("line 3 (a): slide_id 'a' is also used on line 2" in x for x in lines)


def test_project_create_keeps_extra_columns_through_export(no_mpp: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """What ``wsimil synth --textures`` writes (split, textures, texture_tiles) and an mpp column survive
    ``project create --from-csv`` → ``export-csv``, and the exported CSV trains like the original."""
    from napari_wsimil.cli import main

    rows = list(csv.DictReader(open(no_mpp / "with_mpp.csv", newline="")))
    src = _write_csv(tmp_path / "in.csv", [
        {**r, "path": str(no_mpp / r["path"]), "split": "train" if i < 3 else "test", "textures": "/data/tiles",
         "texture_tiles": "train" if i < 3 else "held-out"} for i, r in enumerate(rows)])
    proj = tmp_path / "proj"
    assert main(["project", "create", str(proj), "--from-csv", str(src)]) == 0
    assert main(["project", "export-csv", str(proj), "--out", str(tmp_path / "out.csv")]) == 0
    capsys.readouterr()
    out = list(csv.DictReader(open(tmp_path / "out.csv", newline="")))
    assert [(r["slide_id"], r["split"], r["mpp"], r["textures"], r["texture_tiles"]) for r in out] == [
        (r["slide_id"], r["split"], "0.5", "/data/tiles", r["texture_tiles"]) for r in csv.DictReader(open(src))]
    again = load_cohort(tmp_path / "out.csv").slides
    assert [(s.slide_id, s.mpp, s.extra) for s in again] == [
        (s.slide_id, s.mpp, s.extra) for s in load_cohort(src).slides]
    assert load_cohort(proj).slides[3].extra == {"textures": "/data/tiles", "texture_tiles": "held-out"}
    assert np.all([s.path.is_file() for s in again])


def test_real_svs_without_pixel_size_takes_the_row_mpp(tmp_path: Path) -> None:
    """The TCGA frozen section records no µm/px: its bag is made at the CSV's, and refused without it."""
    from conftest import real_slide

    from napari_wsimil.features.bags import read_bag_attrs
    from napari_wsimil.train.cohort import ensure_features

    svs = real_slide("tcga-cr-7395-01a-01-ts1.svs")
    plain = load_cohort(_write_csv(tmp_path / "a.csv", [{"slide_id": "tcga", "path": str(svs), "label": "1"}]))
    with pytest.raises(CohortError, match="failed for tcga: .*does not record its pixel size.*mpp column"):
        ensure_features(plain.slides, tmp_path / "f", "handcrafted", 64, 4.0, device="cpu")
    given = load_cohort(_write_csv(tmp_path / "b.csv", [{"slide_id": "tcga", "path": str(svs), "label": "1",
                                                         "mpp": "0.25"}]))
    bags = ensure_features(given.slides, tmp_path / "f", "handcrafted", 64, 4.0, device="cpu")
    attrs = read_bag_attrs(bags["tcga"])
    assert attrs["slide_mpp"] == 0.25 and attrs["mpp"] == 4.0 and attrs["slide_id"] == "tcga"


def test_encoding_time_is_reported_for_the_slides_a_call_extracts(tmp_path: Path) -> None:
    """``timings`` names every slide this call encoded, and none whose bag was current (a prediction's `seconds`
    then counts its own encoding of new slides, nothing for cached bags)."""
    from conftest import real_slide

    from napari_wsimil.train.cohort import ensure_features

    svs = real_slide("CMU-1-Small-Region.svs")
    rows = [{"slide_id": sid, "path": str(svs), "label": "1"} for sid in ("a", "b")]
    first = load_cohort(_write_csv(tmp_path / "a.csv", rows[:1])).slides
    both = load_cohort(_write_csv(tmp_path / "b.csv", rows)).slides
    t1: dict[str, float] = {}
    ensure_features(first, tmp_path / "f", "handcrafted", 128, 4.0, device="cpu", timings=t1)
    assert list(t1) == ["a"] and t1["a"] > 0
    t2: dict[str, float] = {}
    bags = ensure_features(both, tmp_path / "f", "handcrafted", 128, 4.0, device="cpu", timings=t2)
    assert list(t2) == ["b"] and sorted(bags) == ["a", "b"]  # "a" was current: not encoded again


def test_self_supervised_encoder_without_weights_is_refused_not_random(tmp_path) -> None:
    """`wsimil train --encoder ssl-simclr` without weights would otherwise train on an untrained random net."""
    from napari_wsimil.train.cohort import CohortError, ensure_features

    with pytest.raises(CohortError, match="needs its trained weights"):
        ensure_features([], tmp_path / "features", "ssl-simclr", 64, 1.0)
    assert not (tmp_path / "features").exists()
