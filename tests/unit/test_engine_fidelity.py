"""A patched process behaves like one restarted on the new code, or the patch is refused (issue 8).

One test (or two) per defect class, each on a minimal module pair: a function that changes kind,
descriptors with state of their own, re-exports, a package's own submodules, state derived at
import from other names, and the check after the commit that what is reported changed runs the
candidate's code.
"""

from __future__ import annotations

import gc
import inspect
import os
import subprocess
import sys
import textwrap
import traceback
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import hotpatch
from hotpatch import Engine, PatchRejected
from hotpatch.engine import swap

MakePackage = Callable[..., str]


@pytest.fixture(name="make_package")
def _make_package(tmp_path: Path) -> Iterator[MakePackage]:
    """Write a package (file name -> source) to tmp_path; return its unique name."""
    made: list[str] = []
    sys.path.insert(0, str(tmp_path))

    def make(files: dict[str, str]) -> str:
        name = f"hp_fid_{uuid.uuid4().hex[:10]}"
        root = tmp_path / name
        root.mkdir()
        for filename, source in files.items():
            (root / filename).write_text(textwrap.dedent(source), encoding="utf-8")
        made.append(name)
        return name

    yield make
    sys.path.remove(str(tmp_path))
    for name in [n for n in sys.modules if n.split(".")[0] in made]:
        del sys.modules[name]


def _source(module: types.ModuleType) -> str:
    return Path(str(module.__file__)).read_text(encoding="utf-8")


# -- 1. a function that becomes a generator or a coroutine ------------------------------------------


KIND_OLD = """
def _legacy():
    return [1, 2]

def items(limit=2):
    return _legacy()[:limit]
"""

KIND_NEW = """
def _produce(limit, step):
    return range(0, limit * step, step)

def items(limit=2, *, step=1):
    yield from _produce(limit, step)
"""


def test_a_function_that_becomes_a_generator_runs_the_new_code_everywhere(make_module) -> None:
    lib = make_module(KIND_OLD)
    user = make_module(
        f"from {lib.__name__} import items\n\ndef total():\n    return sum(items(3, step=2))\n"
    )
    engine = Engine()
    result = engine.patch(lib.__name__, source=KIND_NEW, allow_removals=True)
    assert "items" in result.changed
    assert inspect.isgeneratorfunction(lib.items) and list(lib.items(2, step=5)) == [0, 5]
    # The module that did `from lib import items` binds the new function, as a restart would.
    assert user.items is lib.items and user.total() == 0 + 2 + 4
    assert f"{user.__name__}.items" in result.derived
    engine.rollback(lib.__name__)
    assert lib.items() == [1, 2] and user.items is lib.items


def test_a_kind_change_with_references_a_restart_would_remake_is_refused(make_module) -> None:
    lib = make_module(KIND_OLD)
    callbacks = [lib.items]  # e.g. a framework's registry, filled at start-up
    engine = Engine()
    with pytest.raises(PatchRejected, match=r"items cannot be updated in place.*\(list\)") as info:
        engine.patch(lib.__name__, source=KIND_NEW, allow_removals=True)
    assert info.value.stage == "compatibility"
    assert lib.items() == [1, 2] and callbacks[0] is lib.items  # nothing changed


def test_a_reference_held_only_by_uncollected_garbage_does_not_refuse(make_module) -> None:
    # A cycle nothing reaches any more still shows among gc.get_referrers until a collection
    # runs (the engine pauses the collector while it parses): it keeps no old code running.
    lib = make_module(KIND_OLD)
    engine = Engine()
    gc.disable()
    try:
        cycle: list[object] = [lib.items]
        cycle.append(cycle)
        del cycle
        engine.patch(lib.__name__, source=KIND_NEW, allow_removals=True)
    finally:
        gc.enable()
    assert inspect.isgeneratorfunction(lib.items) and list(lib.items(4, step=2)) == [0, 2, 4, 6]


def test_typing_objects_held_by_typings_own_caches_do_not_refuse(make_module) -> None:
    # idna 3.19 dropped ``from typing import Optional``; typing's caches hold ``Optional`` and
    # every ``Optional[...]`` made, as they do in a restarted process: annotation objects are
    # values, equal is as good as the same (refused before: "old _SpecialForm also held").
    import typing

    mod = make_module("from typing import Optional, Union\nT = Optional[int]\nX = 1\n")
    held = (typing.Optional, typing.Optional[int])  # noqa: UP045 - the object under test
    engine = Engine()
    engine.patch(
        mod.__name__,
        source="from typing import Union\nT = Union[int, str]\nX = 1\n",
        allow_removals=True,
    )
    assert not hasattr(mod, "Optional") and typing.get_args(mod.T) == (int, str)
    assert held[0] is typing.Optional


