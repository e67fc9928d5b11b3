"""The package's shape holds: imports run downward through the layers written down in pyproject.toml
(import-linter), no module imports in a cycle or takes another module's private name, and no module
grows past 600 lines. tools/import_report.py reads every import statement, those inside functions too."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("import_report", ROOT / "tools" / "import_report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["import_report"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_layers_contract_is_kept() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]'")
    done = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_no_cycles_no_private_imports_no_long_modules() -> None:
    r = _report()
    g = r.build(ROOT / "src")
    assert r.cycles(g) == []
    assert g.private == []
    assert r.long_modules(g) == []


def test_the_report_sees_what_it_checks(tmp_path: Path) -> None:
    """The checks above can fail: a package with a cycle through a lazy import, a private import and a
    long module is reported as such."""
    r = _report()
    pkg = tmp_path / "napari_wsimil"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub.b import public\n\n\ndef _helper():\n    pass\n")
    (pkg / "sub" / "b.py").write_text("def public():\n    from ..a import _helper\n    return _helper\n")
    (pkg / "long.py").write_text("x = 1\n" * 601)
    g = r.build(tmp_path)
    assert r.cycles(g) == [["napari_wsimil.a", "napari_wsimil.sub.b"]]
    assert g.private == [("napari_wsimil.sub.b", "napari_wsimil.a", "_helper")]
    assert r.long_modules(g) == [("napari_wsimil.long", 601)]
