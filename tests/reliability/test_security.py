"""Security (issue #21, part 5): no pickle, weights only through weights_only=True, no path from an input file
written through outside its folder, and bags and checkpoints from elsewhere checked before use."""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "napari_wsimil"
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else k.value
    return None


# CLAM's .pt feature files are torch.save archives of one tensor; exporting that format needs torch.save. Writing
# one bare tensor runs nothing on load, and every reader (ours included) opens it with weights_only=True.
ALLOWED_WRITES = {("napari_wsimil/features/interop.py", "torch.save")}


def scan_source(root: Path) -> list[str]:
    """Every use of pickle, and every torch.load / np.load that does not refuse pickled objects, under ``root``."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        where = path.relative_to(root.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            for n in names:
                if n in FORBIDDEN_MODULES:
                    problems.append(f"{where}:{node.lineno} imports {n}")
        for call in _calls(tree):
            name = _dotted(call.func)
            if name.endswith("torch.load"):
                if _kw(call, "weights_only") is not True:
                    problems.append(f"{where}:{call.lineno} torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and _kw(call, "allow_pickle") is not False:
                problems.append(f"{where}:{call.lineno} np.load without allow_pickle=False")
            if name.endswith(("torch.save", "read_pickle", "to_pickle")) and (str(where), name) not in ALLOWED_WRITES:
                problems.append(f"{where}:{call.lineno} {name} writes or reads pickle")
            if _kw(call, "allow_pickle") is True:
                problems.append(f"{where}:{call.lineno} allow_pickle=True")
    return problems


def test_source_has_no_pickle_and_only_safe_loads():
    assert SRC.is_dir()
    assert scan_source(SRC) == []


def test_scanner_catches_what_it_forbids(tmp_path: Path):
    """The scan is only worth something if it finds each forbidden form."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "bad.py").write_text(
        "import pickle\nimport torch, numpy as np\nfrom dill import loads\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('y')\nnp.load('y', allow_pickle=True)\n"
        "torch.save({}, 'z')\ntorch.load('ok', weights_only=True)\nnp.load('ok', allow_pickle=False)\n")
    found = scan_source(pkg)
    assert len(found) == 8, found


def test_project_file_slide_id_cannot_name_a_path(small_project: Path):
    """A project.json edited (or crafted) to hold slide id '../../x' would make every label, export and bag
    path escape the folder; it is refused on open with a message naming the id."""
    from napari_wsimil.errors import ProjectError
    from napari_wsimil.project import Project

    pj = small_project / "project.json"
    data = json.loads(pj.read_text())
    data["slides"][0]["slide_id"] = "../../escaped"
    pj.write_text(json.dumps(data))
    with Project.open(small_project) as p:  # read-only from the previous good copy, the id named as damage
        assert p.readonly and "../../escaped" not in p.slide_ids
        assert "not usable as a file name" in p.damage[0].what
    (small_project / ".project.json.wsimil-prev").unlink()
    with pytest.raises(ProjectError, match="not usable as a file name"):
        Project.open(small_project)
    assert not (small_project.parent.parent / "escaped").exists()


def test_cohort_csv_slide_id_cannot_name_a_path(small_cohort_dir: Path, tmp_path: Path):
    """Training names its bags after the CSV's slide ids: a '../' id is an error naming the line."""
    from napari_wsimil.train.cohort import CohortError, load_cohort

    rows = list(csv.DictReader((small_cohort_dir / "cohort.csv").open()))
    out = tmp_path / "c.csv"
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "path", "label"])
        w.writeheader()
        w.writerow({"slide_id": "../../evil", "path": str(small_cohort_dir / rows[0]["path"]), "label": "1"})
    with pytest.raises(CohortError, match=r"line 2 .*outside the output folder"):
        load_cohort(out)


def _bag(tmp_path: Path, coords, features) -> Path:
    path = tmp_path / "b.npz"
    np.savez(path, coords=coords, features=features, attrs=np.array(json.dumps({"format": 1})))
    return path


@pytest.mark.parametrize("coords,features,match", [
    (np.zeros((3, 2), np.int64), np.array([[0.0, np.nan]] * 3, np.float32), "NaN or infinite"),
    (np.zeros((3, 2), np.int64), np.full((3, 2), np.inf, np.float32), "NaN or infinite"),
    (np.zeros((3, 2), np.int64), np.array([["a", "b"]] * 3), "features are <U1"),
    (np.zeros((3, 3), np.int64), np.zeros((3, 4), np.float32), "coords are int64"),
    (np.zeros((3, 2), np.float64), np.zeros((3, 4), np.float32), "coords are float64"),
    (np.zeros((3, 2), np.int64), np.zeros((2, 4), np.float32), r"expected float \(3, D\)"),
])
def test_foreign_bag_is_checked(tmp_path: Path, coords, features, match):
    from napari_wsimil.features.bags import BagError, read_bag

    with pytest.raises(BagError, match=match):
        read_bag(_bag(tmp_path, coords, features))


def test_foreign_bag_is_checked_by_mil_training(tmp_path: Path):
    from napari_wsimil.mil.training import load_bag_file
    from napari_wsimil.train import TrainingError

    with pytest.raises(TrainingError, match="NaN or infinite"):
        load_bag_file(_bag(tmp_path, np.zeros((2, 2), np.int64), np.array([[1.0], [np.nan]], np.float32)))
    with pytest.raises(TrainingError, match="cannot read the feature bag b.npz"):
        load_bag_file(_bag(tmp_path, np.zeros((2, 2), np.int64), np.array([["x"], ["y"]])))


def test_foreign_checkpoint_is_checked(tmp_path: Path):
    import torch
    from safetensors.torch import save_file

    from napari_wsimil.train import TrainingError, load_model_weights

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    good = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    cases = {
        "shape": ({**good, "model.0.weight": torch.zeros(3, 5)}, r"0\.weight is \(3, 5\), the model needs \(3, 4\)"),
        "nan": ({**good, "model.0.bias": torch.tensor([0.0, float("nan"), 1.0])}, "NaN or infinite"),
        "missing": ({k: v for k, v in good.items() if "bias" not in k}, "weights missing"),
        "dtype": ({**good, "model.0.weight": torch.zeros(3, 4, dtype=torch.int32)}, "int32"),
    }
    for name, (tensors, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(TrainingError, match=match):
            load_model_weights(path, model)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), name
    path = tmp_path / "good.safetensors"
    save_file(good, str(path))
    load_model_weights(path, model)  # the same checks pass a checkpoint that fits