METHOD_OLD = "class Box:\n    def items(self):\n        return [1, 2]\n"
METHOD_NEW = "class Box:\n    def items(self):\n        yield from (1, 2, 3)\n"


def test_a_replaced_method_only_its_class_holds_costs_no_heap_walk(
    make_module, heap_walks: list[str]
) -> None:
    # Every reference to the old method is counted (its class's dict, the plan's record of
    # it): the heap is not walked to learn that nothing else holds it.
    lib = make_module(METHOD_OLD)
    box = lib.Box()
    Engine().patch(lib.__name__, source=METHOD_NEW)
    assert list(box.items()) == [1, 2, 3]
    assert "_referrers_of" not in heap_walks, heap_walks


@pytest.mark.parametrize("holder", ["function", "bound method"])
def test_a_replaced_method_held_elsewhere_is_walked_for_and_refused(
    make_module, heap_walks: list[str], holder: str
) -> None:
    lib = make_module(METHOD_OLD)
    handlers = {"items": lib.Box.items if holder == "function" else lib.Box().items}
    with pytest.raises(PatchRejected, match=r"Box\.items cannot be updated in place"):
        Engine().patch(lib.__name__, source=METHOD_NEW)
    assert "_referrers_of" in heap_walks
    assert list(lib.Box().items()) == [1, 2] and handlers["items"] is not None


def test_a_kind_change_rebuilds_a_list_of_the_same_module(make_module) -> None:
    lib = make_module(KIND_OLD + "\nHANDLERS = [items]\n")
    Engine().patch(lib.__name__, source=KIND_NEW + "\nHANDLERS = [items]\n", allow_removals=True)
    assert [lib.items] == lib.HANDLERS and inspect.isgeneratorfunction(lib.items)


def test_a_coroutine_that_becomes_a_plain_function(make_module) -> None:
    import asyncio

    mod = make_module("async def fetch():\n    return 'old'\n")
    Engine().patch(mod.__name__, source="def fetch():\n    return 'new'\n")
    assert not inspect.iscoroutinefunction(mod.fetch) and mod.fetch() == "new"
    del asyncio


def test_a_method_that_becomes_a_coroutine_runs_the_new_code(make_module) -> None:
    import asyncio

    source = "class K:\n    def fetch(self):\n        return 'old'\n"
    mod = make_module(source)
    k = mod.K()
    Engine().patch(
        mod.__name__, source="class K:\n    async def fetch(self):\n        return 'new'\n"
    )
    assert inspect.iscoroutinefunction(k.fetch) and asyncio.run(k.fetch()) == "new"


RETRY = """
import functools

def retry(times):
    def decorate(fn):
        cache = {}

        @functools.wraps(fn)
        def wrapper(*args):
            cache[args] = True
            return (times, fn(*args))
        wrapper.cache = cache
        return wrapper
    return decorate

@retry(3)
def fetch(x):
    return x
"""


def test_a_decorator_argument_change_makes_a_new_function(make_module) -> None:
    mod = make_module(RETRY)
    assert mod.fetch(1) == (3, 1)
    engine = Engine()
    engine.patch(mod.__name__, source=RETRY.replace("return x", "return x * 10"))
    assert mod.fetch(1) == (3, 10) and mod.fetch.cache == {(1,): True}  # in place, state kept
    result = engine.patch(mod.__name__, source=RETRY.replace("retry(3)", "retry(5)"))
    assert "fetch" in result.changed and mod.fetch(1) == (5, 1)  # as a restart would make it


# -- 2. descriptors with state of their own ---------------------------------------------------------


def test_a_property_subclass_keeps_its_state_and_points_at_live_objects(make_module) -> None:
    source = textwrap.dedent(
        """
        STATE = {"calls": 0}

        class tagged(property):
            def __init__(self, fget, *, tag):
                super().__init__(fget)
                self.tag = tag

        def _get(self):
            return STATE["calls"]

        class K:
            value = tagged(_get, tag="v1")
        """
    )
    mod = make_module(source)
    live_tagged, live_state = mod.tagged, mod.STATE
    live_state["calls"] = 5  # live state the patch must keep
    new = source.replace(
        'class K:\n    value = tagged(_get, tag="v1")\n',
        "def _get_more(self):\n"
        '    return STATE["calls"] * 10\n\n'
        "class K:\n"
        '    value = tagged(_get, tag="v1 renamed")\n'
        '    more = tagged(_get_more, tag="v2")\n',
    )
    assert new != source
    Engine().patch(mod.__name__, source=new)
    more, value = mod.K.__dict__["more"], mod.K.__dict__["value"]
    assert type(more) is live_tagged and type(value) is live_tagged  # not the candidate's class
    assert more.tag == "v2" and value.tag == "v1 renamed"  # a subclass's own state, new
    assert mod.STATE is live_state and mod.K().more == 50 and mod.K().value == 5  # live globals


