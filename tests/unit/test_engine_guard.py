"""Compatibility refusals, verifiers and the module's own hooks (issue 2, point 3 and the guard)."""

from __future__ import annotations

import textwrap

import pytest

from hotpatch import Engine, PatchRejected
from hotpatch.engine.guard import signature_incompatibility


def _sig(old: str, new: str) -> str | None:
    ns_old: dict[str, object] = {}
    ns_new: dict[str, object] = {}
    exec(f"def f{old}: pass", ns_old)
    exec(f"def f{new}: pass", ns_new)
    return signature_incompatibility(ns_old["f"], ns_new["f"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("(a, b)", "(a, b, c=1)"),
        ("(a, b)", "(a, b, *args, **kw)"),
        ("(a, b=1)", "(a, b=2)"),
        ("(a, *, k=1)", "(a, *, k=1, j=2)"),
        ("(a, /)", "(a)"),
        ("(a, b)", "(a, b, *args)"),
        ("(a, **kw)", "(a, b=None, **kw)"),
    ],
)
def test_compatible_signatures(old: str, new: str) -> None:
    assert _sig(old, new) is None


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("(a, b)", "(a)", "'b' was removed"),
        ("(a, b)", "(a, c)", "'b' was removed or renamed"),
        ("(a)", "(a, b)", "new parameter 'b' has no default"),
        ("(a, b=1)", "(a, b)", "'b' lost its default"),
        ("(a, *args)", "(a)", "*args was removed"),
        ("(a, **kw)", "(a)", "**kw was removed"),
        ("(a, *, k)", "(a)", "'k' was removed"),
        ("(a, b)", "(a, *, b)", "positional parameter 'b' was removed"),
    ],
)
def test_incompatible_signatures(old: str, new: str, reason: str) -> None:
    found = _sig(old, new)
    assert found is not None and reason in found


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        (
            "def api(a, b):\n    return a\n",
            "def api(a):\n    return a\n",
            "api(): positional parameter 'b' was removed",
        ),
        (
            "class K:\n    def m(self, x):\n        return x\n",
            "class K:\n    def m(self):\n        return 1\n",
            "K.m()",
        ),
        (
            "class A: pass\nclass B: pass\nclass K(A):\n    pass\n",
            "class A: pass\nclass B: pass\nclass K(B):\n    pass\n",
            "class K: its base classes changed",
        ),
        (
            "class K:\n    __slots__ = ('a',)\n",
            "class K:\n    __slots__ = ('a', 'b')\n",
            "__slots__ changed",
        ),
        (
            "class M(type): pass\nclass K:\n    pass\n",
            "class M(type): pass\nclass K(metaclass=M):\n    pass\n",
            "metaclass changed",
        ),
        (
            "import enum\nclass E(enum.Enum):\n    A = 1\n",
            "import enum\nclass E(enum.Enum):\n    A = 1\n    B = 2\n",
            "enum members changed",
        ),
        ("def f():\n    return 1\n", "f = 3\n", "changed from a function to int"),
    ],
)
def test_incompatible_changes_are_refused(make_module, old: str, new: str, fragment: str) -> None:
    mod = make_module(old)
    before = dict(mod.__dict__)
    with pytest.raises(PatchRejected) as info:
        Engine().patch(mod.__name__, source=new)
    assert info.value.stage == "compatibility"
    assert fragment in info.value.reason
    assert mod.__dict__ == before
    if "base classes" in fragment or "metaclass" in fragment or "enum" in fragment:
        assert "restart or rolling reload" in info.value.reason


def test_enum_methods_can_change(make_module) -> None:
    src = "import enum\nclass Color(enum.Enum):\n    RED = 1\n    def describe(self):\n        return 'old'\n"
    mod = make_module(src)
    red = mod.Color.RED
    Engine().patch(mod.__name__, source=src.replace("'old'", "'new'"))
    assert mod.Color.RED is red and red.describe() == "new"


