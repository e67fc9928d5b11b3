"""Tile labels for MS-CLAM from painted pixels, boxes and CSV masks, and their way into ``wsimil train``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.slide.mask_sampling import patch_samples
from napari_wsimil.train.tile_labels import (TileLabelError, TileLabelSource, annotation_samples,
                                             default_class_map, parse_class_map, slide_tile_labels,
                                             tile_labels)

from .test_cli_end_to_end import run_cli


def test_patch_samples_reads_the_right_mask_pixels() -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 1  # right half (level-0 x >= 128 at downsample 4)
    coords = np.array([[0, 0], [64, 0], [96, 0], [128, 64]])  # 64-px patches
    vals = patch_samples(coords, 64, mask, 4.0, samples=8)
    frac = (vals == 1).mean(1)
    assert frac.tolist() == [0.0, 0.0, 0.5, 1.0]
    calls = []

    def lookup(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        return mask[np.ix_(rows, cols)]

    assert np.array_equal(patch_samples(coords, 64, lookup, 4.0), vals)
    assert len(calls) == 2  # one read per row of patches, not per patch

    # single points (1-px patches) in the same mask row are read together, even with different y
    rng = np.random.default_rng(0)
    pts = np.column_stack([rng.uniform(0, 250, 500), rng.uniform(0, 250, 500)])
    calls.clear()
    one_by_one = np.concatenate([patch_samples(p[None], 1, mask, 4.0, samples=1) for p in pts])
    assert np.array_equal(patch_samples(pts, 1, lookup, 4.0, samples=1), one_by_one)
    assert len(calls) == len(np.unique(np.floor((pts[:, 1] + 0.5) / 4)))  # one read per mask row: 64, not 500


def test_tile_rule_positive_wins_then_normal_then_unknown() -> None:
    # 16 samples: tumour id 1 -> tile 1, normal id 2 -> tile 0, id 3 unmapped
    v = np.array([
        [1] * 8 + [2] * 8,  # half tumour -> 1
        [1] * 7 + [2] * 9,  # mostly normal -> 0
        [1] * 7 + [0] * 9,  # not enough of anything -> -1
        [3] * 16,  # unmapped class -> -1
        [0] * 16,  # nothing -> -1
    ], np.uint8)
    assert tile_labels(v, {1: 1, 2: 0}).tolist() == [1, 0, -1, -1, -1]
    # exhaustive: unpainted counts as normal
    assert tile_labels(v, {1: 1, 2: 0}, exhaustive=True).tolist() == [1, 0, 0, -1, 0]


def test_class_maps_by_name_and_by_text() -> None:
    table = {0: "unlabelled", 1: "tumour", 2: "normal", 3: "artefact", 4: "Malignant"}
    assert default_class_map(table, ["benign", "malignant"]) == {1: 1, 2: 0, 4: 1}
    assert parse_class_map("artefact=benign, tumour=1", table, ["benign", "malignant"]) == {3: 0, 1: 1}
    with pytest.raises(TileLabelError) as err:
        parse_class_map("ink=benign,tumour=cancer,normal", table, ["benign", "malignant"])
    msg = str(err.value)
    assert "'ink'" in msg and "'cancer'" in msg and "'normal'" in msg  # every problem at once


def test_boxes_label_the_patches_they_cover() -> None:
    from napari_wsimil.project.annotations import Annotation

    coords = np.array([[0, 0], [100, 0], [200, 0]])
    anns = [Annotation.box(90, -10, 260, 110, "tumour"), Annotation.box(0, 0, 50, 100, "ink")]
    vals = annotation_samples(coords, 100, anns, {"tumour": 1}, samples=10)
    assert (vals == 1).mean(1).tolist() == [0.1, 1.0, 0.6]  # sample columns at 5, 15 ... 95
    src = TileLabelSource(annotations=anns, class_ids={"tumour": 1})
    assert slide_tile_labels(coords, 100, src, {1: 1}).tolist() == [-1, 1, 1]
    assert slide_tile_labels(coords, 100, TileLabelSource(), {1: 1}) is None


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_wsimil.slide.synthetic import synthesize_cohort

    return synthesize_cohort(tmp_path_factory.mktemp("tiles"), 6, seed=3, size=2048)


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_ms_clam_takes_tile_labels_from_a_csv_pixel_mask(small_cohort: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The ground truth made into a painting (tumour 1, normal 2) on one malignant slide."""
    from napari_wsimil.project.mask_io import MaskImage

    rows = _rows(small_cohort)

    def truth_of(row: dict[str, str]) -> np.ndarray:
        with MaskImage(small_cohort.parent / row["gt_mask"]) as gt:
            return gt.points(np.arange(gt.shape[0]), np.arange(gt.shape[1]))

    target = max((r for r in rows if r["label"] == "1"), key=lambda r: int(truth_of(r).sum()))
    truth = truth_of(target)
    painted = np.where(truth > 0, 1, 2).astype(np.uint8)
    import tifffile

    tifffile.imwrite(tmp_path / "paint.tif", painted)
    for r in rows:
        r["path"], r["gt_mask"] = (str(small_cohort.parent / r[k]) for k in ("path", "gt_mask"))
        r["pixel_labels"] = str(tmp_path / "paint.tif") if r is target else ""
        r["pixel_labels_downsample"] = target["gt_downsample"] if r is target else ""
        r["split"] = "train" if r is target or r["slide_id"] not in ("slide_000", "slide_001") else "val"
    csv_path = tmp_path / "cohort.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    # the features go beside the run; slides stay where they are
    run = tmp_path / "run"
    assert run_cli(["train", str(csv_path), "--method", "ms-clam", "--out", str(run), "--epochs", "2",
                    "--patch", "64", "--mpp", "1.0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"tile labels {target['slide_id']}: " in out and "1 of " in out
    info = json.loads((run / "run.json").read_text())
    assert info["tile_labelled_slides"] == [target["slide_id"]]

    # the labels themselves: the tumour patches are the ones the ground truth says
    from napari_wsimil.features.bags import patch_size_level0, read_bag
    from napari_wsimil.train.cohort import load_cohort
    from napari_wsimil.train.cohort_labels import cohort_tile_labels

    cohort = load_cohort(csv_path)
    bag_path = tmp_path / "features" / "handcrafted" / f"{target['slide_id']}.npz"
    labels = cohort_tile_labels(cohort, cohort.slides, {target["slide_id"]: bag_path}, ["0", "1"])
    lab = labels[target["slide_id"]]
    bag = read_bag(bag_path)
    frac = (patch_samples(bag.coords, patch_size_level0(bag.attrs), truth,
                          float(target["gt_downsample"])) > 0).mean(1)
    assert np.array_equal(lab == 1, frac >= 0.5) and np.array_equal(lab == 0, frac < 0.5)
    assert (lab == 1).any() and (lab == 0).any()

    # a label mapping naming an unknown class is refused before training
    assert run_cli(["train", str(csv_path), "--method", "ms-clam", "--out", str(tmp_path / "run2"),
                    "--epochs", "1", "--patch", "64", "--mpp", "1.0", "--device", "cpu",
                    "--tile-classes", "cancer=1"]) == 2
    assert "no pixel class named 'cancer'" in capsys.readouterr().out


def test_project_paint_and_boxes_become_tile_labels(small_cohort: Path, tmp_path: Path) -> None:
    from napari_wsimil.features import extract_cohort
    from napari_wsimil.features.bags import patch_size_level0, read_bag
    from napari_wsimil.project import Project
    from napari_wsimil.project.annotations import Annotation
    from napari_wsimil.train.cohort import load_cohort
    from napari_wsimil.train.cohort_labels import cohort_tile_labels

    proj_dir = tmp_path / "proj"
    with Project.create_from_csv(proj_dir, small_cohort) as p:
        sid = p.slide_ids[0]
        bag_path = extract_cohort({sid: p.slide_path(sid)}, tmp_path / "feat", "handcrafted", patch_size=64,
                                  mpp=1.0)[0].bag_path
        bag = read_bag(bag_path)
        size = patch_size_level0(bag.attrs)
        x, y = bag.coords[:, 0], bag.coords[:, 1]
        # paint "tumour" over a 3x3-patch block around the first patch, box "normal" around the last
        geo = p.label_geometry(sid)
        d = geo.downsample
        px0, py0 = x[0], y[0]
        paint = np.zeros(geo.shape, np.uint8)
        paint[int(py0 // d):int((py0 + 3 * size) // d), int(px0 // d):int((px0 + 3 * size) // d)] = \
            p.class_by_name("tumour").id
        p.save_pixel_labels(sid, paint)
        bx0, by0 = x[-1] - size, y[-1] - size
        p.save_annotations(sid, [Annotation.box(bx0, by0, bx0 + 3 * size, by0 + 3 * size, "normal")])
    cohort = load_cohort(proj_dir)
    labels = cohort_tile_labels(cohort, [s for s in cohort.slides if s.slide_id == sid], {sid: bag_path},
                                cohort.classes)[sid]
    in_paint = (x >= px0) & (y >= py0) & (x + size <= px0 + 3 * size) & (y + size <= py0 + 3 * size)
    in_box = (x >= bx0) & (y >= by0) & (x + size <= bx0 + 3 * size) & (y + size <= by0 + 3 * size)
    touch_paint = (x + size > px0) & (y + size > py0) & (x < px0 + 3 * size) & (y < py0 + 3 * size)
    touch_box = (x + size > bx0) & (y + size > by0) & (x < bx0 + 3 * size) & (y < by0 + 3 * size)
    assert in_paint.sum() >= 1 and in_box.sum() >= 1
    assert (labels[in_paint] == 1).all() and (labels[in_box] == 0).all()
    assert (labels[~(touch_paint | touch_box)] == -1).all() and (~(touch_paint | touch_box)).any()