def test_staticmethod_classmethod_and_cached_property_run_with_live_globals(make_module) -> None:
    source = """
        import functools

        SEEN = []

        def tag(descriptor):
            descriptor.tag = "tagged"
            return descriptor

        class bound_later:
            \"\"\"A descriptor of another kind: it keeps its function as an attribute.\"\"\"

            def __init__(self, func):
                self.func = func
                self.calls = 0

            def __get__(self, obj, owner=None):
                return self.func(owner)

        class K:
            @staticmethod
            def s():
                return len(SEEN)
        """
    mod = make_module(source)
    seen = mod.SEEN
    seen.append(1)
    new = textwrap.dedent(source) + textwrap.indent(
        textwrap.dedent(
            """
            @tag
            @classmethod
            def c(cls):
                \"\"\"Counted.\"\"\"
                return len(SEEN) + 10

            @functools.cached_property
            def cp(self):
                return len(SEEN) + 100

            @bound_later
            def later(cls):
                return len(SEEN) + 1000
            """
        ),
        "    ",
    )
    Engine().patch(mod.__name__, source=new)
    seen.append(2)
    assert mod.K.c() == 12 and mod.K().cp == 102 and mod.K.s() == 2
    assert mod.K.__dict__["c"].__func__.__globals__ is mod.__dict__
    assert mod.K.__dict__["cp"].func.__globals__ is mod.__dict__
    assert mod.K.c.__doc__ == "Counted." and mod.K.__dict__["c"].tag == "tagged"
    assert mod.K.later == 1002 and mod.K.__dict__["later"].func.__globals__ is mod.__dict__
    assert type(mod.K.__dict__["later"]) is mod.bound_later


def test_a_property_docstring_change_is_taken(make_module) -> None:
    source = 'class K:\n    @property\n    def p(self):\n        """old doc"""\n        return 1\n'
    mod = make_module(source)
    live_prop = mod.K.__dict__["p"]
    Engine().patch(mod.__name__, source=source.replace("old doc", "new doc").replace("1\n", "2\n"))
    assert mod.K.p.__doc__ == "new doc" and mod.K().p == 2
    assert mod.K.__dict__["p"].fget is live_prop.fget  # the live function, updated in place


# -- 3. re-exports follow -----------------------------------------------------------------------------


def test_a_star_reexport_follows_names_the_submodule_gains(make_package) -> None:
    pkg = make_package(
        {
            "__init__.py": "from .sub import *\n",
            "sub.py": "__all__ = ['a']\n\ndef a():\n    return 'a'\n",
        }
    )
    __import__(f"{pkg}.sub")
    package = sys.modules[pkg]
    engine = Engine()
    result = engine.patch(
        f"{pkg}.sub",
        source="__all__ = ['a', 'b']\n\ndef a():\n    return 'a'\n\ndef b():\n    return 'b'\n",
    )
    assert package.b() == "b" and f"{pkg}.b" in result.derived
    # A module importing the new name from the package is not refused any more.
    user = types.ModuleType(f"{pkg}_user")
    user.__file__ = str(Path(str(package.__file__)).parent.parent / f"{pkg}_user.py")
    Path(user.__file__).write_text(f"from {pkg} import a\n", encoding="utf-8")
    sys.modules[user.__name__] = user
    exec(compile(f"from {pkg} import a\n", user.__file__, "exec"), user.__dict__)
    engine.patch(
        user.__name__, source=f"from {pkg} import a, b\n\ndef both():\n    return a() + b()\n"
    )
    assert user.both() == "ab"
    engine.rollback(f"{pkg}.sub")
    assert not hasattr(package, "b")  # the re-derivation is rolled back with the submodule


def test_a_named_reexport_follows_a_replaced_value(make_package) -> None:
    pkg = make_package(
        {"__init__.py": "from .sub import LIMITS as limits\n", "sub.py": "LIMITS = (1, 2)\n"}
    )
    __import__(pkg)
    Engine().patch(f"{pkg}.sub", source="LIMITS = (1, 2, 3)\n")
    assert sys.modules[pkg].limits == (1, 2, 3)


# -- 4. a package's candidate sees its own submodules ------------------------------------------------


def test_a_package_candidate_sees_its_submodules(make_package) -> None:
    pkg = make_package(
        {
            "__init__.py": "from .sub import helper\nVERSION = 1\ndel sub\n",
            "sub.py": "def helper():\n    return 1\n",
        }
    )
    package = __import__(pkg)
    assert not hasattr(package, "sub")  # `del sub` ran at import, as it would after a restart
    __import__(f"{pkg}.sub")  # the import system binds pkg.sub again
    Engine().patch(pkg, source="from .sub import helper\nVERSION = 2\ndel sub\n")
    assert package.VERSION == 2 and not hasattr(package, "sub")


