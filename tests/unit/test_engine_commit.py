"""What a commit does: in place, state kept, new and removed names (issue 2, points 1, 2 and 4)."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import hotpatch
from hotpatch import Engine, PatchRejected

BASE = """
    import functools

    CACHE = {}
    LIMIT = 3
    SENTINEL = object()

    def helper():
        return "old"

    def call_helper(x=1):
        return helper() + str(x)

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    @deco
    def wrapped():
        return "old-wrapped"

    def make_greeter(name):
        def greet():
            return "old hello " + name
        return greet

    def uses_sentinel(value=SENTINEL):
        return value is SENTINEL

    class Shape:
        sides = 0

        def area(self):
            return "old-area"

        @classmethod
        def kind(cls):
            return "old-kind"

        @staticmethod
        def unit():
            return "old-unit"

        @property
        def label(self):
            return "old-label"

    class Square(Shape):
        def area(self):
            return "old-square"
"""


def edited(source: str, *pairs: tuple[str, str]) -> str:
    text = textwrap.dedent(source)
    for old, new in pairs:
        assert old in text, old
        text = text.replace(old, new)
    return text


NEW_BODIES = (
    ('return "old"', 'return "new"'),
    ('"old-wrapped"', '"new-wrapped"'),
    ('"old hello "', '"new hello "'),
    ('"old-area"', '"new-area"'),
    ('"old-kind"', '"new-kind"'),
    ('"old-unit"', '"new-unit"'),
    ('"old-label"', '"new-label"'),
    ('"old-square"', '"new-square"'),
)


def test_existing_references_run_new_code(make_module) -> None:
    mod = make_module(BASE)
    engine = Engine()
    helper, call_helper, wrapped = mod.helper, mod.call_helper, mod.wrapped  # from m import f
    callbacks = {"cb": mod.helper}
    shape, square = mod.Shape(), mod.Square()
    greeter = mod.make_greeter("ann")
    code_before = mod.helper.__code__

    result = engine.patch(mod.__name__, source=edited(BASE, *NEW_BODIES))

    assert helper() == "new" and callbacks["cb"]() == "new"
    assert call_helper() == "new1"
    assert wrapped() == "new-wrapped"
    assert wrapped.__wrapped__() == "new-wrapped"
    assert greeter() == "new hello ann"  # a closure made before the patch, free variable kept
    assert shape.area() == "new-area" and square.area() == "new-square"
    assert shape.kind() == "new-kind" and mod.Shape.unit() == "new-unit"
    assert shape.label == "new-label"
    assert isinstance(shape, mod.Shape) and isinstance(square, mod.Shape)
    assert mod.helper is helper and mod.helper.__code__ is not code_before
    assert {"helper", "wrapped", "Shape.area", "Shape.label", "Square.area"} <= set(result.changed)
    assert result.previous != result.version


def test_decorator_without_wraps_and_lru_cache(make_module) -> None:
    source = """
        import functools

        def plain_deco(fn):
            def inner(*a):
                return fn(*a)
            return inner

        @plain_deco
        def decorated():
            return 1

        @functools.lru_cache(maxsize=None)
        def cached(x):
            return x * 10
    """
    mod = make_module(source)
    decorated, cached = mod.decorated, mod.cached
    assert cached(2) == 20
    Engine().patch(
        mod.__name__, source=edited(source, ("return 1", "return 2"), ("x * 10", "x * 100"))
    )
    assert decorated() == 2
    assert cached(2) == 200  # the cache of results computed by the old code was cleared
    assert mod.cached is cached


def test_state_is_kept_and_edited_constants_change(make_module) -> None:
    mod = make_module(BASE)
    mod.CACHE["k"] = "v"
    cache, sentinel = mod.CACHE, mod.SENTINEL
    Engine().patch(mod.__name__, source=edited(BASE, ("LIMIT = 3", "LIMIT = 4")))
    assert mod.CACHE is cache and mod.CACHE == {"k": "v"}
    assert mod.LIMIT == 4
    assert mod.SENTINEL is sentinel
    assert mod.uses_sentinel()  # the new default was mapped to the live sentinel


def test_edited_mutable_value_takes_new_value(make_module) -> None:
    mod = make_module(BASE)
    Engine().patch(mod.__name__, source=edited(BASE, ("CACHE = {}", "CACHE = {'fresh': True}")))
    assert mod.CACHE == {"fresh": True}


def test_flask_app_stays_the_same_object(make_module) -> None:
    source = """
        from flask import Flask

        app = Flask(__name__)

        @app.route("/")
        def index():
            return "old page"
    """
    mod = make_module(source)
    app = mod.app
    view = app.view_functions["index"]
    client = app.test_client()
    assert client.get("/").get_data(as_text=True) == "old page"
    Engine().patch(mod.__name__, source=edited(source, ("old page", "new page")))
    assert mod.app is app and app.view_functions["index"] is view
    assert client.get("/").get_data(as_text=True) == "new page"


def test_new_names_appear_and_bind_to_the_live_module(make_module) -> None:
    mod = make_module(BASE)
    mod.CACHE["k"] = 1
    source = edited(BASE, ('return "old"', "return new_helper()")) + textwrap.dedent(
        """
        def new_helper():
            return len(CACHE)

        class Circle(Shape):
            def area(self):
                return new_helper()
        """
    )
    result = Engine().patch(mod.__name__, source=source)
    assert set(result.added) >= {"new_helper", "Circle"}
    assert mod.helper() == 1 and mod.new_helper.__globals__ is mod.__dict__
    circle = mod.Circle()
    assert isinstance(circle, mod.Shape)  # re-based onto the live Shape
    mod.CACHE["j"] = 2
    assert circle.area() == 2


def test_new_method_added_to_live_class(make_module) -> None:
    mod = make_module(BASE)
    shape = mod.Shape()
    source = edited(
        BASE,
        (
            "    sides = 0\n",
            "    sides = 0\n\n    def perimeter(self):\n        return __class__.__name__ + str(LIMIT)\n",
        ),
    )
    Engine().patch(mod.__name__, source=source)
    assert shape.perimeter() == "Shape3"


def test_removed_public_name_is_refused_unless_allowed(make_module) -> None:
    mod = make_module(BASE)
    engine = Engine()
    without = edited(
        BASE,
        ('def helper():\n    return "old"\n', ""),
        ("return helper() + str(x)", "return str(x)"),
    )
    with pytest.raises(PatchRejected) as info:
        engine.patch(mod.__name__, source=without)
    assert info.value.stage == "compatibility" and "'helper'" in info.value.reason
    assert mod.helper() == "old"
    result = engine.patch(mod.__name__, source=without, allow_removals=True)
    assert "helper" in result.removed and not hasattr(mod, "helper")


def test_private_names_and_unused_imports_may_go(make_module) -> None:
    source = """
        import json

        def _private():
            return 1

        def public():
            return 2
    """
    mod = make_module(source)
    Engine().patch(mod.__name__, source="def public():\n    return 3\n")
    assert mod.public() == 3 and not hasattr(mod, "_private") and not hasattr(mod, "json")


def test_names_set_at_run_time_are_kept(make_module) -> None:
    mod = make_module(BASE)
    mod.runtime_value = 42  # set by the application, not by the source
    Engine().patch(mod.__name__, source=edited(BASE, ('return "old"', 'return "new"')))
    assert mod.runtime_value == 42


def test_candidate_executes_isolated(make_module) -> None:
    source = """
        import sys
        SEEN = None
    """
    mod = make_module(source)
    probe = (
        textwrap.dedent(source)
        + "\nSEEN = sys.modules[__name__] is not None and 'PROBE' not in vars(sys.modules[__name__])\nPROBE = 1\n"
    )
    Engine().patch(mod.__name__, source=probe)
    assert mod.SEEN is True  # during execution the live module was in sys.modules, untouched
    assert sys.modules[mod.__name__] is mod


@pytest.mark.parametrize(
    ("tail", "fragment"),
    [
        ("raise ValueError('boom')", "ValueError at import: boom"),
        ("import sys\nsys.exit(2)", "sys.exit(2)"),
        ("raise KeyboardInterrupt", "KeyboardInterrupt"),
        ("import hp_no_such_module_xyz", "ModuleNotFoundError"),
    ],
)
def test_exception_at_import_refuses_at_execute(make_module, tail: str, fragment: str) -> None:
    mod = make_module(BASE)
    before = dict(mod.__dict__)
    source = edited(BASE, ('return "old"', 'return "new"')) + "\nNEW_NAME = 1\n" + tail + "\n"
    with pytest.raises(PatchRejected) as info:
        Engine().patch(mod.__name__, source=source)
    err = info.value
    assert err.stage == "execute" and fragment in err.reason
    assert err.filename == mod.__file__ and err.lineno == source.count("\n")
    assert f"{mod.__file__}:{err.lineno}" in str(err)
    assert mod.helper() == "old" and not hasattr(mod, "NEW_NAME")
    assert mod.__dict__ == before


def test_patch_reads_file_from_disk(make_module) -> None:
    mod = make_module(BASE)
    engine = Engine()
    engine.track(mod.__name__)
    Path(mod.__file__).write_text(
        edited(BASE, ('return "old"', 'return "disk"'), ("LIMIT = 3", "LIMIT = 9"))
    )
    mod.CACHE["x"] = 1
    engine.patch(mod.__name__)
    assert mod.helper() == "disk" and mod.LIMIT == 9 and mod.CACHE == {"x": 1}


def test_first_contact_after_the_file_was_edited(make_module) -> None:
    """No baseline: immutable constants take new values, live containers are kept."""
    mod = make_module(BASE)
    mod.CACHE["x"] = 1
    Path(mod.__file__).write_text(
        edited(BASE, ('return "old"', 'return "disk"'), ("LIMIT = 3", "LIMIT = 9"))
    )
    result = Engine().patch(mod.__name__)
    assert not result.is_noop
    assert mod.helper() == "disk" and mod.LIMIT == 9 and mod.CACHE == {"x": 1}


def test_unchanged_source_is_a_noop(make_module) -> None:
    mod = make_module(BASE)
    engine = Engine()
    result = engine.patch(mod.__name__, source=textwrap.dedent(BASE))
    assert result.is_noop and result.changed == ()


def count_statement_compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the text of each statement compiled (``pieces._compile_at``) in order."""
    from hotpatch.engine import pieces

    compiled: list[str] = []
    real = pieces._compile_at

    def counting(source: str, *args: object, **kwargs: object) -> object:
        compiled.append(source)
        return real(source, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pieces, "_compile_at", counting)
    return compiled