def test_signature_refusal_points_at_the_line(make_module) -> None:
    mod = make_module("X = 1\n\ndef api(a, b):\n    return a\n")
    with pytest.raises(PatchRejected) as info:
        Engine().patch(mod.__name__, source="X = 1\n\n\ndef api(a):\n    return a\n")
    assert info.value.lineno == 4 and f"{mod.__file__}:4" in str(info.value)


def test_user_verifier_refuses(make_module) -> None:
    mod = make_module("VALUE = 1\n")
    engine = Engine()
    seen = []

    @engine.verifier(mod.__name__)
    def value_is_small(candidate) -> None:
        seen.append(candidate)
        if candidate.VALUE > 10:
            raise ValueError(f"VALUE too large: {candidate.VALUE}")

    engine.patch(mod.__name__, source="VALUE = 5\n")
    assert mod.VALUE == 5 and seen[0] is not mod
    with pytest.raises(PatchRejected) as info:
        engine.patch(mod.__name__, source="VALUE = 50\n")
    assert info.value.stage == "verify" and "VALUE too large: 50" in info.value.reason
    assert mod.VALUE == 5


def test_module_own_verifier_refuses(make_module) -> None:
    mod = make_module("RATE = 1\n")
    new = "RATE = -1\n\ndef __hotpatch_verify__(candidate):\n    assert candidate.RATE > 0, 'RATE must be positive'\n"
    with pytest.raises(PatchRejected) as info:
        Engine().patch(mod.__name__, source=new)
    assert info.value.stage == "verify" and "RATE must be positive" in info.value.reason
    assert info.value.lineno == 4
    assert mod.RATE == 1


def test_hanging_verifier_refuses_after_its_deadline(make_module) -> None:
    import threading

    mod = make_module("VALUE = 1\n")
    engine = Engine(verify_timeout_s=0.2)
    release = threading.Event()

    @engine.verifier(mod.__name__)
    def hangs(candidate) -> None:
        release.wait(30)

    try:
        with pytest.raises(PatchRejected) as info:
            engine.patch(mod.__name__, source="VALUE = 2\n")
        assert info.value.stage == "verify" and "did not return within 0.2s" in info.value.reason
        assert mod.VALUE == 1
    finally:
        release.set()


def test_global_verifier_sees_every_module(make_module) -> None:
    a = make_module("X = 1\n")
    b = make_module("Y = 1\n")
    engine = Engine()
    names: list[str] = []
    engine.verifier()(lambda candidate: names.append(candidate.__name__))
    engine.patch(a.__name__, source="X = 2\n")
    engine.patch(b.__name__, source="Y = 2\n")
    assert names == [a.__name__, b.__name__]


def test_check_is_a_dry_run(make_module) -> None:
    mod = make_module("def f():\n    return 1\n")
    engine = Engine()
    result = engine.check(mod.__name__, source="def f():\n    return 2\n")
    assert result.changed == ("f",) and mod.f() == 1
    assert [v.outcome for v in engine.history(mod.__name__)] == ["baseline"]
    with pytest.raises(PatchRejected):
        engine.check(mod.__name__, source="def f(:\n")


def test_pytest_plugin_fixture(make_module, hotpatch_check) -> None:
    mod = make_module("def f(a):\n    return a\n")
    assert hotpatch_check(mod.__name__, source="def f(a, b=1):\n    return a + b\n").changed == (
        "f",
    )
    with pytest.raises(PatchRejected, match="compatibility"):
        hotpatch_check(mod.__name__, source=textwrap.dedent("def f():\n    return 1\n"))


def test_module_hooks_may_be_dropped(make_module) -> None:
    mod = make_module("def f():\n    return 1\n\ndef __hotpatch_health__():\n    assert f() == 1\n")
    Engine().patch(mod.__name__, source="def f():\n    return 2\n")
    assert mod.f() == 2 and not hasattr(mod, "__hotpatch_health__")
