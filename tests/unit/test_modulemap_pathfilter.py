"""Which paths may trigger a patch: Python sources outside tool, editor and venv clutter."""

from __future__ import annotations

import os

import pytest

from hotpatch.watch.pathfilter import is_ignored, is_python_source

ROOT = os.path.join(os.sep, "proj")


def no_venv(directory: str) -> bool:
    return False


@pytest.mark.parametrize("name", ["app.py", "__init__.py", "a.b.py", "deep_name_123.py"])
def test_python_sources_count(name: str) -> None:
    assert is_python_source(os.path.join(ROOT, name))
    assert not is_ignored(os.path.join(ROOT, "pkg", name), ROOT, is_venv=no_venv)


@pytest.mark.parametrize(
    "name",
    [
        ".app.py.swp",
        ".app.py.swx",
        "app.py~",
        ".#app.py",
        "#app.py#",
        "4913",
        "app.pyc",
        "app.py.tmp",
        "notes.txt",
        ".py",
        "app.py.orig",
    ],
)
def test_editor_clutter_and_other_files_never_count(name: str) -> None:
    assert is_ignored(os.path.join(ROOT, name), ROOT, is_venv=no_venv)


@pytest.mark.parametrize(
    "parts",
    [
        ("__pycache__",),
        (".git",),
        (".git", "hooks"),
        ("lib", "site-packages", "pkg"),
        (".venv",),
        (".tox", "py311"),
    ],
)
def test_tool_directories_never_count(parts: tuple[str, ...]) -> None:
    assert is_ignored(os.path.join(ROOT, *parts, "m.py"), ROOT, is_venv=no_venv)


def test_a_directory_holding_pyvenv_cfg_never_counts() -> None:
    env = os.path.join(ROOT, "env")
    asked: list[str] = []

    def is_venv(directory: str) -> bool:
        asked.append(directory)
        return directory == env

    assert is_ignored(os.path.join(env, "lib", "python3.11", "m.py"), ROOT, is_venv=is_venv)
    assert env in asked
    assert not is_ignored(os.path.join(ROOT, "src", "m.py"), ROOT, is_venv=is_venv)


def test_paths_outside_the_root_never_count() -> None:
    assert is_ignored(os.path.join(os.sep, "elsewhere", "m.py"), ROOT, is_venv=no_venv)