def test_a_version_that_changes_nothing_leaves_its_statements_code_for_the_next(
    make_module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A comment edited: a no-op, but compiled; the next version is compiled from it, not from
    # nothing (the live baseline, read at first contact, has no statement code of its own).
    mod = make_module(BASE)
    engine = Engine()
    commented = textwrap.dedent(BASE).replace("CACHE = {}", "CACHE = {}  # a comment")
    assert engine.patch(mod.__name__, source=commented).is_noop
    compiled = count_statement_compiles(monkeypatch)
    result = engine.patch(mod.__name__, source=commented.replace('"old"', '"new"'))
    assert result.changed == ("helper",) and mod.helper() == "new"
    assert len(compiled) == 1 and 'return "new"' in compiled[0]


def test_a_module_re_derived_keeps_its_statements_code_for_the_next_time(
    make_module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module that computes a value from a changed module is compiled (from its live text) to
    # re-derive it; the next re-derivation takes that code, not a compile of every statement.
    conf = make_module("LIMIT = 1\n")
    user = make_module(
        f"from {conf.__name__} import LIMIT\n\nDOUBLE = LIMIT * 2\n\n"
        "def double():\n    return DOUBLE\n"
    )
    engine = Engine()
    engine.patch(conf.__name__, source="LIMIT = 5\n")
    assert user.DOUBLE == 10
    compiled = count_statement_compiles(monkeypatch)
    result = engine.patch(conf.__name__, source="LIMIT = 7\n")
    assert user.DOUBLE == 14 and user.double() == 14
    assert f"{user.__name__}.DOUBLE" in result.derived
    assert len(compiled) == 1 and "LIMIT = 7" in compiled[0]


def test_migrate_hook_carries_state(make_module) -> None:
    mod = make_module("COUNTS = {'a': 1}\n")
    new = (
        "COUNTS = {}\nTOTAL = 0\n"
        "def __hotpatch_migrate__(old):\n"
        "    global COUNTS, TOTAL\n"
        "    COUNTS = {k: v * 10 for k, v in old['COUNTS'].items()}\n"
        "    TOTAL = sum(COUNTS.values())\n"
    )
    Engine().patch(mod.__name__, source=new)
    assert mod.COUNTS == {"a": 10} and mod.TOTAL == 10


def test_module_level_functions_use_the_default_engine(make_module) -> None:
    mod = make_module(BASE)
    result = hotpatch.patch(mod.__name__, source=edited(BASE, ('return "old"', 'return "new"')))
    assert mod.helper() == "new"
    assert hotpatch.engine.history(mod.__name__)[0].id == result.version
    hotpatch.rollback(mod.__name__)
    assert mod.helper() == "old"


def test_package_relative_imports_work(tmp_path: Path) -> None:
    pkg = tmp_path / "hp_pkg_rel"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "util.py").write_text("def base():\n    return 5\n")
    (pkg / "mod.py").write_text("from .util import base\n\ndef value():\n    return base()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        from hp_pkg_rel import mod  # type: ignore[import-not-found]

        Engine().patch(
            "hp_pkg_rel.mod",
            source="from .util import base\n\ndef value():\n    return base() * 2\n",
        )
        assert mod.value() == 10
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n.startswith("hp_pkg_rel")]:
            del sys.modules[name]


def test_change_set_modules_see_each_others_new_names(make_module) -> None:
    lib = make_module("def f():\n    return 1\n")
    user = make_module(f"from {lib.__name__} import f\n\ndef g():\n    return f()\n")
    g = user.g
    Engine().patch_many(
        {
            lib.__name__: "def f():\n    return 2\n\ndef helper():\n    return 5\n",
            user.__name__: f"from {lib.__name__} import f, helper\n\ndef g():\n    return f() + helper()\n",
        }
    )
    assert g() == 7
    assert user.helper is lib.helper and user.f is lib.f  # the live objects, not the candidates
    assert lib.helper.__globals__ is lib.__dict__


def test_change_set_order_follows_imports_run_at_import_not_in_function_bodies(
    make_module,
) -> None:
    # aa_* imports a name zz_* adds, at import time; zz_* imports aa_* only inside a function.
    # The change set must build zz_*'s candidate first. (Counting every import as an edge made
    # a cycle of the two, broken by name: aa_* first, refused with "cannot import name".)
    tag = uuid.uuid4().hex[:8]
    base, user = f"zz_base_{tag}", f"aa_user_{tag}"
    make_module(f"def f():\n    import {user}\n    return 1\n", name=base)
    live_user = make_module(f"from {base} import f\n\ndef g():\n    return f()\n", name=user)
    g = live_user.g
    with capture_logs() as logs:
        results = Engine().patch_many(
            {
                user: f"from {base} import f, NEW\n\ndef g():\n    return f() + NEW\n",
                base: f"NEW = 10\n\ndef f():\n    import {user}\n    return 2\n",
            }
        )
    started = [e for e in logs if e["event"] == "patch.started"]
    assert [e["modules"] for e in started] == [[base, user]]  # one event, in the order prepared
    assert [r.module for r in results] == [user, base]  # results in the order given
    assert g() == 12


def test_main_module_block_is_not_run_again(make_module) -> None:
    import sys

    source = "RUNS = []\n\ndef f():\n    return 1\n\nif __name__ == '__main__':\n    RUNS.append('main')\n    STARTED = True\n"
    mod = make_module(source)
    mod.RUNS.append("main")  # as if it had run as a script
    mod.STARTED = True
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = mod
    mod.__name__ = "__main__"
    try:
        Engine().patch("__main__", source=source.replace("return 1", "return 2"))
        assert mod.f() == 2 and mod.RUNS == ["main"] and mod.STARTED is True
    finally:
        sys.modules["__main__"] = saved


DATACLASS = """
import asyncio
from dataclasses import dataclass

@dataclass
class Point:
    x: int = 0
    y: int = 0

    def norm(self):
        return abs(self.x) + abs(self.y)

class Child:
    @property
    def p(self):
        return 1

async def fetch():
    return "old"

def gen():
    yield "old"
"""


def test_dataclasses_coroutines_generators_and_properties(make_module) -> None:
    import asyncio

    mod = make_module(DATACLASS)
    point, child = mod.Point(3, -4), mod.Child()
    engine = Engine()
    result = engine.patch(mod.__name__, source=DATACLASS.replace('yield "old"', 'yield "new"'))
    assert result.changed == ("gen",)  # the dataclass's generated methods did not change
    source = (
        DATACLASS.replace("abs(self.x) + abs(self.y)", "self.x**2 + self.y**2")
        .replace("    y: int = 0\n", "    y: int = 1\n")
        .replace('return "old"', 'return "new"')
        .replace(
            "    def p(self):\n        return 1\n",
            "    def p(self):\n        return self._p\n\n    @p.setter\n    def p(self, value):\n        self._p = value\n",
        )
    )
    engine.patch(mod.__name__, source=source)
    assert point.norm() == 25 and mod.Point() == mod.Point(0, 1)
    assert asyncio.run(mod.fetch()) == "new" and next(mod.gen()) == "old"
    child.p = 7
    assert child.p == 7


MEMBERS = """
import functools

class K:
    def keep(self):
        return 1

    def _private(self):
        return 2

    def public_gone(self):
        return 3

    def becomes_prop(self):
        return 4

DEFAULT = None
"""


def test_class_members_removed_added_and_retyped(make_module) -> None:
    mod = make_module(MEMBERS)
    live_k = mod.K
    k = mod.K()
    engine = Engine()
    with pytest.raises(PatchRejected, match=r"becomes_prop changed from function to property"):
        engine.patch(
            mod.__name__,
            source=MEMBERS.replace(
                "    def becomes_prop(self):", "    @property\n    def becomes_prop(self):"
            ),
        )
    without_public = MEMBERS.replace("    def public_gone(self):\n        return 3\n", "")
    with pytest.raises(PatchRejected, match=r"public member K.public_gone was removed"):
        engine.patch(mod.__name__, source=without_public)
    new = (
        without_public.replace("    def _private(self):\n        return 2\n", "")
        .replace(
            "    def keep(self):",
            "    @functools.cached_property\n    def size(self):\n        return SIZE\n\n    def keep(self):",
        )
        .replace("DEFAULT = None", "SIZE = 7\nDEFAULT = K()")
    )
    result = engine.patch(mod.__name__, source=new, allow_removals=True)
    assert set(result.removed) == {"K._private", "K.public_gone"}
    assert not hasattr(k, "_private") and k.size == 7  # a live instance gets the new member
    assert mod.K is live_k and isinstance(mod.DEFAULT, live_k)  # made by the candidate, re-typed


def test_a_function_that_becomes_a_generator_is_replaced(make_module) -> None:
    """A code object of another kind is never swapped in place (deprecated in Python 3.13)."""
    mod = make_module("def items():\n    return [1, 2]\n")
    engine = Engine()
    result = engine.patch(mod.__name__, source="def items():\n    yield 1\n    yield 2\n")
    assert "items" in result.changed and list(mod.items()) == [1, 2]
    engine.rollback(mod.__name__)
    assert mod.items() == [1, 2]


def test_a_changed_comprehension_needs_no_heap_walk_and_closures_still_follow(
    make_module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A comprehension's function object exists only during its call: finding "closures made
    # before the patch" for it walked the whole heap (tens of ms with a large test suite loaded)
    # for any function whose comprehension changed. A real closure still gets its new code.
    import gc

    from hotpatch.engine import swap

    mod = make_module(
        "def squares(n):\n    return [i * i for i in range(n)]\n"
        "def make(k):\n    def add(x):\n        return x + k\n    return add\n"
    )
    add = mod.make(1)
    walks: list[int] = []
    get_referrers = gc.get_referrers

    def counting(*objs: object) -> list[object]:
        walks.append(len(objs))
        return get_referrers(*objs)

    monkeypatch.setattr(swap.gc, "get_referrers", counting)
    engine = Engine()
    engine.patch(
        mod.__name__,
        source=(
            "def squares(n):\n    return [i * i + 0 for i in range(n)]\n"
            "def make(k):\n    def add(x):\n        return x + k\n    return add\n"
        ),
    )
    assert mod.squares(3) == [0, 1, 4] and walks == []
    engine.patch(
        mod.__name__,
        source=(
            "def squares(n):\n    return [i * i + 0 for i in range(n)]\n"
            "def make(k):\n    def add(x):\n        return x + k + 10\n    return add\n"
        ),
    )
    assert add(1) == 12 and walks == [1]  # the closure made before the patch, found by one walk


CLASS_STATE = """
    class Lazy:
        def __init__(self, name):
            self.name = name

        def __get__(self, obj, tp=None):
            return "lazy " + self.name

    class Moves:
        _marker = object()
        TABLE = {"a": 1}
        LIMIT = 3

        def lookup(self, key, default=_marker):
            return "old" if default is self._marker else default

    for _name in ("x", "y"):
        setattr(Moves, _name, Lazy(_name))
    """


def test_class_members_kept_or_taken_as_a_restart_decides(make_module) -> None:
    # A class's plain members are decided when the classes are paired: those whose statement did
    # not change (and values set on the class at run time, six's moves) stay the live objects;
    # one whose statement changed takes its new value; the methods beside them run new code.
    mod = make_module(CLASS_STATE)
    live = mod.Moves
    marker, table, lazy_x = live._marker, live.TABLE, live.__dict__["x"]
    table["b"] = 2  # state gathered at run time
    Engine().patch(
        mod.__name__,
        source=edited(CLASS_STATE, ("LIMIT = 3", "LIMIT = 4"), ('"old" if', '"new" if')),
    )
    assert mod.Moves is live
    assert live._marker is marker and live.TABLE is table and table == {"a": 1, "b": 2}
    assert live.__dict__["x"] is lazy_x and live().x == "lazy x"
    assert live.LIMIT == 4
    assert live().lookup("k") == "new"  # the default is the live marker, as the body compares
    assert live().lookup("k", 5) == 5
