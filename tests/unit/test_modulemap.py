"""File path -> module names, and dependency order of changed modules."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest

from hotpatch.engine.modulemap import (
    ModuleIndex,
    dependency_order,
    imported_modules,
    is_under,
    normalize,
)


def fake_module(name: str, path: Path | None) -> types.ModuleType:
    module = types.ModuleType(name)
    if path is not None:
        module.__file__ = str(path)
    return module


@pytest.fixture(name="tree")
def _tree(tmp_path: Path) -> Path:
    (tmp_path / "proj" / "pkg").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    for rel in ("proj/app.py", "proj/pkg/__init__.py", "proj/pkg/mod.py", "other/x.py"):
        (tmp_path / rel).write_text("")
    return tmp_path


def test_index_maps_files_under_the_roots_to_module_names(tree: Path) -> None:
    index = ModuleIndex((normalize(str(tree / "proj")),))
    modules = {
        "__main__": fake_module("__main__", tree / "proj" / "app.py"),
        "pkg": fake_module("pkg", tree / "proj" / "pkg" / "__init__.py"),
        "pkg.mod": fake_module("pkg.mod", tree / "proj" / "pkg" / "mod.py"),
        "x": fake_module("x", tree / "other" / "x.py"),
        "sys": fake_module("sys", None),
        "ext": fake_module("ext", tree / "proj" / "ext.so"),
    }
    assert index.refresh(modules) == ["__main__", "pkg", "pkg.mod"]
    assert index.modules_for(normalize(str(tree / "proj" / "app.py"))) == ("__main__",)
    assert index.modules_for(normalize(str(tree / "other" / "x.py"))) == ()
    assert index.path_of("pkg.mod") == normalize(str(tree / "proj" / "pkg" / "mod.py"))
    assert index.refresh(modules) == []  # nothing new


def test_a_file_imported_under_two_names_maps_to_both(tree: Path) -> None:
    index = ModuleIndex((normalize(str(tree / "proj")),))
    app = tree / "proj" / "app.py"
    index.refresh({"__main__": fake_module("__main__", app), "app": fake_module("app", app)})
    assert index.modules_for(normalize(str(app))) == ("__main__", "app")


def test_removed_and_reimported_modules_are_tracked(tree: Path) -> None:
    index = ModuleIndex((normalize(str(tree / "proj")),))
    path = tree / "proj" / "pkg" / "mod.py"
    index.refresh({"pkg.mod": fake_module("pkg.mod", path)})
    assert index.refresh({}) == []
    assert index.modules_for(normalize(str(path))) == ()
    assert index.refresh({"pkg.mod": fake_module("pkg.mod", path)}) == ["pkg.mod"]
    assert index.refresh({"pkg.mod": fake_module("pkg.mod", path)}) == ["pkg.mod"]  # new object


def test_symlinked_module_files_resolve_to_the_real_path(tree: Path) -> None:
    link = tree / "link"
    link.symlink_to(tree / "proj", target_is_directory=True)
    index = ModuleIndex((normalize(str(tree / "proj")),))
    index.refresh({"app": fake_module("app", link / "app.py")})
    assert index.modules_for(normalize(str(tree / "proj" / "app.py"))) == ("app",)


def test_is_under() -> None:
    root = os.path.join(os.sep, "a", "b")
    assert is_under(os.path.join(root, "c.py"), (root,))
    assert is_under(root, (root,))
    assert not is_under(os.path.join(os.sep, "a", "bc", "d.py"), (root,))


@pytest.mark.parametrize(
    ("source", "package", "expected"),
    [
        ("import a.b.c", "", {"a", "a.b", "a.b.c"}),
        ("from x import y, z as w", "", {"x", "x.y", "x.z"}),
        ("from . import sib", "pkg.sub", {"pkg.sub", "pkg.sub.sib"}),
        ("from .m import f", "pkg", {"pkg.m", "pkg.m.f"}),
        ("from ..up import g", "pkg.sub", {"pkg.up", "pkg.up.g"}),
        ("from x import *", "", {"x"}),
        ("def f():\n    import lazy\n", "", {"lazy"}),
        ("from .... import far", "pkg", set()),
        ("def f(:\n", "", set()),
    ],
)
def test_imported_modules(source: str, package: str, expected: set[str]) -> None:
    assert imported_modules(source, package=package) == expected


def test_dependency_order_puts_imports_first() -> None:
    imports = {"app": {"views", "flask"}, "views": {"models"}, "models": set(), "util": set()}
    assert dependency_order(imports) == ["models", "util", "views", "app"]


def test_dependency_order_breaks_cycles_by_name() -> None:
    imports = {"b": {"a"}, "a": {"b"}, "c": {"a"}}
    assert dependency_order(imports) == ["a", "b", "c"]


def test_dependency_order_ignores_self_imports_and_outsiders() -> None:
    assert dependency_order({"m": {"m", "os"}}) == ["m"]
