"""Having hotpatch installed costs nothing until it is used: checked by what gets imported.

Each check runs a fresh interpreter and reads ``sys.modules`` (no timing: the figures are in
``benchmarks/bench_import.py`` and docs/performance.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("asyncio", "gunicorn", "structlog", "watchdog", "socket", "ssl", "subprocess")


def modules_after(code: str, *, setup: str = "", cwd: Path | None = None) -> set[str]:
    """The modules that ``code`` adds to ``sys.modules`` in a fresh interpreter, after ``setup``."""
    program = textwrap.dedent(
        f"""
        import json, sys
        {setup}
        before = set(sys.modules)
        {code}
        print(json.dumps(sorted(set(sys.modules) - before)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=cwd,
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def test_import_hotpatch_imports_nothing_else() -> None:
    assert modules_after("import hotpatch") == {"hotpatch", "hotpatch._version"}


def test_patch_needs_only_the_engine() -> None:
    loaded = modules_after("from hotpatch import patch")
    assert heavy(loaded) == []
    parts = {m.split(".")[1] for m in loaded if m.startswith("hotpatch.")}
    assert parts == {"_version", "_log", "engine", "errors"}, parts


def test_patching_with_stdlib_logging_never_imports_structlog(tmp_path: Path) -> None:
    (tmp_path / "target.py").write_text("def f():\n    return 1\n", encoding="utf-8")
    setup = (
        "import logging; logging.basicConfig(level=logging.DEBUG); "
        f"sys.path.insert(0, {str(tmp_path)!r}); import target"
    )
    code = (
        "import hotpatch, pathlib; "
        f"pathlib.Path({str(tmp_path / 'target.py')!r}).write_text('def f():\\n    return 2\\n'); "
        "hotpatch.patch('target'); assert target.f() == 2"
    )
    loaded = modules_after(code, setup=setup)
    assert heavy(loaded) == []


@pytest.mark.parametrize(
    "statement",
    ["import hotpatch.gunicorn", "from hotpatch.watch.debounce import Debouncer"],
)
def test_the_gunicorn_hooks_load_neither_watchdog_nor_the_engine(statement: str) -> None:
    loaded = modules_after(statement)
    assert not [m for m in loaded if m.split(".")[0] in ("watchdog", "structlog", "asyncio")]
    assert "hotpatch.engine" not in loaded and "hotpatch.watch.watcher" not in loaded


def test_the_pytest_plugin_imports_nothing_heavy() -> None:
    loaded = modules_after("import hotpatch.pytest_plugin", setup="import pytest")
    assert loaded == {"hotpatch", "hotpatch._version", "hotpatch.pytest_plugin"}
