"""The package layout is the architecture: each folder imports only the layers below it.

Read from the source (every ``import``, including those inside functions), so a lazy import that
reaches upward fails here as surely as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hotpatch

PACKAGE_ROOT = Path(hotpatch.__file__).parent

# What each part of hotpatch may import from hotpatch itself. Top-level modules are named by their
# module name; subpackages by their folder. ``hotpatch/__init__`` (the facade), ``__main__`` and the
# pytest plugin sit above everything and are not listed.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "rundir": {"errors"},
    "health": set(),
    "judge": set(),
    "routing": set(),
    "_version": set(),
    "engine": {"errors"},
    "check": {"engine", "errors"},
    "watch": {"engine", "errors"},
    "control": {"engine", "errors", "rundir"},
    "trial": {"engine", "errors", "health", "judge", "routing"},
    "gunicorn": {"errors", "health", "judge", "rundir", "watch", "control"},
    "demo": {"engine", "errors", "health", "judge", "watch", "control", "gunicorn", "rundir"},
    "cli": {
        "engine",
        "errors",
        "health",
        "watch",
        "control",
        "gunicorn",
        "demo",
        "judge",
        "rundir",
        "_version",
        "check",
    },
}

# ``_log`` (logging that follows the application) is the bottom layer: every part may use it.
ALLOWED["_log"] = set()
for _allowed in ALLOWED.values():
    _allowed.add("_log")


def part_of(module: str) -> str | None:
    """``hotpatch.engine.swap`` -> ``engine``; ``hotpatch.errors`` -> ``errors``; else None."""
    parts = module.split(".")
    if parts[0] != "hotpatch" or len(parts) < 2:
        return None
    return parts[1]


def hotpatch_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use absolute hotpatch.* imports")
    return {name for name in found if name == "hotpatch" or name.startswith("hotpatch.")}


def sources() -> list[Path]:
    return sorted(PACKAGE_ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE_ROOT)))
def test_nothing_imports_upward(path: Path) -> None:
    relative = path.relative_to(PACKAGE_ROOT)
    owner = relative.parts[0] if len(relative.parts) > 1 else relative.stem
    if owner in {"__init__", "__main__", "pytest_plugin"}:
        return
    assert owner in ALLOWED, f"{relative}: a new part of the package; add it to ALLOWED"
    for imported in hotpatch_imports(path):
        target = part_of(imported)
        assert target is not None, f"{relative} imports the hotpatch facade; import the part"
        if target == owner:
            continue
        assert target in ALLOWED[owner], (
            f"{relative} imports {imported}: {owner} may import only {sorted(ALLOWED[owner])}"
        )


def test_every_subpackage_says_what_it_owns_and_may_import() -> None:
    for init in sorted(PACKAGE_ROOT.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert "May import" in doc, f"{init.parent.name}/__init__.py: say what it may import"
        assert "Owns" in doc, f"{init.parent.name}/__init__.py: say what it owns"


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The rule has teeth: a lazy import of cli from engine code is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from hotpatch.cli import main\n", encoding="utf-8")
    assert part_of(next(iter(hotpatch_imports(bad)))) == "cli"
    assert "cli" not in ALLOWED["engine"]
