"""``wsimil project``: create from CSV, info, exports; errors are one line with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_wsimil.cli import main
from napari_wsimil.project import Annotation, Project


def test_create_info_export(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proj = tmp_path / "proj"
    assert main(["project", "create", str(proj), "--from-csv", str(cohort), "--label-mpp", "8"]) == 0
    assert "3 slides" in capsys.readouterr().out
    with Project.open(proj) as p:
        assert p.label_mpp == 8.0
        lab = p.pixel_labels("slide_001")
        lab[5:20, 5:30] = 1
        p.save_pixel_labels("slide_001", lab)
        p.save_annotations("slide_001", [Annotation.box(1, 2, 3, 4, "tumour")])
        # while the project is open for writing, read-only commands still work
        assert main(["project", "info", str(proj), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["label_mpp"] == 8.0 and [s["pixel_labels"] for s in info["slides"]] == [False, True, False]
        assert main(["project", "info", str(proj)]) == 0
        out = capsys.readouterr().out
        assert "slide_001" in out and "labels annotations" in out
        assert main(["project", "export", str(proj), "--format", "ome-tiff", "--out", str(tmp_path / "m")]) == 0
        assert main(["project", "export", str(proj), "--format", "png", "--out", str(tmp_path / "png"), "--mpp", "16"]) == 0
        assert main(["project", "export", str(proj), "--format", "geojson", "--out", str(tmp_path / "gj")]) == 0
        assert main(["project", "export-csv", str(proj)]) == 0
        assert main(["project", "export-csv", str(proj), "--out", str(tmp_path / "c" / "c.csv"), "--masks"]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir())[-1] == "slide_002.ome.tif"
    assert len(list((tmp_path / "png").glob("*.png"))) == 3 and len(list((tmp_path / "gj").iterdir())) == 3
    assert (proj / "cohort.csv").read_text().startswith("slide_id,path,label,split")
    assert main(["project", "create", str(tmp_path / "again"), "--from-csv", str(tmp_path / "c" / "c.csv"),
                 "--label-mpp", "8"]) == 0
    with Project.open(tmp_path / "again") as q:
        assert np.array_equal(q.pixel_labels("slide_001"), lab)


def test_errors_are_one_line(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Project.create(tmp_path / "p").close()
    assert main(["project", "create", str(tmp_path / "p"), "--from-csv", str(cohort)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wsimil project: error:") and "already holds a project" in err and err.count("\n") == 1
    assert main(["project", "info", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["project", "export", str(tmp_path / "p"), "--format", "tiff", "--out", "x"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["project"]) == 2
    assert main(["project", "create", str(tmp_path / "q"), "--from-csv", str(cohort), "--label-mpp", "-1"]) == 2
    assert "positive" in capsys.readouterr().err
