"""Textured synthetic cohorts (``wsimil synth --textures``): real tiles in the generator's layout.

Most tests make their own "textures": flat-coloured tiles whose colours share one stain hue and differ only in
density (the pools' stain normalisation keeps density), so every pixel of a render says which pool it came
from. The real-data tests use ../shared/data and skip with a reason when it is absent.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import SHARED_DATA
from napari_wsimil.cli import main
from napari_wsimil.errors import WsimilError
from napari_wsimil.slide.synthetic import (
    HELD_OUT,
    TRAIN,
    VAL,
    SlideModel,
    TexturedSlide,
    cohort_splits,
    open_textures,
    scan_textures,
    synthesize_cohort,
)
from napari_wsimil.slide.tiff_writer import write_pyramid

# one H&E-like hue (optical density direction of RGB 150, 100, 170) at four densities
_OD = -np.log((np.array([150.0, 100.0, 170.0]) + 1) / 256)
LEVELS = {"normal_train": 0.5, "normal_held": 1.0, "tumour_train": 1.6, "tumour_held": 2.4}


def _colour(level: float) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.rint(256 * np.exp(-level * _OD) - 1), 0, 255))


def _tile(path: Path, level: float, size: int = 64, fmt: str = "PNG", **save) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), _colour(level)).save(path, fmt, **save)


def _split_textures(root: Path, held: str = "valid", n_held: int = 3) -> Path:
    """PCam-like: tumor/ and normal/, each with train/ and a held-out folder, one density per split."""
    for cls, name in (("tumour", "tumor"), ("normal", "normal")):
        for i in range(3):
            _tile(root / name / "train" / f"t{i}.png", LEVELS[f"{cls}_train"])
        for i in range(n_held):
            _tile(root / name / held / f"h{i}.png", LEVELS[f"{cls}_held"])
    return root


def _flat_textures(root: Path, n: int = 4) -> Path:
    for i in range(n):
        _tile(root / "TUM" / f"a{i}.png", LEVELS["tumour_held"])
        _tile(root / "STR" / f"b{i}.png", LEVELS["normal_train"])
    return root


def _density(rgb: np.ndarray) -> np.ndarray:
    """Each pixel's stain density in units of the hue's OD (1 = the 'normal_held' level)."""
    od = -np.log((rgb.astype(np.float64) + 1) / 256)
    return od.sum(-1) / _OD.sum()


def _nearest(density: np.ndarray) -> np.ndarray:
    names = np.array(list(LEVELS))
    levels = np.array(list(LEVELS.values()))
    return names[np.argmin(np.abs(np.log(density[..., None] / levels)), axis=-1)]


def _render(slide: TexturedSlide) -> np.ndarray:
    h, w = slide.shape
    out = np.zeros((h, w, 3), np.uint8)
    for ty in range(h // 256):
        for tx_ in range(w // 256):
            out[ty * 256:(ty + 1) * 256, tx_ * 256:(tx_ + 1) * 256] = slide.render_tile(ty, tx_)
    return out


def _blocks(img: np.ndarray, ds: int) -> np.ndarray:
    h, w = img.shape[0] // ds, img.shape[1] // ds
    return img[:h * ds, :w * ds].reshape(h, ds, w, ds, -1).mean(axis=(1, 3))


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.astype(bool).copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out &= np.roll(np.roll(mask.astype(bool), dy, 0), dx, 1)
    return out


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------------- pixels and truth


@pytest.mark.parametrize("share", [None, (0.2, 0.3)])  # a larger tumour (--tumour-share) is filled the same way
def test_tumour_tiles_fill_exactly_the_ground_truth(tmp_path, share):
    tex = open_textures(_flat_textures(tmp_path / "tex"), splits=[TRAIN], tile_mpp=0.5)
    model = SlideModel((1024, 1024), seed=6, malignant=True, tumour_share=share)
    slide = TexturedSlide(model, tex.pools[TRAIN])
    img = _render(slide)
    ds = model.gt_downsample
    gt = model.ground_truth().astype(bool)
    # pixels fully inside tissue (outline and holes), block by block
    opacity = np.zeros(model.shape, np.float32)
    for ty in range(4):
        ys = np.arange(ty * 256, ty * 256 + 256, dtype=np.float64)
        opacity[ty * 256:(ty + 1) * 256] = model.tissue_opacity(ys, np.arange(1024, dtype=np.float64))
    solid = _blocks(opacity[..., None], ds)[..., 0] >= 1.0
    kind = _nearest(_density(_blocks(img, ds)))
    tumour = _erode(gt, 1) & solid  # a block away from the boundary: the feather is a few µm
    normal = _erode(~gt, 1) & solid
    assert tumour.sum() > 100 and normal.sum() > 3000
    assert (kind[tumour] == "tumour_held").mean() > 0.99
    assert (kind[normal] == "normal_train").mean() > 0.99
    # and the boundary is sharp: within one block of it, blocks are one or the other or a blend of them
    band = ~(_erode(gt, 1) | _erode(~gt, 1)) & solid
    assert set(np.unique(kind[band])) <= {"tumour_held", "tumour_train", "normal_held", "normal_train"}
    # outside tissue: the generator's glass, bit for bit
    glass = np.concatenate([np.concatenate([model.glass(ty * 256, tx_ * 256) for tx_ in range(4)], axis=1)
                            for ty in range(4)])
    outside = opacity == 0
    assert outside.mean() > 0.3 and np.array_equal(img[outside], glass[outside])


def test_deterministic_and_tiles_need_no_neighbours(tmp_path):
    """A tile rendered alone on a fresh slide equals the same tile of a whole render by 3 threads."""
    root = _split_textures(tmp_path / "tex")
    tex = open_textures(root, splits=[TRAIN], tile_mpp=0.9)
    # a real texture for the detail: noise tiles (stamps, rotations and blending all show)
    rng = np.random.default_rng(0)
    for pool in (tex.pools[TRAIN].tumour, *tex.pools[TRAIN].normal):
        pool.tiles = [rng.integers(0, 256, t.shape, dtype=np.uint8) for t in pool.tiles]
    path = tmp_path / "whole.tiff"
    big = TexturedSlide(SlideModel((1024, 768), seed=6, malignant=True), tex.pools[TRAIN])
    write_pyramid(path, (1024, 768), big.render_tile, compression="zlib", workers=3)
    whole = tifffile.imread(path, key=0)
    other = TexturedSlide(SlideModel((1024, 768), seed=7, malignant=True), tex.pools[TRAIN])
    for ty, tx_ in [(1, 1), (2, 1), (0, 2), (3, 0)]:
        alone = TexturedSlide(SlideModel((1024, 768), seed=6, malignant=True), tex.pools[TRAIN])
        tile = alone.render_tile(ty, tx_)
        assert np.array_equal(tile, whole[ty * 256:(ty + 1) * 256, tx_ * 256:(tx_ + 1) * 256])
    assert not np.array_equal(whole[256:512, 256:512], other.render_tile(1, 1))


# ------------------------------------------------------------------------------------------ splits


def test_train_slides_use_training_tiles_and_test_slides_held_out_tiles(tmp_path, capsys):
    root = _split_textures(tmp_path / "tex", held="test")
    out = tmp_path / "cohort"
    argv = ["synth", str(out), "--slides", "4", "--size", "768", "--seed", "3", "--textures", str(root),
            "--tile-mpp", "0.5", "--workers", "2"]
    assert main(argv) == 0
    assert "textured" in capsys.readouterr().out
    rows = _rows(out / "cohort.csv")
    assert list(rows[0]) == ["slide_id", "path", "label", "gt_mask", "gt_downsample", "split", "textures",
                             "texture_tiles"]
    assert sorted(r["label"] for r in rows) == ["0", "0", "1", "1"]
    assert {r["split"] for r in rows} == {"train", "test"}  # 2 per label: one train, one test each
    manifest = json.loads((out / "textures.json").read_text())
    assert manifest["tumour_class"] == "tumor" and manifest["normal_classes"] == ["normal"]
    assert manifest["tiles"][TRAIN]["tumor"] == [f"tumor/train/t{i}.png" for i in range(3)]
    assert manifest["tiles"][HELD_OUT]["normal"] == [f"normal/test/h{i}.png" for i in range(3)]
    assert VAL not in manifest["tiles"]  # no validation slides in this cohort
    for r in rows:
        assert r["textures"] == str(root.resolve())
        assert r["texture_tiles"] == (HELD_OUT if r["split"] == "test" else TRAIN)
        assert manifest["slides"][r["slide_id"]] == {"split": r["split"], "tiles": r["texture_tiles"]}
        img = tifffile.imread(out / r["path"], key=0)
        gt = tifffile.imread(out / r["gt_mask"], key=0).astype(bool)
        dens = _density(_blocks(img, int(r["gt_downsample"])))
        # blocks inside tissue (not its edge, nor a hole's) and away from the tumour's boundary: blends of
        # tissue and glass, or of tumour and normal, may land on any level
        judged = _erode(dens > 0.35, 1) & (_erode(gt, 2) | _erode(~gt, 2))
        assert judged.sum() > 500
        kinds = _nearest(dens[judged])
        wanted = {"normal_train", "tumour_train"} if r["split"] != "test" else {"normal_held", "tumour_held"}
        assert np.isin(kinds, list(wanted)).mean() > 0.99, (r["split"], np.unique(kinds, return_counts=True))
        if r["label"] == "1" and _erode(gt, 2).any():
            tumour_kind = "tumour_train" if r["split"] != "test" else "tumour_held"
            assert (_nearest(dens[_erode(gt, 2) & judged]) == tumour_kind).mean() > 0.99
    # the same arguments give the same cohort
    again = tmp_path / "again"
    assert main([*argv[:1], str(again), *argv[2:]]) == 0
    assert (again / "slide_001.tiff").read_bytes() == (out / "slide_001.tiff").read_bytes()


def test_flat_class_folders_split_by_a_hash_of_the_file_names(tmp_path):
    root = _flat_textures(tmp_path / "tex", n=5)
    layout = scan_textures(root)
    assert layout.tumour.name == "TUM" and [c.name for c in layout.normal] == ["STR"]
    for cls in (layout.tumour, *layout.normal):
        train, val, held = set(cls.files[TRAIN]), set(cls.files[VAL]), set(cls.files[HELD_OUT])
        assert not train & held
        assert (len(train), len(held)) == (3, 2) and train | held == set(cls.folder.iterdir())
        assert val == train and cls.val_shared  # 2 held-out tiles are too few to spare some for validation
        assert not cls.split_folders
    assert scan_textures(root).tumour.files == layout.tumour.files  # deterministic


@pytest.mark.parametrize("n_held", [8, 3])
def test_validation_slides_show_tiles_no_training_slide_shows(tmp_path, n_held):
    """Validation slides drawn from the training tiles would let a model that memorised them look perfect; with
    fewer than 8 held-out tiles per class, all stay the test's and validation shares the training tiles (said)."""
    root = _split_textures(tmp_path / "tex", held="valid", n_held=n_held)
    layout = scan_textures(root)
    own = n_held >= 8
    for cls in (layout.tumour, *layout.normal):
        assert cls.val_shared is not own
        if own:  # a quarter of the held-out folder, apart from the test's tiles
            assert len(cls.files[VAL]) == 2 and len(cls.files[HELD_OUT]) == 6
            assert {f.parent.name for f in cls.files[VAL]} == {"valid"}
            assert not set(cls.files[VAL]) & set(cls.files[HELD_OUT])
        else:
            assert cls.files[VAL] == cls.files[TRAIN] and len(cls.files[HELD_OUT]) == 3
    out = tmp_path / "cohort"
    assert main(["synth", str(out), "--slides", "8", "--size", "512", "--seed", "3", "--textures", str(root),
                 "--tile-mpp", "0.5", "--workers", "2", "--split", "train"]) == 0
    rows = _rows(out / "cohort.csv")
    assert sorted(r["split"] for r in rows) == ["train"] * 6 + ["val"] * 2
    manifest = json.loads((out / "textures.json").read_text())
    said = set(manifest["val_tiles"].values())
    if own:
        assert not set(sum(manifest["tiles"][VAL].values(), [])) & set(sum(manifest["tiles"][TRAIN].values(), []))
        assert said == {"their own quarter of the held-out tiles (by name hash)"}
    else:
        assert len(said) == 1 and next(iter(said)).startswith("the training tiles: fewer than 8 held-out tiles")
    for r in rows:
        assert r["texture_tiles"] == (VAL if r["split"] == "val" and own else TRAIN)
        img = tifffile.imread(out / r["path"], key=0)
        gt = tifffile.imread(out / r["gt_mask"], key=0).astype(bool)
        dens = _density(_blocks(img, int(r["gt_downsample"])))
        judged = _erode(dens > 0.35, 1) & (_erode(gt, 2) | _erode(~gt, 2))  # not tissue edges nor blends
        assert judged.sum() > 100
        kinds = _nearest(dens[judged])  # the split fixture paints held-out tiles at their own densities
        mine = "held" if r["split"] == "val" and own else "train"
        share = np.isin(kinds, [f"normal_{mine}", f"tumour_{mine}"]).mean()
        assert share > 0.95, np.unique(kinds, return_counts=True)


