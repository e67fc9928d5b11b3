"""CLAM / TIAToolbox feature files in and out: ``wsimil features-import`` / ``features-export``, and a run that
starts from imported features. Real slides, real projects, the real command line; the foreign files are
written with h5py and torch exactly as CLAM's ``extract_features_fp.py`` writes them."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

h5py = pytest.importorskip("h5py")
torch = pytest.importorskip("torch")

from napari_wsimil.cli import main  # noqa: E402
from napari_wsimil.features.bags import read_bag  # noqa: E402
from napari_wsimil.project import Project  # noqa: E402

from conftest import real_slide  # noqa: E402


def clam_h5(path: Path, features: np.ndarray, coords: np.ndarray, **extra: np.ndarray) -> Path:
    """What CLAM writes: 'features' float32 (N, D), 'coords' int64 (N, 2) with patch attrs on coords (CLAM's
    create_patches also stores text and arrays of text there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("features", data=features)
        c = h5.create_dataset("coords", data=coords)
        c.attrs["patch_size"] = 256
        c.attrs["patch_level"] = 0
        c.attrs["name"] = b"CMU-1-Small-Region"
        c.attrs["level_dim"] = np.array([2220, 2967])
        c.attrs["tags"] = np.array([b"a", b"b"])
        c.attrs["nan"] = np.float64("nan")
        for k, v in extra.items():
            h5.create_dataset(k, data=v)
    return path


@pytest.fixture
def svs_project(tmp_path: Path) -> Path:
    """A project with one real slide (CMU-1-Small-Region.svs, 2220 x 2967 px at 0.499 µm/px)."""
    root = tmp_path / "proj"
    p = Project.create(root)
    p.add_slide(real_slide("CMU-1-Small-Region.svs"), slide_id="cmu1")
    p.close()
    return root


def grid(n: int, step: int = 256) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(0, 2048, step), np.arange(0, 2560, step))
    return np.stack([xs.ravel(), ys.ravel()], 1)[:n].astype(np.int64)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_import_h5_and_pt_onto_a_real_slide(svs_project: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    feats, coords = rng.normal(size=(30, 48)).astype(np.float32), grid(30)
    # named after the slide file, as CLAM names its outputs
    clam = tmp_path / "clam"
    clam_h5(clam / "h5_files" / "CMU-1-Small-Region.h5", feats, coords)
    code, out = run(["features-import", str(svs_project), str(clam), "--name", "clam-r50", "--patch", "256",
                     "--mpp", "0.5"], capsys)
    assert code == 0, out
    assert "--encoder imported:clam-r50" in out
    bag = read_bag(svs_project / "features" / "imported_clam-r50" / "cmu1.npz")
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    a = bag.attrs
    assert a["encoder"] == "imported:clam-r50" and a["patch_size"] == 256 and a["mpp"] == 0.5
    assert a["slide_mpp"] == pytest.approx(0.499, abs=1e-3) and a["source_format"] == "h5"
    assert a["coords.patch_level"] == 0 and a["slide_id"] == "cmu1"
    assert a["coords.name"] == "CMU-1-Small-Region" and a["coords.level_dim"] == [2220, 2967]
    assert a["coords.tags"] == ["a", "b"] and "coords.nan" not in a  # JSON cannot hold NaN: left out

    # a bare .pt tensor: its coords come from the .h5 of the same name in CLAM's sibling h5_files folder
    feats2 = rng.normal(size=(30, 48)).astype(np.float32)
    (clam / "pt_files").mkdir()
    torch.save(torch.from_numpy(feats2), clam / "pt_files" / "CMU-1-Small-Region.pt")
    code, out = run(["features-import", str(svs_project), str(clam / "pt_files" / "CMU-1-Small-Region.pt"),
                     "--name", "clam-r50", "--patch", "256", "--mpp", "0.5"], capsys)
    assert code == 0, out
    bag = read_bag(svs_project / "features" / "imported_clam-r50" / "cmu1.npz")
    np.testing.assert_array_equal(bag.features, feats2)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.attrs["source_format"] == "pt" and bag.attrs["coords_file"].endswith("CMU-1-Small-Region.h5")


def _write_bad(kind: str, folder: Path) -> tuple[Path, list[str]]:
    """A bad file of ``kind`` for slide cmu1, and the extra command-line arguments it needs."""
    rng = np.random.default_rng(1)
    f, c = rng.normal(size=(10, 8)).astype(np.float32), grid(10)
    p = folder / "cmu1.h5"
    if kind == "no coords":
        with h5py.File(p, "w") as h5:
            h5.create_dataset("features", data=f)
    elif kind == "lengths":
        clam_h5(p, f, c[:7])
    elif kind == "nan":
        f[3, 2] = np.nan
        clam_h5(p, f, c)
    elif kind == "dtype":
        with h5py.File(p, "w") as h5:
            h5.create_dataset("features", data=np.array([b"a", b"b"]))
            h5.create_dataset("coords", data=c[:2])
    elif kind == "outside":
        clam_h5(p, f, c * 10)
    elif kind == "not hdf5":
        p.write_bytes(b"CLAM? no, a text file\n")
    elif kind == "pt without coords":
        p = folder / "cmu1.pt"
        torch.save(torch.from_numpy(f), p)
    elif kind == "pt pickle":
        p = folder / "cmu1.pt"
        with open(p, "wb") as fh:  # a pickled object that is not a tensor: weights_only refuses it
            torch.save({"features": torch.from_numpy(f), "obj": Path("x")}, fh)
    elif kind == "1-d pt":
        p = folder / "cmu1.pt"
        torch.save(torch.zeros(10), p)
    return p, []


@pytest.mark.parametrize("kind, words", [
    ("no coords", "no 'coords' dataset"), ("lengths", "10 feature rows but 7 coords"),
    ("nan", "1 of 10 feature rows hold NaN"), ("dtype", "not numbers"), ("outside", "not level-0"), ("not hdf5", "not a readable HDF5"),
    ("pt without coords", "no patch positions"), ("pt pickle", "not a readable .pt"),
    ("1-d pt", "patches x dimensions")])
def test_bad_files_one_line_nothing_written(kind: str, words: str, svs_project: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    store = svs_project / "features" / "imported_x"
    bad, extra = _write_bad(kind, folder)
    code, out = run(["features-import", str(svs_project), str(bad), "--name", "x", "--patch", "256",
                     "--mpp", "0.5", *extra], capsys)
    assert code == 2
    lines = out.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("wsimil features-import: error:"), out
    assert not store.exists()


def test_unknown_slide_and_bad_name(svs_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = clam_h5(tmp_path / "other-slide.h5", np.ones((2, 4), np.float32), grid(2))
    code, out = run(["features-import", str(svs_project), str(f), "--name", "x", "--patch", "256", "--mpp", "0.5"],
                    capsys)
    assert code == 2 and "matches no slide" in out and "cmu1" in out
    code, out = run(["features-import", str(svs_project), str(f), "--name", "a/b", "--patch", "256",
                     "--mpp", "0.5", "--slide", "cmu1"], capsys)
    assert code == 2 and "--name 'a/b' is not usable" in out
    code, out = run(["features-import", str(svs_project), str(f), "--name", "x", "--patch", "256", "--mpp", "0.5",
                     "--slide", "cmu1"], capsys)
    assert code == 0, out
    # another width under the same name would break training later: refused now, the first bag intact
    g = clam_h5(tmp_path / "g.h5", np.ones((2, 5), np.float32), grid(2))
    p = Project.open(svs_project)
    p.add_slide(real_slide("tcga-cr-7395-01a-01-ts1.svs"), slide_id="tcga")
    p.close()
    code, out = run(["features-import", str(svs_project), str(g), "--name", "x", "--patch", "256", "--mpp", "0.5",
                     "--slide", "tcga"], capsys)
    assert code == 2 and "width 4" in out
    assert not (svs_project / "features" / "imported_x" / "tcga.npz").exists()


# ------------------------------------------------------------------------------ a run from imported features
@pytest.fixture(scope="module")
def labelled_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real (synthetic-cohort) slide files with slide labels 0/1 in a project."""
    from napari_wsimil.slide.synthetic import synthesize_cohort

    base = tmp_path_factory.mktemp("interop")
    csv_path = synthesize_cohort(base / "cohort", 6, seed=3, size=1024, workers=1)
    Project.create_from_csv(base / "proj", csv_path).close()
    return base / "proj"


def test_export_import_train_predict(labelled_project: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    proj = tmp_path / "proj"
    shutil.copytree(labelled_project, proj)
    code, out = run(["features", str(proj), "--encoder", "handcrafted", "--patch", "128", "--mpp", "1.0",
                     "--device", "cpu"], capsys)
    assert code == 0, out
    ours = {p.stem: read_bag(p) for p in (proj / "features" / "handcrafted").glob("*.npz")}
    assert len(ours) == 6

    # export: CLAM's layout, readable by h5py and torch.load(weights_only=True)
    clam = tmp_path / "clam"
    code, out = run(["features-export", str(proj), "--encoder", "handcrafted", "--out", str(clam)], capsys)
    assert code == 0, out
    sid, bag = next(iter(ours.items()))
    with h5py.File(clam / "h5_files" / f"{sid}.h5", "r") as h5:
        np.testing.assert_array_equal(h5["features"][()], bag.features)
        np.testing.assert_array_equal(h5["coords"][()], bag.coords)
        assert h5["features"].dtype == np.float32 and h5["coords"].dtype == np.int64
        assert h5["coords"].attrs["patch_level"] == 0
        # 128 px at 1.0 µm/px on a 0.5 µm/px slide: 256 level-0 pixels
        assert h5["coords"].attrs["patch_size"] == 256
        assert h5.attrs["encoder"] == "handcrafted" and h5.attrs["mpp"] == 1.0
    pt = torch.load(clam / "pt_files" / f"{sid}.pt", weights_only=True)
    np.testing.assert_array_equal(pt.numpy(), bag.features)

    # import the .pt files (coords from ../h5_files) back under another name: the same numbers
    code, out = run(["features-import", str(proj), str(clam / "pt_files"), "--name", "hc", "--patch", "128",
                     "--mpp", "1.0"], capsys)
    assert code == 0, out
    for s, b in ours.items():
        back = read_bag(proj / "features" / "imported_hc" / f"{s}.npz")
        np.testing.assert_array_equal(back.features, b.features)
        np.testing.assert_array_equal(back.coords, b.coords)

    # a run starts from them (nothing is extracted), and predicts from them
    run_dir, pred = tmp_path / "run", tmp_path / "pred"
    # (no --patch / --mpp: a run on imported features takes those they were imported at)
    code, out = run(["train", str(proj), "--method", "abmil", "--out", str(run_dir), "--epochs", "2",
                     "--encoder", "imported:hc", "--device", "cpu"], capsys)
    assert code == 0, out
    assert "imported imported:hc bags" in out
    info = json.loads((run_dir / "run.json").read_text())
    assert info["encoder"] == "imported:hc" and info["features_dir"].endswith("imported_hc")
    assert info["patch"] == 128 and info["mpp"] == 1.0
    code, out = run(["predict", str(run_dir), "--cohort", str(proj), "--out", str(pred), "--device", "cpu",
                     "--ome-zarr"], capsys)
    assert code == 0, out
    with open(pred / "predictions.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    assert len(list((pred / "heatmaps").glob("*.tif"))) == 6
    # --ome-zarr: each heatmap also as OME-Zarr, the same pixels and µm/px as its OME-TIFF
    from napari_wsimil.io.ngff import read_ngff_levels
    from napari_wsimil.slide.heatmap_file import heatmap_description

    tif = sorted((pred / "heatmaps").glob("*.tif"))[0]
    levels, attrs = read_ngff_levels(tif.with_name(tif.stem + ".ome.zarr"))
    np.testing.assert_array_equal(levels[0][:], tifffile.imread(tif, level=0))
    meta = heatmap_description(tif)
    assert attrs["wsimil"] == meta and attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0][
        "scale"] == pytest.approx([meta["mpp"], meta["mpp"]])

    # the wrong patch size says which one the imported bags have; a slide without a bag says how to add it
    code, out = run(["train", str(proj), "--method", "abmil", "--out", str(tmp_path / "r2"), "--epochs", "1",
                     "--encoder", "imported:hc", "--patch", "256", "--mpp", "1.0", "--device", "cpu"], capsys)
    assert code == 2 and "run with --patch 128 --mpp 1.0" in out
    gone = sorted((proj / "features" / "imported_hc").glob("*.npz"))[0]
    gone.unlink()
    code, out = run(["train", str(proj), "--method", "abmil", "--out", str(tmp_path / "r3"), "--epochs", "1",
                     "--encoder", "imported:hc", "--patch", "128", "--mpp", "1.0", "--device", "cpu"], capsys)
    assert code == 2 and f"no imported:hc features for {gone.stem}" in out and "features-import" in out


def test_export_refusals(labelled_project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["features-export", str(labelled_project), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "give --encoder" in out
    code, out = run(["features-export", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no feature bags" in out
    assert not (tmp_path / "o").exists()


def test_imported_sets_lists_what_the_bags_record(svs_project: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The Training widget's encoder list of imported sets comes from this plain function: one entry per
    imported name, with where the files came from and the patch size and µm/px the bags were made at."""
    from napari_wsimil.features.interop import imported_sets

    assert imported_sets(svs_project) == []  # no features folder yet
    (svs_project / "features" / "imported_half-done").mkdir(parents=True)  # no bag: not a set
    (svs_project / "features" / "handcrafted").mkdir()  # our own encoder's bags: not imported
    rng = np.random.default_rng(1)
    clam = tmp_path / "clam"
    clam_h5(clam / "h5_files" / "CMU-1-Small-Region.h5", rng.normal(size=(12, 16)).astype(np.float32), grid(12))
    code, out = run(["features-import", str(svs_project), str(clam), "--name", "uni", "--patch", "224",
                     "--mpp", "0.499"], capsys)
    assert code == 0, out
    (found,) = imported_sets(svs_project)
    assert found.encoder == "imported:uni" and found.name == "uni" and found.slides == ("cmu1",)
    assert (found.patch_size, found.mpp) == (224, 0.499) and found.formats == ("h5",)
    assert found.sources == (str((clam / "h5_files").resolve()),)
    text = found.describe()
    assert "224 px patches at 0.499 µm/px" in text and str((clam / "h5_files").resolve()) in text
    assert "no weights" in text

    # a damaged bag is named, the set is still listed
    (found.folder / "broken.npz").write_bytes(b"not a zip")
    (again,) = imported_sets(svs_project)
    assert again.unreadable == ("broken",) and again.slides == ("cmu1",) and "broken" in again.describe()

    from napari_wsimil.workflow.session import encoder_problem

    assert encoder_problem("imported:uni") is None  # not in the encoder registry, yet a valid choice
    assert "take no weights" in encoder_problem("imported:uni", tmp_path / "w.pt")
