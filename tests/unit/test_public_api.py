"""The public API is what __init__ exports, sorted and importable; the CLI answers --version."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

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