@pytest.mark.parametrize("split, expected", [("all", {"train", "val", "test"}), ("train", {"train", "val"}),
                                             ("test", {"test"})])
def test_cohort_splits_are_stratified_and_seeded(split, expected):
    labels = [0] * 10 + [1] * 10
    splits = cohort_splits(labels, seed=1, split=split)
    assert set(splits) == expected
    assert splits == cohort_splits(labels, seed=1, split=split)
    for label in (0, 1):
        mine = [s for s, lab in zip(splits, labels) if lab == label]
        if split == "all":
            assert (mine.count("train"), mine.count("val"), mine.count("test")) == (5, 2, 3)
    assert cohort_splits(labels, seed=2, split="all") != cohort_splits(labels, seed=1, split="all")


def test_tile_mpp_from_resolution_tags(tmp_path):
    root = tmp_path / "tex"
    for cls, level in (("tumour", 2.0), ("stroma", 0.6)):
        for i in range(2):
            _tile(root / cls / f"{i}.tif", level, fmt="TIFF", dpi=(25400 / 0.25, 25400 / 0.25))
    tex = open_textures(root, splits=[TRAIN, HELD_OUT], mpp=0.5)
    assert tex.tile_mpp == pytest.approx(0.25, rel=1e-3) and tex.mpp_source == "resolution tags"
    bogus = tmp_path / "bogus"
    for cls in ("tumour", "stroma"):
        for i in range(2):
            _tile(bogus / cls / f"{i}.tif", 1.0, fmt="TIFF", dpi=(72, 72))  # an image tool's default
    with pytest.raises(WsimilError, match=r"tiles of unknown µm/px: pass --tile-mpp"):
        open_textures(bogus, splits=[TRAIN], mpp=0.5)


