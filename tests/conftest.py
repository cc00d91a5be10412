"""Fixtures shared by every test: global state restored, modules made from source in tmp_path."""

from __future__ import annotations

import gc
import importlib.util
import sys
import textwrap
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


MakeModule = Callable[..., types.ModuleType]


@pytest.fixture(name="make_module")
def _make_module(tmp_path: Path) -> Iterator[MakeModule]:
    """Write ``source`` to a file in tmp_path and import it under a unique name."""
    created: list[str] = []

    def make(source: str, *, name: str | None = None) -> types.ModuleType:
        name = name or f"hp_mod_{uuid.uuid4().hex[:10]}"
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source), encoding="utf-8")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        created.append(name)
        spec.loader.exec_module(module)
        return module

    yield make
    for name in created:
        sys.modules.pop(name, None)


@pytest.fixture(name="heap_walks")
def _heap_walks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions that walk the heap (call ``gc.get_referrers``) during the test."""
    walks: list[str] = []
    real = gc.get_referrers

    def counting(*objs: object) -> list[object]:
        walks.append(sys._getframe(1).f_code.co_name)
        # This wrapper's own argument tuple holds the objects looked for: on 3.13 the collector
        # sees it as their referrer. The engine never sees it without the spy.
        return [referrer for referrer in real(*objs) if referrer is not objs]

    monkeypatch.setattr(gc, "get_referrers", counting)
    return walks