# -- 5. state derived at import from names that changed ---------------------------------------------


def test_a_table_built_from_another_module_is_rebuilt(make_module) -> None:
    kinds = make_module("KINDS = ['a', 'b']\n\ndef label(kind):\n    return kind.upper()\n")
    table = make_module(
        f"import {kinds.__name__} as kinds\n\n"
        "TABLE = {k: kinds.label(k) for k in kinds.KINDS}\n"
        "CACHE = {}\n"
        "COUNT = len(TABLE)\n"
    )
    cache = table.CACHE
    cache["kept"] = True
    result = Engine().patch(
        kinds.__name__,
        source="KINDS = ['a', 'b', 'c']\n\ndef label(kind):\n    return kind.upper()\n",
    )
    assert table.TABLE == {"a": "A", "b": "B", "c": "C"} and table.COUNT == 3
    assert table.CACHE is cache  # a value that reads nothing that changed is kept
    assert {f"{table.__name__}.TABLE", f"{table.__name__}.COUNT"} <= set(result.derived)


CONF = """
DEFAULT = 1

def make_deco(tag):
    def deco(fn):
        fn.tag = tag
        return fn
    return deco

deco = make_deco("v1")
"""


def test_defaults_follow_and_a_replaced_decorator_needs_a_restart(make_module) -> None:
    conf = make_module(CONF)
    user = make_module(f"import {conf.__name__} as conf\n\ndef f(x=conf.DEFAULT):\n    return x\n")
    engine = Engine()
    result = engine.patch(conf.__name__, source=CONF.replace("DEFAULT = 1", "DEFAULT = 2"))
    assert user.f() == 2 and f"{user.__name__}.f" in result.derived
    decorated = make_module(f"from {conf.__name__} import deco\n\n@deco\ndef g():\n    return 1\n")
    with pytest.raises(
        PatchRejected, match=r"needs a restart: .*decorator of g reads deco"
    ) as info:
        engine.patch(conf.__name__, source=CONF.replace('"v1"', '"v2"'))
    assert info.value.filename == decorated.__file__ and info.value.lineno == 3
    assert decorated.g.tag == "v1" and conf.deco is decorated.deco  # nothing changed


def test_a_value_computed_from_a_changed_function_of_the_same_module_is_recomputed(
    make_module,
) -> None:
    source = (
        "def compute():\n    return 1\n\nVALUE = compute()\nREGISTRY = []\nREGISTRY.append(VALUE)\n"
    )
    mod = make_module(source)
    result = Engine().patch(mod.__name__, source=source.replace("return 1", "return 2"))
    assert mod.VALUE == 2 and mod.REGISTRY == [2]
    assert {"compute", "VALUE", "REGISTRY"} <= set(result.changed)


def test_a_change_set_given_out_of_dependency_order_still_re_derives(make_module) -> None:
    kinds = make_module("KINDS = ['a']\n")
    user_source = f"import {kinds.__name__} as kinds\n\nTABLE = list(kinds.KINDS)\nX = 1\n"
    user = make_module(user_source)
    Engine().patch_many(
        {
            user.__name__: user_source.replace("X = 1", "X = 2"),
            kinds.__name__: "KINDS = ['a', 'b']\n",
        }
    )
    assert user.X == 2 and user.TABLE == ["a", "b"]


def test_class_attributes_derived_from_a_changed_value_are_recomputed(make_module) -> None:
    conf = make_module("LIMIT = 1\n")
    user = make_module(
        f"from {conf.__name__} import LIMIT\n\nclass K:\n    cap = LIMIT * 2\n    seen = []\n"
    )
    seen = user.K.seen
    result = Engine().patch(conf.__name__, source="LIMIT = 5\n")
    assert user.K.cap == 10 and user.K.seen is seen  # only what reads the changed value
    assert f"{user.__name__}.K.cap" in result.derived
    assert f"{user.__name__}.K.seen" not in result.derived


def test_a_main_guard_and_an_lru_cache_are_not_derived_state(make_module) -> None:
    source = textwrap.dedent(
        """
        import functools

        @functools.lru_cache()
        def version():
            return (1,)

        def main():
            return version()

        CURRENT = main()

        if __name__ == "__main__":
            print(main())
        """
    )
    mod = make_module(source)
    assert mod.main() == (1,)
    new = source.replace("(1,)", "(2,)").replace("lru_cache()", "lru_cache")
    result = Engine().patch(mod.__name__, source=new)
    assert mod.main() == (2,) and mod.CURRENT == (2,)  # the guard's print(main()) never runs
    assert {"version", "CURRENT"} <= set(result.changed)


