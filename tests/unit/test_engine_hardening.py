"""The engine's reliability and argument validation (issue 9, "Reliability of the engine").

Real threads, real imports, real files: each test fails on the engine before the fix.
"""

from __future__ import annotations

import gc
import importlib
import math
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import hotpatch
from hotpatch import ConfigError, Engine, HotpatchError, PatchRejected


def wait_until(pred: Callable[[], bool], *, timeout_s: float = 20.0, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.001)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture(name="importable")
def _importable(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path`` on ``sys.path``; modules imported from it are forgotten afterwards."""
    before = set(sys.modules)
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in set(sys.modules) - before:
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]
    for name in [n for n in set(sys.modules) - before if n.startswith("hp_ns_")]:
        del sys.modules[name]


# -- 1. a module still being imported by another thread ------------------------------------------

SLOW_IMPORT = """
import {gate}

def f():
    return "f-old"

{gate}.started.set()
{gate}.go.wait(30)

def g():
    return "g-old"
"""


def test_patch_during_import_is_refused_and_nothing_is_half_applied(
    importable: Path, make_module
) -> None:
    gate = make_module("import threading\nstarted = threading.Event()\ngo = threading.Event()\n")
    name = unique("hp_slow")
    source = SLOW_IMPORT.format(gate=gate.__name__)
    (importable / f"{name}.py").write_text(source, encoding="utf-8")
    importer = threading.Thread(target=importlib.import_module, args=(name,), daemon=True)
    importer.start()
    try:
        wait_until(gate.started.is_set, what="the import to reach its middle")
        engine = Engine()
        new = source.replace("-old", "-new")
        with pytest.raises(PatchRejected) as info:
            engine.patch(name, source=new)
        assert info.value.stage == "load"
        assert "still being imported" in info.value.reason
        with pytest.raises(PatchRejected) as info:
            engine.check(name, source=new)
        assert info.value.stage == "load"
        engine.track(name)  # recording the baseline (the file) is fine meanwhile: watch does it
        assert [v.outcome for v in engine.history(name)] == ["baseline"]
    finally:
        gate.go.set()
        importer.join(30)
    module = sys.modules[name]
    assert (module.f(), module.g()) == ("f-old", "g-old")
    assert not any(v.outcome == "applied" for v in engine.history(name))
    # Once the import is complete, the same patch applies whole.
    engine.patch(name, source=source.replace("-old", "-new"))
    assert (module.f(), module.g()) == ("f-new", "g-new")


# -- 5. __main__ without a main guard, and patches started from inside a patch ---------------------

SCRIPT_WITHOUT_GUARD = """
import sys
import hotpatch

def f():
    return 1

try:
    hotpatch.patch("__main__", source=open(__file__).read().replace("return 1", "return 2"))
except hotpatch.PatchRejected as exc:
    print("REFUSED", exc.stage, exc.reason)
    sys.exit(0)
print("APPLIED")
"""


def test_patching_main_without_a_main_guard_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT_WITHOUT_GUARD, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    outcomes = [
        line for line in done.stdout.splitlines() if line.startswith(("REFUSED", "APPLIED"))
    ]
    assert len(outcomes) == 1, done.stdout[-2000:]
    first = outcomes[0]
    assert first.startswith("REFUSED compile"), first
    assert "__name__" in first and "run the whole program again" in first


def test_a_patch_started_by_the_candidates_own_top_level_code_is_refused(make_module) -> None:
    helper = make_module(
        "armed = []\n"
        "def on_import(name):\n"
        "    if armed:\n"
        "        engine, source = armed\n"
        "        engine.patch(name, source=source)\n"
    )
    source = (
        f"import {helper.__name__}\n\n"
        "def f():\n    return VERSION\n\n"
        "VERSION = 1\n"
        f"{helper.__name__}.on_import(__name__)\n"
    )
    mod = make_module(source)
    engine = Engine()
    new = source.replace("VERSION = 1", "VERSION = 2")
    helper.armed.extend([engine, new])
    with pytest.raises(PatchRejected) as info:
        engine.patch(mod.__name__, source=new)
    assert info.value.stage == "execute"
    assert "inside another patch" in info.value.reason
    assert mod.f() == 1


# -- 7. wrong arguments fail at once, naming the argument ------------------------------------------


def test_namespace_package_is_named_as_such(importable: Path) -> None:
    name = unique("hp_ns")
    (importable / name).mkdir()
    importlib.import_module(name)
    with pytest.raises(PatchRejected) as info:
        hotpatch.Engine().patch(name, source="x = 1\n")
    assert info.value.stage == "load"
    assert "namespace package" in info.value.reason
    assert "built-in" not in info.value.reason


@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [
        ({"safepoint_timeout_s": "abc"}, TypeError, "safepoint_timeout_s"),
        ({"safepoint_timeout_s": -1}, ConfigError, "safepoint_timeout_s"),
        ({"safepoint_timeout_s": math.nan}, ConfigError, "safepoint_timeout_s"),
        ({"verify_timeout_s": math.inf}, ConfigError, "verify_timeout_s"),
        ({"verify_timeout_s": 0}, ConfigError, "verify_timeout_s"),
        ({"health_timeout_s": -0.5}, ConfigError, "health_timeout_s"),
        ({"health_timeout_s": None}, TypeError, "health_timeout_s"),
        ({"history_limit": 0}, ConfigError, "history_limit"),
        ({"history_limit": 2.5}, TypeError, "history_limit"),
        ({"max_source_bytes": True}, TypeError, "max_source_bytes"),
    ],
)
def test_engine_settings_are_checked_at_once(
    kwargs: dict[str, object], error: type[Exception], named: str
) -> None:
    with pytest.raises(error) as info:
        Engine(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert named in message and "\n" not in message


def test_per_call_timeouts_are_checked(make_module) -> None:
    mod = make_module("def f():\n    return 1\n")
    engine = Engine()
    for bad, error in ((-1, ConfigError), (math.nan, ConfigError), ("1", TypeError)):
        with pytest.raises(error, match="safepoint_timeout_s"):
            engine.patch(mod.__name__, source="def f():\n    return 2\n", safepoint_timeout_s=bad)  # type: ignore[arg-type]
        with pytest.raises(error, match="safepoint_timeout_s"):
            engine.rollback(mod.__name__, safepoint_timeout_s=bad)  # type: ignore[arg-type]
    assert mod.f() == 1


def test_patch_many_of_a_single_name_is_a_type_error(make_module) -> None:
    mod = make_module("def f():\n    return 1\n")
    with pytest.raises(TypeError, match=r"patch_many\(changes\)"):
        Engine().patch_many(mod.__name__)  # would have tried each character as a module


def test_history_of_an_unknown_module_is_an_error(make_module) -> None:
    engine = Engine()
    with pytest.raises(
        ConfigError, match=r"history\(module\): module 'hp_typo_mod' is not imported"
    ):
        engine.history("hp_typo_mod")
    with pytest.raises(TypeError, match=r"history\(module\)"):
        engine.history(42)  # type: ignore[arg-type]
    mod = make_module("x = 1\n")
    assert engine.history(mod.__name__) == []  # imported, never patched: no versions yet


def test_rollback_of_an_unknown_module_is_an_error(make_module) -> None:
    engine = Engine()
    with pytest.raises(ConfigError, match=r"rollback\(module\): module 'hp_typo_mod'"):
        engine.rollback("hp_typo_mod")
    mod = make_module("x = 1\n")
    with pytest.raises(TypeError, match=r"rollback\(to\)"):
        engine.rollback(mod.__name__, to=3)  # type: ignore[arg-type]
    with pytest.raises(HotpatchError, match="no earlier version"):
        engine.rollback(mod.__name__)


def test_tracking_a_module_that_is_not_imported_is_an_error() -> None:
    with pytest.raises(
        ConfigError, match=r"track\(modules\): module 'hp_typo_mod' is not imported"
    ):
        Engine().track("hp_typo_mod")
    with pytest.raises(TypeError, match=r"track\(modules\)"):
        Engine().track(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("api", ["verifier", "health_check"])
def test_registering_for_a_module_that_is_not_imported_fails_at_the_call(api: str) -> None:
    engine = Engine()
    with pytest.raises(
        ConfigError, match=rf"{api}\(module\): module 'hp_typo_mod' is not imported"
    ):
        getattr(engine, api)("hp_typo_mod")  # fails before any function is decorated
    with pytest.raises(TypeError, match=rf"{api}\(module\)"):
        getattr(engine, api)(42)


# -- 2. the gate does not change the recursion depth the application can use ----------------------

RECURSIVE = """
def f(n):
    if n == 0:
        return "old"
    return f(n - 1)
"""


def _depth() -> int:
    n, frame = 0, sys._getframe()
    while frame is not None:
        n += 1
        frame = frame.f_back
    return n


def test_recursion_near_the_limit_survives_patches_of_the_recursive_function(make_module) -> None:
    """A thread recursing to ``limit - MARGIN`` frames, all the time, while ``f`` is patched.

    Each patch finds the thread inside ``f``, so it gates ``f``: the thread's deeper calls go
    through the gate in the old world. Without the gate's compensation, each of them cost extra
    frames and the thread hit RecursionError.
    """
    margin = 8
    mod = make_module(RECURSIVE)
    limit = sys.getrecursionlimit()
    stop = threading.Event()
    rounds: list[int] = [0]
    errors: list[BaseException] = []

    def recurse_forever() -> None:
        target = limit - margin - (_depth() + 1)  # f(target) puts its deepest frame there
        while not stop.is_set():
            try:
                mod.f(target)
            except RecursionError as exc:
                errors.append(exc)
                return
            rounds[0] += 1

    thread = threading.Thread(target=recurse_forever, name="recursing", daemon=True)
    thread.start()
    engine = Engine(safepoint_timeout_s=30)
    try:
        wait_until(lambda: rounds[0] > 10, what="the recursing thread to run")
        for i in range(30):
            new = RECURSIVE.replace('"old"', f'"v{i}"')
            engine.patch(mod.__name__, source=new)
            if errors:
                break
    finally:
        stop.set()
        thread.join(30)
    assert not errors, f"RecursionError in the application thread: {errors[0]!r}"
    assert sys.getrecursionlimit() == limit  # every compensation step was paid back
    assert mod.f(3) == "v29"


# -- 4. generators suspended across a patch -----------------------------------------------------

GENERATOR = """
def _scale(x):
    return x * 10

def stream():
    yield _scale(1)
    yield _scale(2)
"""
GENERATOR_NEW = """
def _scale(x, factor):
    return x * factor

def stream():
    yield _scale(1, 100)
    yield _scale(2, 100)
"""


def test_a_suspended_generator_in_replaced_code_holds_the_patch(make_module) -> None:
    mod = make_module(GENERATOR)
    running = mod.stream()
    assert next(running) == 10  # suspended inside the old stream()
    engine = Engine()
    with pytest.raises(PatchRejected) as info:
        engine.patch(mod.__name__, source=GENERATOR_NEW, safepoint_timeout_s=0.3)
    err = info.value
    assert err.stage == "safepoint"
    assert "suspended generator of stream()" in err.reason
    assert err.filename == mod.__file__ and err.lineno == 6  # the first yield
    assert next(running) == 20  # resumes on the old code with the old helper: no TypeError
    not_started = mod.stream()  # a generator that has not started runs old code too
    with pytest.raises(PatchRejected, match="suspended generator"):
        engine.patch(mod.__name__, source=GENERATOR_NEW, safepoint_timeout_s=0.1)
    assert list(not_started) == [10, 20]
    del running, not_started
    engine.patch(mod.__name__, source=GENERATOR_NEW)
    assert list(mod.stream()) == [100, 200]


def test_generator_code_costs_a_heap_walk_only_when_something_unknown_holds_it(
    make_module, heap_walks: list[str]
) -> None:
    # Looking for suspended generators walks the heap (``gc.get_referrers``, every thread
    # waiting). When every reference to the replaced generator code is one hotpatch knows (the
    # live function, its own records), no generator can exist: no walk. Something else holding
    # the code (here a list; a generator's frame in real life) costs one walk, at the attempt.
    mod = make_module(GENERATOR)
    Engine().patch(mod.__name__, source=GENERATOR_NEW, safepoint_timeout_s=20)
    assert list(mod.stream()) == [100, 200]
    assert heap_walks.count("suspended_inside") == 0, heap_walks
    unknown = [mod.stream.__code__]
    Engine().patch(mod.__name__, source=GENERATOR, safepoint_timeout_s=20)
    assert list(mod.stream()) == [10, 20]
    assert heap_walks.count("suspended_inside") == 1, heap_walks
    del unknown


def test_statement_code_kept_for_the_next_version_costs_no_heap_walk(
    make_module, heap_walks: list[str]
) -> None:
    # Each version's code is kept by the statement (``pieces``) to compile the next one from:
    # it holds the generator's code too (in its class body's constants). Those holders are
    # known, so patching back and forth in one engine walks the heap no more than before, and
    # only the live version keeps its statements' code.
    feed = "import itertools\n\n" + METHOD_GEN
    mod = make_module(feed)
    engine = Engine()
    for text in (feed.replace("yield 2", "yield 3"), feed, feed.replace("yield 2", "yield 3")):
        engine.patch(mod.__name__, source=text, safepoint_timeout_s=20)
        gc.collect()  # the last patch's records are a cycle: collected, they hold no code
    assert list(mod.Feed().items()) == [1, 3]
    assert heap_walks.count("suspended_inside") == 0, heap_walks
    entries = engine._histories[mod.__name__].entries
    kept = [e for e in entries if e.source is not None and e.source.pieces is not None]
    assert [e.version.is_live for e in kept] == [True]
    unknown = [mod.Feed.items.__code__]
    engine.patch(mod.__name__, source=feed, safepoint_timeout_s=20)
    assert list(mod.Feed().items()) == [1, 2]
    assert heap_walks.count("suspended_inside") == 1, heap_walks
    del unknown


GENEXPR = """
def numbers(n):
    return (i * 10 for i in range(n))
"""
GENEXPR_NEW = """
def numbers(n):
    return (i * 100 for i in range(n))
"""
METHOD_GEN = """
class Feed:
    def items(self):
        yield 1
        yield 2
"""
METHOD_GEN_NEW = METHOD_GEN.replace("yield 2", "yield 3")


@pytest.mark.parametrize(
    ("old", "new", "start"),
    [
        (GENEXPR, GENEXPR_NEW, lambda mod: mod.numbers(3)),  # a generator expression escaped
        (METHOD_GEN, METHOD_GEN_NEW, lambda mod: mod.Feed().items()),  # a method's generator
    ],
    ids=["generator expression", "method"],
)
def test_a_generator_of_replaced_code_is_found_after_earlier_patches(
    make_module, old: str, new: str, start: Callable[[object], Iterator[int]]
) -> None:
    # The known references to a replaced code are counted instead of walking the heap; after
    # patches back and forth (earlier candidates linger as garbage, holding codes too), a
    # generator started before the patch must still hold it.
    mod = make_module(old)
    engine = Engine()
    for source in (new, old, new, old):
        engine.patch(mod.__name__, source=source)
    running = start(mod)
    assert next(running) in (0, 1)
    with pytest.raises(PatchRejected, match="suspended generator"):
        engine.patch(mod.__name__, source=new, safepoint_timeout_s=0.2)
    assert list(running) in ([10, 20], [2])  # the old code to the end
    engine.patch(mod.__name__, source=new)


def test_the_reference_count_of_this_python_is_measured_at_import() -> None:
    from hotpatch.engine import safepoint

    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        assert safepoint._OWN_REFERENCES is None  # counts are not exact: always walk
    else:
        assert safepoint._OWN_REFERENCES is not None


def test_no_gate_outlives_its_commit(make_module) -> None:
    # The gate's trampolines hold the gate in their constants and the gate held them: a cycle
    # through code objects, which the cyclic collector cannot see, so every commit leaked its
    # gate and the old state of every gated function (13 KiB a patch on a 300-line module).
    from hotpatch.engine import safepoint

    mod = make_module(GENERATOR.replace("def stream", "def plain_stream"))
    engine = Engine()
    new = GENERATOR_NEW.replace("def stream", "def plain_stream")
    for _ in range(5):
        engine.patch(mod.__name__, source=new)
        engine.rollback(mod.__name__)
    gc.collect()
    alive = [o for o in gc.get_objects() if type(o) is safepoint._Gate]
    assert alive == []


def test_the_patch_waits_for_a_suspended_generator_to_finish(make_module) -> None:
    mod = make_module(GENERATOR)
    running = mod.stream()
    assert next(running) == 10
    results: list[object] = []

    def finish_later() -> None:
        time.sleep(0.3)  # the generator's consumer is busy elsewhere for a while
        results.extend(running)
        running.close()

    consumer = threading.Thread(target=finish_later, daemon=True)
    consumer.start()
    Engine().patch(mod.__name__, source=GENERATOR_NEW, safepoint_timeout_s=20)
    consumer.join(20)
    assert results == [20]  # finished on the old code, then the patch went in
    assert list(mod.stream()) == [100, 200]


# -- 3. registrations a candidate makes in other live modules ------------------------------------

REGISTRY = """
HANDLERS = {}
PLUGINS = []
TAGS = set()

def register(fn):
    HANDLERS[fn.__name__] = fn
    return fn

class Meta(type):
    classes = []

    def __init__(cls, name, bases, namespace):
        super().__init__(name, bases, namespace)
        Meta.classes.append(cls)

class Plugin:
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        PLUGINS.append(cls)

class _Proxy:  # resists being looked at (a proxy outside its context): the snapshot copes
    def __getattr__(self, name):
        raise RuntimeError("outside of context")

    def __eq__(self, other):
        raise RuntimeError("outside of context")

    __hash__ = None

proxy = _Proxy()
"""

REGISTERING = """
import {reg}
from {reg} import Meta, Plugin, proxy, register

@register
def handle():
    return "v1"

class Model(metaclass=Meta):
    def m(self):
        return "v1"

class Csv(Plugin):
    def render(self):
        return "v1"

{reg}.TAGS.add(Csv)
"""


def _registered(reg) -> tuple[object, ...]:  # type: ignore[no-untyped-def]
    return (dict(reg.HANDLERS), list(reg.Meta.classes), list(reg.PLUGINS), set(reg.TAGS))


def test_refused_and_dry_run_candidates_leave_no_registration_behind(make_module) -> None:
    reg = make_module(REGISTRY)
    source = REGISTERING.format(reg=reg.__name__)
    mod = make_module(source)
    live = ({"handle": mod.handle}, [mod.Model], [mod.Csv], {mod.Csv})
    assert _registered(reg) == live
    engine = Engine()
    v2 = source.replace('"v1"', '"v2"')

    engine.check(mod.__name__, source=v2)  # a dry run
    assert _registered(reg) == live

    def refuse(candidate: object) -> None:
        raise ValueError("not today")

    engine.verifier(mod.__name__)(refuse)
    with pytest.raises(PatchRejected, match="not today"):
        engine.patch(mod.__name__, source=v2)
    assert _registered(reg) == live
    engine._verifiers.clear()

    with pytest.raises(PatchRejected) as info:  # registers, then fails at import
        engine.patch(mod.__name__, source=v2 + "\nraise RuntimeError('late')\n")
    assert info.value.stage == "execute"
    assert _registered(reg) == live

    engine.patch(mod.__name__, source=v2)  # applied: the live objects stay registered, once
    assert _registered(reg) == live
    assert reg.HANDLERS["handle"]() == "v2"
    assert reg.PLUGINS[0]().render() == "v2"


def test_an_applied_patch_registers_its_new_objects_as_the_live_ones(make_module) -> None:
    reg = make_module(REGISTRY)
    source = REGISTERING.format(reg=reg.__name__)
    mod = make_module(source)
    engine = Engine()
    v2 = source + (
        "\n@register\ndef extra():\n    return handle()\n"
        "\nclass Json(Plugin):\n    def render(self):\n        return 'json'\n"
    )
    engine.patch(mod.__name__, source=v2)
    assert reg.HANDLERS["extra"] is mod.extra  # the live (re-bound) function, not the candidate's
    assert reg.HANDLERS["extra"]() == "v1"
    assert [mod.Csv, mod.Json] == reg.PLUGINS

    @engine.health_check(mod.__name__)
    def unhealthy() -> None:
        raise RuntimeError("broken")

    v3 = v2 + "\n@register\ndef broken():\n    return 0\n"
    with pytest.raises(PatchRejected) as info:
        engine.patch(mod.__name__, source=v3)
    assert info.value.stage == "health"
    assert "broken" not in reg.HANDLERS  # rolled back: its registration too
    assert reg.HANDLERS["extra"] is mod.extra


def test_the_registration_snapshot_copes_with_objects_that_resist_being_looked_at(
    make_module,
) -> None:
    """isinstance() asks an object for ``__class__``; a proxy outside its context raises there."""
    from hotpatch.engine.registrations import snapshot

    reg = make_module(REGISTRY)
    mod = make_module(
        f"import {reg.__name__}\n"
        "class _Proxy:\n"
        "    @property\n"
        "    def __class__(self):\n"
        "        raise RuntimeError('outside of context')\n"
        "    def __getattr__(self, name):\n"
        "        raise RuntimeError('outside of context')\n"
        "proxy = _Proxy()\n"
        f"{reg.__name__}.PLUGINS.append(proxy)\n"
    )
    taken = snapshot(mod)
    candidate: dict[str, object] = {}
    exec(
        f"import {reg.__name__}\ndef handler():\n    pass\n{reg.__name__}.HANDLERS['h'] = handler\n",
        candidate,
    )
    reg.PLUGINS.append(mod.proxy)  # a change by someone else: not the candidate's, kept
    found = taken.collect(candidate)
    found.undo()
    assert "h" not in reg.HANDLERS
    assert reg.PLUGINS.count(mod.proxy) == 2


COROUTINE = """
class Pause:
    def __await__(self):
        yield "paused"

def _scale(x):
    return x * 10

async def handle():
    await Pause()
    return _scale(2)
"""


def test_a_suspended_coroutine_in_replaced_code_holds_the_patch(make_module) -> None:
    mod = make_module(COROUTINE)
    request = mod.handle()
    assert request.send(None) == "paused"  # an in-flight request, awaiting I/O
    new = COROUTINE.replace(
        "def _scale(x):\n    return x * 10", "def _scale(x, f):\n    return x * f"
    )
    new = new.replace("_scale(2)", "_scale(2, 100)")
    with pytest.raises(PatchRejected) as info:
        Engine().patch(mod.__name__, source=new, safepoint_timeout_s=0.2)
    assert info.value.stage == "safepoint"
    assert "suspended coroutine of handle()" in info.value.reason
    with pytest.raises(StopIteration) as done:
        request.send(None)
    assert done.value.value == 20  # finished on the old code, no TypeError
