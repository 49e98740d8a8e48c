"""The house rules of docs/ARCHITECTURE.md, read from the code: every import (function-level ones included) goes
to the same package or one below it, no two modules import each other, no script imports another script, and
each script stays a story (under 250 lines).

    pytest -q tests/test_architecture.py
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# bottom to top, as docs/ARCHITECTURE.md lists them (a module belongs to the longest prefix that names it)
FLOORS = ["common", "collection.traces", "collection", "models", "training", "validation.plots",
          "validation.coverage", "validation.prefetch", "validation.routing_report", "offload", "scripts", "tools"]


def room(module: str) -> str | None:
    found = [f for f in FLOORS if module == f or module.startswith(f + ".")]
    return max(found, key=len) if found else None


def modules() -> dict[str, Path]:
    out = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        if room(name) is not None:
            out[name] = path
    return out


def imports(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (absolute imports; the project uses no
    relative ones)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def project_edges() -> set[tuple[str, str]]:
    mods = modules()
    return {(a, b) for a, p in mods.items() for b in imports(p) if b in mods and b != a}


def test_the_floors_are_the_documented_ones():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    for floor in FLOORS:
        assert f"`{floor.replace('.', '/')}" in text, floor


def test_no_import_goes_upward():
    up = sorted(f"{a} -> {b}" for a, b in project_edges() if FLOORS.index(room(b)) > FLOORS.index(room(a)))
    assert not up, "imports going up a floor (docs/ARCHITECTURE.md):\n" + "\n".join(up)


def test_no_two_modules_import_each_other():
    edges = project_edges()
    pairs = sorted({tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges})
    assert not pairs, pairs


def test_scripts_are_thin_entry_points_that_import_no_other_script():
    scripts = sorted((REPO / "scripts").glob("*.py"))
    assert len(scripts) >= 10
    for path in scripts:
        if path.name == "__init__.py":
            continue
        lines = len(path.read_text().splitlines())
        assert lines < 250, f"{path.name}: {lines} lines (a script tells its stage's story; its library is below)"
        others = {m for m in imports(path) if room(m) == "scripts"}
        assert not others, f"{path.name} imports {sorted(others)}"