def test_a_value_computed_through_an_unchanged_caller_in_another_module(make_module) -> None:
    lib = make_module("def version():\n    return 1\n\ndef main():\n    return version()\n")
    user = make_module(f"import {lib.__name__} as lib\n\nCURRENT = lib.main()\n")
    result = Engine().patch(
        lib.__name__, source="def version():\n    return 2\n\ndef main():\n    return version()\n"
    )
    assert user.CURRENT == 2 and f"{user.__name__}.CURRENT" in result.derived


DB = """
class DB:
    def __init__(self):
        self.rows = []

    def query(self):
        return "old"

    @classmethod
    def default_limit(cls):
        return 10

db = DB()
LIMIT = DB.default_limit()
"""


def test_an_instance_is_kept_when_a_method_changes_but_a_class_call_is_redone(
    make_module,
) -> None:
    mod = make_module(DB)
    db = mod.db
    db.rows.append("live state")
    new = DB.replace('return "old"', 'return "new"').replace("return 10", "return 20")
    result = Engine().patch(mod.__name__, source=new)
    assert mod.db is db and db.query() == "new" and db.rows == ["live state"]
    assert mod.LIMIT == 20 and "LIMIT" in result.changed and "db" not in result.changed


def test_derived_state_with_effects_elsewhere_needs_a_restart(make_module) -> None:
    kinds = make_module("KINDS = ['a']\n")
    sink = make_module("SEEN = []\n")
    user = make_module(
        f"import {kinds.__name__} as kinds\nimport {sink.__name__} as sink\n\n"
        "sink.SEEN.extend(kinds.KINDS)\n"
    )
    with pytest.raises(PatchRejected, match=r"needs a restart: .*changes sink") as info:
        Engine().patch(kinds.__name__, source="KINDS = ['a', 'b']\n")
    assert info.value.filename == user.__file__ and info.value.lineno == 4
    assert kinds.KINDS == ["a"] and sink.SEEN == ["a"]


# -- 6. the promise: what is reported changed runs the candidate's code -------------------------------


def test_a_commit_that_leaves_old_code_live_is_rolled_back(make_module, monkeypatch) -> None:
    """Fault injection: a planner that maps the new function back onto the old one (the defect
    of class 1) must not produce a success."""
    mod = make_module("def f():\n    return 'old'\n")
    original = swap._Planner.replace_name

    def faulty(self: swap._Planner, name: str, old: object, new: object) -> None:
        self.remap[id(new)] = old
        original(self, name, old, new)

    monkeypatch.setattr(swap._Planner, "replace_name", faulty)
    with pytest.raises(PatchRejected, match=r"f still runs code of the old version") as info:
        Engine().patch(mod.__name__, source="def f():\n    yield 'new'\n")
    assert info.value.stage == "compatibility" and mod.f() == "old"


def test_a_commit_that_fails_halfway_changes_nothing(make_module) -> None:
    source = textwrap.dedent(
        """
        def f():
            return "old"

        class Meta(type):
            def __setattr__(cls, name, value):
                if name == "frozen":
                    raise TypeError("frozen is frozen")
                super().__setattr__(name, value)

        class K(metaclass=Meta):
            frozen = 1
        """
    )
    mod = make_module(source)
    new = source.replace('"old"', '"new"').replace("frozen = 1", "frozen = 2")
    with pytest.raises(PatchRejected, match=r"could not make an assignment.*frozen is frozen"):
        Engine().patch(mod.__name__, source=new)
    assert mod.f() == "old" and mod.K.frozen == 1


def test_a_class_attribute_that_redefines_class_is_never_assigned(make_module) -> None:
    """A new descriptor under ``__class__`` (its doc changed) would have to be assigned on the
    class, and ``setattr(Proxy, "__class__", ...)`` sets the class's own type: refused. A getter
    that changed takes its new code in place and assigns nothing (test_engine_refusals.py)."""
    source = "class Proxy:\n    __class__ = property(lambda self: int)\n"
    mod = make_module(source)
    with pytest.raises(PatchRejected, match=r"Proxy.__class__ changed.*restart"):
        Engine().patch(mod.__name__, source=source.replace("int)", "int, doc='a proxy')"))
    assert type(mod.Proxy) is type and mod.Proxy().__class__ is int


