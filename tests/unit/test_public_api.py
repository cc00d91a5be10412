"""The public API is what __init__ exports, sorted and importable; the CLI answers --version."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

import hotpatch


def test_all_is_sorted_and_importable() -> None:
    assert hotpatch.__all__ == sorted(hotpatch.__all__)
    for name in hotpatch.__all__:
        assert hasattr(hotpatch, name), name
    public = {
        name
        for name, value in vars(hotpatch).items()
        if name[0].isalpha() and not isinstance(value, types.ModuleType) and name != "annotations"
    }
    assert public <= set(hotpatch.__all__), public - set(hotpatch.__all__)


def test_py_typed_is_shipped() -> None:
    assert (Path(hotpatch.__file__).parent / "py.typed").is_file()


def test_errors_form_one_hierarchy() -> None:
    assert issubclass(hotpatch.PatchRejected, hotpatch.HotpatchError)
    assert issubclass(hotpatch.RolloutFailed, hotpatch.HotpatchError)
    assert issubclass(hotpatch.HealthCheckTimeout, hotpatch.RolloutFailed)
    assert issubclass(hotpatch.HealthCheckTimeout, TimeoutError)
    assert issubclass(hotpatch.ConfigError, ValueError)


def test_version_from_console_script_and_module() -> None:
    script = Path(sys.executable).parent / "hotpatch"
    for argv in ([str(script), "--version"], [sys.executable, "-m", "hotpatch", "--version"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.strip() == f"hotpatch {hotpatch.__version__}"


def test_names_load_on_first_use_and_dir_lists_them() -> None:
    """A fresh interpreter: ``dir()`` lists every public name before any is loaded."""
    code = (
        "import sys, hotpatch; "
        "assert set(hotpatch.__all__) <= set(dir(hotpatch)), dir(hotpatch); "
        "assert 'hotpatch.engine' not in sys.modules; "
        "from hotpatch import *; "
        "assert patch is hotpatch.patch and callable(watch) and Engine is hotpatch.Engine; "
        "from hotpatch.engine.history import Version as V; assert hotpatch.Version is V; "
        "print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.stdout.strip() == "ok", out.stderr


def test_watch_stays_the_function_when_the_subpackage_loads_first() -> None:
    """``import hotpatch.watch.debounce`` (the gunicorn master does) must not shadow ``watch``."""
    code = (
        "import hotpatch.watch.debounce, hotpatch; "
        "assert callable(hotpatch.watch), hotpatch.watch; "
        "from hotpatch import watch; from hotpatch.watch.watcher import watch as real; "
        "assert watch is real and hotpatch.watch is real; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.stdout.strip() == "ok", out.stderr


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        hotpatch.no_such_name  # type: ignore[attr-defined]  # noqa: B018
    assert hotpatch.engine.history is not None  # parts stay reachable as attributes
