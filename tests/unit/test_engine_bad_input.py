"""Bad input: each gets a clear PatchRejected naming file, line and stage; live code unchanged."""

from __future__ import annotations

import threading
import types
from pathlib import Path

import pytest

from hotpatch import Engine, HotpatchError, PatchRejected

SOURCE = "VALUE = 1\n\ndef f():\n    return 'old'\n"


def assert_unchanged(
    mod: types.ModuleType, before: dict[str, object], code: types.CodeType
) -> None:
    assert mod.__dict__.keys() == before.keys()
    assert all(mod.__dict__[k] is v for k, v in before.items())
    assert mod.f.__code__ is code and mod.f() == "old"


def reject(engine: Engine, name: str, **kwargs: object) -> PatchRejected:
    with pytest.raises(PatchRejected) as info:
        engine.patch(name, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, HotpatchError)
    return info.value


@pytest.fixture(name="live")
def _live(make_module) -> tuple[types.ModuleType, dict[str, object], types.CodeType]:
    mod = make_module(SOURCE)
    return mod, dict(mod.__dict__), mod.f.__code__


def test_syntax_error(live) -> None:
    mod, before, code = live
    err = reject(Engine(), mod.__name__, source="VALUE = 1\n\ndef f(:\n    return 'new'\n")
    assert (err.stage, err.filename, err.lineno) == ("compile", mod.__file__, 3)
    assert "def f(:" in err.reason and f"{mod.__file__}:3" in str(err)
    assert_unchanged(mod, before, code)


def test_bytes_that_are_not_utf8(live) -> None:
    mod, before, code = live
    err = reject(Engine(), mod.__name__, source=b"VALUE = 1\nNAME = '\xff\xfe'\n")
    assert (err.stage, err.lineno) == ("load", 2) and "not valid utf-8" in err.reason.lower()
    assert_unchanged(mod, before, code)


def test_binary_file_is_not_python(live) -> None:
    mod, before, code = live
    Path(mod.__file__).write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00")
    err = reject(Engine(), mod.__name__)
    assert err.stage == "load" and "NUL byte" in err.reason and err.filename == mod.__file__
    assert_unchanged(mod, before, code)


def test_empty_file(live) -> None:
    mod, before, code = live
    Path(mod.__file__).write_text("")
    err = reject(Engine(), mod.__name__)
    assert err.stage == "load" and "empty" in err.reason
    assert_unchanged(mod, before, code)


def test_ten_megabyte_file(live) -> None:
    mod, before, code = live
    Path(mod.__file__).write_text("X = 1\n" + "#" * (10 * 1024 * 1024) + "\n")
    err = reject(Engine(), mod.__name__)
    assert err.stage == "load" and "over the" in err.reason and "max_source_bytes" in err.reason
    assert_unchanged(mod, before, code)
    err = reject(Engine(), mod.__name__, source="X = 1\n" + "#" * (10 * 1024 * 1024))
    assert err.stage == "load"


def test_module_never_imported() -> None:
    err = reject(Engine(), "hp_never_imported_module")
    assert err.stage == "load" and "not imported" in err.reason


@pytest.mark.parametrize("name", ["math", "sys", "builtins"])
def test_builtin_or_extension_module(name: str) -> None:
    err = reject(Engine(), name)
    assert err.stage == "load" and (
        "built-in" in err.reason or "not from Python source" in err.reason
    )


def test_name_that_is_not_a_module() -> None:
    err = reject(Engine(), "os.path.join")
    assert err.stage == "load" and "may be an attribute, not a module" in err.reason
    err = reject(Engine(), "")
    assert err.stage == "load"


def test_source_that_calls_sys_exit(live) -> None:
    mod, before, code = live
    err = reject(Engine(), mod.__name__, source="import sys\nVALUE = 2\nsys.exit('bye')\n")
    assert (err.stage, err.lineno) == ("execute", 3) and "sys.exit('bye')" in err.reason
    assert_unchanged(mod, before, code)


def test_source_that_raises_keyboard_interrupt(live) -> None:
    mod, before, code = live
    err = reject(Engine(), mod.__name__, source="VALUE = 2\nraise KeyboardInterrupt\n")
    assert (err.stage, err.lineno) == ("execute", 2)
    assert_unchanged(mod, before, code)


def test_verifier_that_hangs(live) -> None:
    mod, before, code = live
    engine = Engine(verify_timeout_s=0.2)
    release = threading.Event()
    engine.verifier(mod.__name__)(lambda candidate: release.wait(30))
    try:
        err = reject(engine, mod.__name__, source=SOURCE.replace("'old'", "'new'"))
        assert err.stage == "verify" and "0.2s" in err.reason
        assert_unchanged(mod, before, code)
    finally:
        release.set()


def test_module_whose_file_was_deleted(live) -> None:
    mod, before, code = live
    Path(mod.__file__).unlink()
    err = reject(Engine(), mod.__name__)
    assert err.stage == "load" and "no longer exists" in err.reason and err.filename == mod.__file__
    assert_unchanged(mod, before, code)


def test_wrong_source_type(live) -> None:
    mod, before, code = live
    err = reject(Engine(), mod.__name__, source=123)
    assert err.stage == "load" and "str or bytes" in err.reason
    assert_unchanged(mod, before, code)


def test_bad_coding_cookie(live) -> None:
    mod, before, code = live
    err = reject(Engine(), mod.__name__, source=b"# -*- coding: no-such-codec -*-\nVALUE = 2\n")
    assert err.stage == "load" and "decode" in err.reason
    assert_unchanged(mod, before, code)


def test_rejections_are_recorded_in_history(live) -> None:
    mod, _, _ = live
    engine = Engine()
    reject(engine, mod.__name__, source="def f(:\n")
    latest = engine.history(mod.__name__)[0]
    assert latest.outcome == "rejected" and latest.stage == "compile" and latest.sha256
    assert engine.history(mod.__name__)[1].is_live