def test_a_running_scripts_loop_is_the_program_not_derived_state(tmp_path: Path) -> None:
    """`__main__` whose top-level loop calls a changed function: the patch applies (the loop
    runs the new code from its next call on); a value the script computed before the loop is
    derived state a restart would recompute: refused."""
    (tmp_path / "hp_fid_lib.py").write_text("def value():\n    return 1\n", encoding="utf-8")
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import structlog
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
        import hp_fid_lib
        from hotpatch import Engine, PatchRejected
        START
        engine = Engine()
        seen = []
        for step in range(2):
            seen.append(hp_fid_lib.value())
            if step == 0:
                try:
                    engine.patch("hp_fid_lib", source="def value():\\n    return 2\\n")
                    print("applied")
                except PatchRejected as exc:
                    print("refused", exc.reason)
        print(seen)
        """
    )
    outputs = []
    for start in ("", "START = hp_fid_lib.value()"):
        path = tmp_path / "script.py"
        path.write_text(script.replace("START", start), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, str(path), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "PYTHONPATH": str(Path(hotpatch.__file__).parent.parent)},
        )
        outputs.append(done.stdout.splitlines())
    assert outputs[0] == ["applied", "[1, 2]"]
    assert outputs[1][0].startswith("refused needs a restart: the program's script computes")
    assert outputs[1][1] == "[1, 1]"


# -- replay follow-up: defects the replay benchmark found -------------------------------------------


MARKER_SOURCE = """
class C:
    __marker = object()

    def pop(self, key, default=__marker, *, other=__marker):
        if default is self.__marker:
            raise KeyError(key)
        return default

    def other(self, *, default=__marker):
        return default is self.__marker
"""


def test_a_method_default_from_the_class_body_is_the_live_value(make_module) -> None:
    mod = make_module(MARKER_SOURCE)
    Engine().patch(mod.__name__, source=MARKER_SOURCE.replace("return default\n", "return 2\n"))
    with pytest.raises(KeyError):
        mod.C().pop(1)  # the default is the live sentinel, as the body compares it with
    assert mod.C().pop(1, 5) == 2 and mod.C().other() is True


def test_a_class_built_on_a_namedtuple_can_be_patched(make_module) -> None:
    source = (
        "import collections\n\n"
        "class Info(collections.namedtuple('Info', 'hits misses')):\n"
        "    __slots__ = ()\n\n"
        "def f():\n    return 1\n"
    )
    mod = make_module(source)
    live_class, info = mod.Info, mod.Info(1, 2)
    result = Engine().patch(mod.__name__, source=source.replace("return 1", "return 2"))
    assert "f" in result.changed and mod.f() == 2
    assert mod.Info is live_class and isinstance(info, mod.Info) and mod.Info(3, 4).misses == 4


def test_a_namedtuple_base_whose_statement_changed_is_refused(make_module) -> None:
    source = (
        "import collections\n\n"
        "class Info(collections.namedtuple('Info', 'hits misses')):\n"
        "    __slots__ = ()\n"
    )
    mod = make_module(source)
    with pytest.raises(PatchRejected, match="base classes changed"):
        Engine().patch(mod.__name__, source=source.replace("hits misses", "hits misses size"))
    assert mod.Info._fields == ("hits", "misses")


IMPORTER_SOURCE = """
import sys

class Importer:
    def find_spec(self, name, path=None, target=None):
        return None

IMPORTER = Importer()
# six's pattern: take out the importer an earlier execution of this module installed.
if sys.meta_path:
    for i, importer in enumerate(sys.meta_path):
        if type(importer).__name__ == "Importer" and type(importer).__module__ == __name__:
            del sys.meta_path[i]
            break
    del i, importer