# --------------------------------------------------------------------------------------- bad input


def _no_tumour(root: Path) -> None:
    for cls in ("stroma", "lympho"):
        for i in range(2):
            _tile(root / cls / f"{i}.png", 1.0)


def _corrupt(root: Path) -> None:
    _flat_textures(root, n=1)  # one good STR tile and the broken one: a train and a held-out tile, both used
    (root / "STR" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for i in range(1, 4):
        _tile(root / "TUM" / f"a{i}.png", LEVELS["tumour_held"])


def _one_class(root: Path) -> None:
    for i in range(2):
        _tile(root / "tumour" / f"{i}.png", 1.0)
        _tile(root / "08_EMPTY" / f"{i}.png", 0.01)


def _empty_class(root: Path) -> None:
    _flat_textures(root)
    (root / "MUC").mkdir()


def _no_test_split(root: Path) -> None:
    _split_textures(root)
    for f in (root / "normal" / "valid").iterdir():
        f.unlink()
    (root / "normal" / "valid").rmdir()


@pytest.mark.parametrize("make, extra, words", [
    (_no_tumour, [], "no tumour class"),
    (_corrupt, [], "broken.png"),
    (_one_class, [], "at least 2 tissue class folders"),
    (_flat_textures, ["--tile-mpp", None], "tiles of unknown µm/px: pass --tile-mpp"),
    (_empty_class, [], "MUC holds no images"),
    (_no_test_split, [], "has no valid or val or test split folder"),
    (_flat_textures, ["--tumour-class", "LYM"], "tumour class 'LYM' is not a class folder"),
])
def test_bad_textures_give_one_line_and_write_nothing(tmp_path, capsys, make, extra, words):
    root = tmp_path / "tex"
    make(root)
    out = tmp_path / "cohort"
    argv = ["synth", str(out), "--slides", "4", "--size", "512", "--textures", str(root)]
    if extra[1:] == [None]:
        extra = []  # no --tile-mpp: the tags must say, and PNGs without pHYs do not
    else:
        argv += ["--tile-mpp", "0.5"]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_texture_options_need_textures_and_procedural_looks_do_not_mix(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "a"), "--tile-mpp", "0.5"]) == 2
    assert "add --textures DIR" in capsys.readouterr().err
    root = _flat_textures(tmp_path / "tex")
    assert main(["synth", str(tmp_path / "b"), "--textures", str(root), "--tile-mpp", "0.5",
                 "--tumour-contrast", "0.5"]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    with pytest.raises(WsimilError, match="--split must be one of"):
        synthesize_cohort(tmp_path / "c", 2, textures=root, tile_mpp=0.5, split="valid")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------- real data


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real texture set {name} not found: ../shared/data/{name} is absent beside the checkout")
    return path


def test_pcam_textures(tmp_path):
    root = _shared("pcam")
    with pytest.raises(WsimilError, match="tiles of unknown µm/px"):  # JFIF holds an aspect ratio only
        open_textures(root, splits=[TRAIN], mpp=0.5, pool_mib=1)
    tex = open_textures(root, splits=[TRAIN, VAL, HELD_OUT], tile_mpp=0.97, mpp=0.5, pool_mib=6)
    assert tex.layout.tumour.name == "tumor" and [c.name for c in tex.layout.normal] == ["normal"]
    train, val, held = tex.pools[TRAIN], tex.pools[VAL], tex.pools[HELD_OUT]
    assert all(f.parent.name == "train" for f in train.tumour.files + train.normal[0].files)
    assert all(f.parent.name == "valid" for f in val.tumour.files + val.normal[0].files)
    assert not set(val.tumour.files) & set(tex.layout.tumour.files[HELD_OUT])  # never a test tile
    assert len(tex.layout.tumour.files[VAL]) == round(0.25 * 1407)
    assert all(f.parent.name == "valid" for f in held.tumour.files + held.normal[0].files)
    model = SlideModel((1024, 1024), seed=6, malignant=True)
    slide = TexturedSlide(model, train)
    img = _render(slide)
    assert np.array_equal(img[:256, :256], TexturedSlide(model, train).render_tile(0, 0))
    ds = model.gt_downsample
    gt = model.ground_truth().astype(bool)
    tissue = _erode(model.tissue_mask_gt().astype(bool), 1)
    grey = _blocks(img, ds).mean(-1)
    assert grey[tissue].mean() < 215 < grey[_erode(~tissue, 2)].mean()  # stained tissue on pale glass
    assert grey[_erode(gt, 1) & tissue].std() > 5  # real texture, not a flat fill


def test_kather_textures_leave_out_the_empty_class():
    root = _shared("kather2016")
    layout = scan_textures(root)
    assert layout.tumour.name == "01_TUMOR" and layout.excluded == ("08_EMPTY",)
    assert len(layout.normal) == 6
    with pytest.raises(WsimilError, match="tiles of unknown µm/px"):  # 72 dpi is not a microscope's
        open_textures(root, splits=[TRAIN], mpp=0.5)
