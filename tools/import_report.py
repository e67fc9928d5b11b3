"""The shape of the package's imports: cycles, private names imported across modules, module sizes.

Read from the source with ``ast`` (every import statement, those inside functions included), so it
sees the lazy imports that a runtime import graph would miss. ``python tools/import_report.py`` prints
the report; ``tests/test_architecture.py`` checks the same figures.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "napari_wsimil"
SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 600


@dataclass
class Graph:
    """Modules, the modules each imports, and the private names each imports from another module."""

    files: dict[str, Path] = field(default_factory=dict)
    imports: dict[str, set[str]] = field(default_factory=dict)
    private: list[tuple[str, str, str]] = field(default_factory=list)  # (importer, module, name)


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _nearest(name: str, files: dict[str, Path]) -> str | None:
    while name and name not in files:
        name = name.rpartition(".")[0]
    return name or None


def build(src: Path = SRC, package: str = PACKAGE) -> Graph:
    g = Graph()
    for path in sorted((src / package).rglob("*.py")):
        g.files[module_name(path, src)] = path
    for mod, path in g.files.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(package):
                        target = _nearest(alias.name, g.files)
                        if target:
                            deps.add(target)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module)
                if not base.startswith(package):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in g.files:  # "from . import module"
                        deps.add(sub)
                        continue
                    target = _nearest(base, g.files)
                    if target:
                        deps.add(target)
                        if alias.name.startswith("_") and not alias.name.startswith("__") and target != mod:
                            g.private.append((mod, target, alias.name))
        deps.discard(mod)
        g.imports[mod] = deps
    return g


def cycles(g: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted. A package's
    ``__init__`` re-exporting its own modules is not a cycle of design: edges from a package to its
    own submodules are left out."""
    edges = {m: {d for d in ds if not d.startswith(m + ".")} for m, ds in g.imports.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def long_modules(g: Graph, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    sizes = ((m, len(p.read_text().splitlines())) for m, p in g.files.items())
    return sorted(((m, n) for m, n in sizes if n > limit), key=lambda t: -t[1])


def _lines(g: Graph) -> Iterator[str]:
    cyc = cycles(g)
    yield f"modules: {len(g.files)}"
    yield f"import cycles: {len(cyc)}"
    for c in cyc:
        yield "  " + " <-> ".join(m.removeprefix(PACKAGE + ".") for m in c)
    names = sorted({n for _, _, n in g.private})
    yield f"private names imported across modules: {len(names)} ({len(g.private)} imports)"
    for imp, mod, name in sorted(g.private):
        yield f"  {name}: {mod.removeprefix(PACKAGE + '.')} -> {imp.removeprefix(PACKAGE + '.')}"
    longs = long_modules(g)
    yield f"modules over {MAX_LINES} lines: {len(longs)}"
    for m, n in longs:
        yield f"  {m.removeprefix(PACKAGE + '.')}: {n}"


if __name__ == "__main__":
    print("\n".join(_lines(build(Path(sys.argv[1]) if len(sys.argv) > 1 else SRC))))


def package_edges(g: Graph, depth: int = 2) -> dict[tuple[str, str], list[str]]:
    """(importer package, imported package) -> importing modules, packages cut at ``depth`` name parts."""
    out: dict[tuple[str, str], list[str]] = {}
    for m, ds in g.imports.items():
        a = ".".join(m.split(".")[:depth])
        for d in ds:
            b = ".".join(d.split(".")[:depth])
            if a != b:
                out.setdefault((a, b), []).append(f"{m.split('.', 1)[1]}->{d.split('.', 1)[1]}")
    return out