sys.meta_path.append(IMPORTER)
sys.path_hooks.append(IMPORTER.find_spec)
sys.path.append("/nonexistent/hp-" + __name__)
"""


@pytest.mark.parametrize("outcome", ["refused", "dry-run", "applied"])
def test_import_system_changes_of_a_candidate_are_undone_unless_applied(
    make_module, outcome: str
) -> None:
    before = (list(sys.meta_path), list(sys.path_hooks), list(sys.path))
    mod = make_module(IMPORTER_SOURCE)
    live = (list(sys.meta_path), list(sys.path_hooks), list(sys.path))
    assert mod.IMPORTER in sys.meta_path
    engine = Engine()
    try:
        new = IMPORTER_SOURCE + "\nVALUE = 2\n"
        if outcome == "refused":
            with pytest.raises(PatchRejected):
                engine.patch(mod.__name__, source=new + "raise RuntimeError('broken')\n")
        elif outcome == "dry-run":
            engine.check(mod.__name__, source=new)
        else:
            engine.patch(mod.__name__, source=new)
        after = (list(sys.meta_path), list(sys.path_hooks), list(sys.path))
        if outcome == "applied":
            # What a restart would have: the module's importer installed once, the new one.
            assert [h for h in sys.meta_path if type(h).__name__ == "Importer"] == [
                sys.meta_path[-1]
            ]
            assert mod.IMPORTER is sys.meta_path[-1] and mod.VALUE == 2
        else:
            assert [list(map(id, x)) for x in after] == [list(map(id, x)) for x in live]
    finally:
        sys.meta_path[:], sys.path_hooks[:], sys.path[:] = before


def test_changed_values_follow_re_exports(make_package) -> None:
    for names in (["data", ""], ["data"]):
        name = make_package(
            {"__init__.py": "from .data import VERSION\n", "data.py": 'VERSION = "1"\n'}
        )
        import importlib

        pkg = importlib.import_module(name)
        data = importlib.import_module(f"{name}.data")
        Path(str(data.__file__)).write_text('VERSION = "2"\n', encoding="utf-8")
        modules = [f"{name}.{n}" if n else name for n in names]
        Engine().patch_many(modules)
        assert data.VERSION == "2" and pkg.VERSION == "2", names


def test_policy_refusals_say_they_are_policy_not_restart(make_module) -> None:
    mod = make_module("def f(a, b):\n    return a\n\ndef g():\n    return 1\n")
    with pytest.raises(PatchRejected) as info:
        Engine().patch(mod.__name__, source="def f(a):\n    return a\n")
    assert info.value.reason.startswith("compatibility policy, not a restart: f(): ")
    assert "allow_removals=True" in info.value.reason and "needs a restart" not in str(info.value)
    assert mod.f(1, 2) == 1 and mod.g() == 1
    with pytest.raises(PatchRejected, match=r"compatibility policy.*'g' was removed"):
        Engine().patch(mod.__name__, source="def f(a, b):\n    return b\n")
    # A problem that needs a restart is named first: allow_removals=True would not lift it.
    source = "class K:\n    __slots__ = ('a',)\n\ndef f(a, b):\n    return a\n"
    both = make_module(source)
    new = source.replace("('a',)", "('a', 'b')").replace("f(a, b)", "f(a)")
    with pytest.raises(PatchRejected) as info:
        Engine().patch(both.__name__, source=new)
    assert "restart" in info.value.reason and "policy" not in info.value.reason
    assert info.value.reason.endswith("(and 1 more)") and both.K.__slots__ == ("a",)
    result = Engine().patch(mod.__name__, source="def f(a):\n    return -a\n", allow_removals=True)
    assert mod.f(3) == -3 and "g" in result.removed


def test_an_object_of_the_module_that_defines_its_type_does_not_refuse(make_module) -> None:
    # idna 3.19 -> 3.18 drops ``from __future__ import annotations``: the old value is
    # ``__future__.annotations`` (a ``_Feature``), which other objects hold as they do in a
    # restarted process (refused before: "the old _Feature is also held elsewhere").
    import __future__

    mod = make_module("from __future__ import annotations\nX = 1\n")
    held = [__future__.annotations]
    Engine().patch(mod.__name__, source="X = 2\n", allow_removals=True)
    assert not hasattr(mod, "annotations") and mod.X == 2
    assert held[0] is __future__.annotations


def test_a_registry_of_the_changed_module_held_elsewhere_still_refuses(make_module) -> None:
    # The rule above is about objects of another module: this module's own dict, held by
    # another object, is still refused when the module builds a new one.
    mod = make_module("REGISTRY = {'a': 1}\n")
    held = [mod.REGISTRY]
    with pytest.raises(PatchRejected, match=r"REGISTRY becomes a new object"):
        Engine().patch(mod.__name__, source="REGISTRY = {'a': 2}\n")
    assert held[0] is mod.REGISTRY and mod.REGISTRY == {"a": 1}


def test_a_compiled_pattern_held_by_the_re_cache_does_not_refuse(make_module) -> None:
    # ``re`` keeps every pattern it compiled in its cache, in a restarted process as well
    # (idna 3.19 -> 3.18: "the old Pattern is also held elsewhere (dict)").
    mod = make_module("import re\nPAT = re.compile('a+')\n")
    Engine().patch(mod.__name__, source="import re\nPAT = re.compile('b+')\n")
    assert mod.PAT.pattern == "b+"


# -- the pairing of candidate objects with live ones is by identity, for the whole change set ------


ADDRESS_M1 = "def f():\n    return 1\n"
ADDRESS_K = "from . import m1\n\nclass T(tuple):\n    pass\n"
ADDRESS_M1_NEW = (
    ADDRESS_M1
    + "\nclass New:\n"
    + "".join(f"    def m{i}(self):\n        return {i}\n\n" for i in range(8))
)
ADDRESS_K_NEW = (
    "from . import m1\n\nclass T(tuple):\n    def __add__(self, other):\n"
    "        return 'new'\n\n    def __radd__(self, other):\n        return 'rnew'\n"
)


def test_an_address_freed_while_planning_is_never_paired_again(make_package) -> None:
    # The methods of a class new in m1 are rebuilt on the live module's globals and the
    # candidate's functions dropped; k, planned next, makes new functions that may take their
    # addresses. Keyed by id() alone, a new method of k was paired with a method of m1's class
    # (found replaying cachetools 8.0.0 -> 7.3.3: ``_HashedTuple.__add__`` committed as
    # ``_ClassMethodDescriptor.__call__``, caught by the check after the commit).
    pkg = make_package({"__init__.py": "", "m1.py": ADDRESS_M1, "k.py": ADDRESS_K})
    __import__(f"{pkg}.k")
    root = Path(str(sys.modules[pkg].__file__)).parent
    names = [f"{pkg}.m1", f"{pkg}.k"]
    for _ in range(3):  # there and back: the addresses differ from one round to the next
        (root / "m1.py").write_text(ADDRESS_M1_NEW)
        (root / "k.py").write_text(ADDRESS_K_NEW)
        results = Engine().patch_many(names, allow_removals=True)
        k, m1 = sys.modules[f"{pkg}.k"], sys.modules[f"{pkg}.m1"]
        assert results[1].added == ("T.__add__", "T.__radd__")
        assert k.T() + () == "new" and () + k.T() == "rnew"  # noqa: RUF005 - the operators
        assert [getattr(m1.New(), f"m{i}")() for i in range(8)] == list(range(8))
        (root / "m1.py").write_text(ADDRESS_M1)
        (root / "k.py").write_text(ADDRESS_K)
        Engine().patch_many(names, allow_removals=True)
        assert not hasattr(k.T, "__add__") or k.T.__add__ is tuple.__add__


def test_a_replaced_value_other_modules_import_costs_no_heap_walk(
    make_package, heap_walks: list[str]
) -> None:
    # A replaced list held elsewhere needs a walk of the heap to name what holds it, unless
    # every reference is a module namespace's (counted without a walk): then no walk.
    pkg = make_package(
        {
            "__init__.py": "",
            "m.py": "TABLE = [1, 2]\n",
            "user.py": "from .m import TABLE\n\ndef size():\n    return len(TABLE)\n",
        }
    )
    __import__(f"{pkg}.user")
    Engine().patch(f"{pkg}.m", source="TABLE = [1, 2, 3]\n")
    assert sys.modules[f"{pkg}.user"].size() == 3  # re-derived, as in a restart
    assert "_referrers_of" not in heap_walks, heap_walks
    # Held by something else than a module, it is walked for, and refused.
    keep = {"table": sys.modules[f"{pkg}.m"].TABLE}
    with pytest.raises(PatchRejected, match="also held elsewhere"):
        Engine().patch(f"{pkg}.m", source="TABLE = [1, 2, 3, 4]\n")
    assert keep["table"] == [1, 2, 3]


def test_a_module_the_namespace_index_has_not_read_is_counted_by_a_walk(
    make_module, heap_walks: list[str]
) -> None:
    # Only the modules the namespace index says hold a replaced value are counted; one that
    # bound it at run time, after the index last read it, is left uncounted, and the heap walk
    # decides (a module's own run-time name is its live state: not a refusal).
    m = make_module("TABLE = [1, 2]\n")
    other = make_module("X = 1\n")
    engine = Engine()
    engine.patch(m.__name__, source="TABLE = [1, 2, 3]\n")
    assert "_referrers_of" not in heap_walks
    other.ALIAS = m.TABLE  # no import since: the index has not read this
    engine.patch(m.__name__, source="TABLE = [1, 2, 3, 4]\n")
    assert "_referrers_of" in heap_walks
    assert m.TABLE == [1, 2, 3, 4] and other.ALIAS == [1, 2, 3]


# -- tracebacks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("page_break", ["\f", "\x1c", "\x85", "\u2028"])
def test_a_traceback_after_a_patch_shows_the_line_that_raised(make_module, page_break) -> None:
    # The live version's lines are cached for tracebacks (its file may say something else).
    # The compiler counts lines at newlines only; a character str.splitlines also breaks at (a
    # form feed between two "pages" of a module) must not move every line after it by one.
    m = make_module("def f():\n    return 1\n")
    new = f"# page one\n#{page_break}\n# page two\ndef f():\n    x = 1\n    raise ValueError(x)\n"
    Engine().patch(m.__name__, source=new)
    with pytest.raises(ValueError, match="1") as raised:
        m.f()
    frame = traceback.extract_tb(raised.value.__traceback__)[-1]
    assert (frame.lineno, frame.line) == (6, "raise ValueError(x)")
