"""Which file-system paths may trigger a patch: Python sources outside tool and editor clutter.

Pure logic on path strings. The one question that needs the disk (is this directory a virtual
environment?) is asked through a function the caller passes in, so the rules are tested alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable

# Directories whose contents never trigger anything, wherever they appear under a watched root.
IGNORED_DIRS = frozenset(
    {
        "__pycache__",
        ".git",
        ".hg",
        ".svn",
        ".venv",
        "site-packages",
        "dist-packages",
        ".tox",
        ".nox",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        "node_modules",
    }
)

# Editor swap, backup and probe files: vim ``.app.py.swp`` and ``4913``, emacs ``.#app.py`` and
# ``app.py~``, and the suffixes editors and tools put after a name while writing it.
_IGNORED_SUFFIXES = (".swp", ".swo", ".swx", "~", ".tmp", ".bak", ".orig")
_IGNORED_NAMES = frozenset({"4913"})


def is_python_source(path: str) -> bool:
    """Whether ``path`` names a Python source file that is not an editor's swap or backup file."""
    name = os.path.basename(path)
    if name in _IGNORED_NAMES or name.startswith((".#", "#")) or name.endswith(_IGNORED_SUFFIXES):
        return False
    return name.endswith(".py") and name != ".py"


def is_ignored(path: str, root: str, *, is_venv: Callable[[str], bool]) -> bool:
    """Whether a change at ``path`` (under the watched directory ``root``) must be ignored.

    Args:
        path: the absolute path an event reports.
        root: the absolute watched directory ``path`` is under.
        is_venv: ``is_venv(directory)`` tells whether a directory is a virtual environment (holds
            a ``pyvenv.cfg``); asked for each directory between ``root`` and the file.

    Returns:
        ``True`` for anything but a Python source outside ignored and virtual-environment
        directories.
    """
    if not is_python_source(path):
        return True
    relative = os.path.relpath(path, root)
    if relative.startswith(os.pardir + os.sep) or relative == os.pardir:
        return True  # not under the root at all
    parts = relative.split(os.sep)[:-1]
    directory = root
    for part in parts:
        if part in IGNORED_DIRS:
            return True
        directory = os.path.join(directory, part)
        if is_venv(directory):
            return True
    return is_venv(root)
