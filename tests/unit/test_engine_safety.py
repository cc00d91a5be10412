"""Safe point, health checks and rollback, history, threads, logs (issue 2, points 5 to 9)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest
import structlog
from structlog.testing import capture_logs

from hotpatch import Engine, HotpatchError, PatchRejected


def wait_until(pred: Callable[[], bool], *, timeout_s: float = 10.0, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.001)


def run_in_thread(
    fn: Callable[[], object], name: str
) -> tuple[threading.Thread, dict[str, object]]:
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread, box


CHAIN = """
import threading
entered = threading.Event()
release = threading.Event()

def g():
    return 1

def f():
    entered.set()
    release.wait(20)
    return g() + 1
"""
CHAIN_NEW = CHAIN.replace("return 1", 'return "one"').replace("return g() + 1", 'return g() + "!"')


def test_thread_inside_old_code_finishes_on_old_code(make_module) -> None:
    mod = make_module(CHAIN)
    engine = Engine(safepoint_timeout_s=20)
    caller, caller_box = run_in_thread(mod.f, "caller-T")
    wait_until(mod.entered.is_set, what="T inside f")
    patcher, patch_box = run_in_thread(
        lambda: engine.patch(mod.__name__, source=CHAIN_NEW), "patcher"
    )
    patcher.join(0.3)
    assert patcher.is_alive(), "the commit must wait while T is inside the old f"
    mod.release.set()
    caller.join(20)
    patcher.join(20)
    assert caller_box == {"result": 2}  # old f with old g: no mixed chain
    assert "error" not in patch_box, patch_box
    mod.entered.clear()
    assert mod.f() == "one!"


def test_thread_that_never_leaves_fails_at_safepoint(make_module) -> None:
    source = """
import threading
stop = threading.Event()
inside = threading.Event()

def spin():
    while not stop.is_set():
        inside.set()
        stop.wait(0.005)
    return "old"

def other():
    return "old"
"""
    mod = make_module(source)
    spinner, _ = run_in_thread(mod.spin, "spinner-thread")
    try:
        wait_until(mod.inside.is_set, what="spinner inside spin()")
        new = source.replace('return "old"', 'return "new"')
        with pytest.raises(PatchRejected) as info:
            Engine().patch(mod.__name__, source=new, safepoint_timeout_s=0.3)
        err = info.value
        assert err.stage == "safepoint"
        assert "spinner-thread" in err.reason and "spin()" in err.reason
        assert err.filename == mod.__file__ and err.lineno is not None
        assert mod.other() == "old"
    finally:
        mod.stop.set()
        spinner.join(5)


def test_health_failure_restores_exactly(make_module) -> None:
    source = "STATE = {'n': 1}\n\ndef f():\n    return 'old'\n\nclass K:\n    def m(self):\n        return 'old'\n"
    mod = make_module(source)
    engine = Engine()
    before = dict(mod.__dict__)
    codes = (mod.f.__code__, mod.K.m.__code__)
    class_dict = dict(mod.K.__dict__)

    @engine.health_check(mod.__name__)
    def must_be_old() -> None:
        if mod.f() != "old":
            raise RuntimeError("f is broken")

    new = source.replace("'old'", "'new'") + "\nADDED = 1\n"
    with capture_logs() as logs, pytest.raises(PatchRejected) as info:
        engine.patch(mod.__name__, source=new)
    assert info.value.stage == "health" and "f is broken" in info.value.reason
    assert mod.f.__code__ is codes[0] and mod.K.m.__code__ is codes[1]
    assert mod.__dict__.keys() == before.keys()
    assert all(mod.__dict__[k] is v for k, v in before.items())
    assert dict(mod.K.__dict__) == class_dict
    events = [e["event"] for e in logs]
    assert events.index("health_check.failed") < events.index("patch.rolled_back")
    assert events.index("patch.rolled_back") < events.index("patch.rejected")
    assert events.index("patch.committed") < events.index("health_check.failed")
    assert engine.history(mod.__name__)[0].outcome == "rejected"


def test_module_own_health_check_rolls_back(make_module) -> None:
    mod = make_module("def f():\n    return 1\n")
    new = "def f():\n    return -1\n\ndef __hotpatch_health__():\n    assert f() > 0, 'f must be positive'\n"
    with pytest.raises(PatchRejected) as info:
        Engine().patch(mod.__name__, source=new)
    assert info.value.stage == "health" and "f must be positive" in info.value.reason
    assert mod.f() == 1 and not hasattr(mod, "__hotpatch_health__")


def test_hanging_health_check_rolls_back_at_its_deadline(make_module) -> None:
    mod = make_module("def f():\n    return 1\n")
    engine = Engine(health_timeout_s=0.2)
    release = threading.Event()
    engine.health_check(mod.__name__)(lambda: release.wait(30))
    try:
        with pytest.raises(PatchRejected) as info:
            engine.patch(mod.__name__, source="def f():\n    return 2\n")
        assert info.value.stage == "health" and "did not return within 0.2s" in info.value.reason
        assert mod.f() == 1
    finally:
        release.set()


def test_history_is_bounded_and_any_version_restores_exactly(make_module) -> None:
    mod = make_module("def f():\n    return 0\n")
    engine = Engine(history_limit=3)
    ids, codes = [], []
    for i in range(1, 6):
        result = engine.patch(mod.__name__, source=f"def f():\n    return {i}\n")
        ids.append(result.version)
        codes.append(mod.f.__code__)
    restorable = [v for v in engine.history(mod.__name__) if v.outcome == "applied"]
    assert len(engine.history(mod.__name__)) <= 6
    assert [v.id for v in restorable[:3]] == ids[::-1][:3]
    assert engine.history(mod.__name__)[0].is_live

    live = engine.rollback(mod.__name__, to=ids[2])
    assert live.id == ids[2] and mod.f() == 3 and mod.f.__code__ is codes[2]
    with pytest.raises(HotpatchError, match="no restorable version"):
        engine.rollback(mod.__name__, to=ids[0])  # freed: beyond history_limit
    outcomes = {v.id: v.outcome for v in engine.history(mod.__name__)}
    assert outcomes[ids[4]] == "rolled_back" and outcomes[ids[3]] == "rolled_back"
    with pytest.raises(HotpatchError, match="no earlier version"):
        engine.rollback(mod.__name__)  # v3 was the oldest of the 3 kept


def test_rollback_to_baseline_and_nothing_below(make_module) -> None:
    mod = make_module("X = 1\n\ndef f():\n    return X\n")
    code = mod.f.__code__
    engine = Engine()
    engine.patch(mod.__name__, source="X = 2\n\ndef f():\n    return X * 10\n")
    engine.patch(mod.__name__, source="X = 3\n\ndef f():\n    return X * 100\n")
    baseline = engine.history(mod.__name__)[-1]
    assert baseline.outcome == "baseline"
    engine.rollback(mod.__name__, to=baseline.id)
    assert mod.f() == 1 and mod.f.__code__ is code
    with pytest.raises(HotpatchError, match="no earlier version"):
        engine.rollback(mod.__name__)


def test_patch_many_is_all_or_nothing(make_module) -> None:
    a = make_module("def f():\n    return 'a-old'\n")
    b = make_module("def g():\n    return 'b-old'\n")
    engine = Engine()
    with pytest.raises(PatchRejected) as info:
        engine.patch_many({a.__name__: "def f():\n    return 'a-new'\n", b.__name__: "def g(:\n"})
    assert info.value.module == b.__name__
    assert a.f() == "a-old" and b.g() == "b-old"
    results = engine.patch_many(
        {a.__name__: "def f():\n    return 'a-new'\n", b.__name__: "def g():\n    return 'b-new'\n"}
    )
    assert [r.module for r in results] == [a.__name__, b.__name__]
    assert a.f() == "a-new" and b.g() == "b-new"


CONCURRENT = """
def g():
    return "{tag}"

def f():
    return ("{tag}", g())

class Box:
    def get(self):
        return "{tag}"
"""


def test_concurrent_callers_through_500_patches(make_module) -> None:
    # Quiet logs: printing releases the GIL, and under 4 busy threads each re-acquisition waits.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    mod = make_module(CONCURRENT.format(tag="A"))
    engine = Engine(safepoint_timeout_s=10)
    stop = threading.Event()
    errors: list[BaseException] = []
    mixed = []
    calls = [0] * 4

    def caller(index: int) -> None:
        box = mod.Box()
        f = mod.f
        while not stop.is_set():
            try:
                outer, inner = f()
                if outer != inner:
                    mixed.append((outer, inner))
                box.get()
                calls[index] += 1
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(500):
            engine.patch(mod.__name__, source=CONCURRENT.format(tag="B" if i % 2 == 0 else "A"))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert errors == []
    assert mixed == []
    assert all(c > 0 for c in calls)
    assert mod.f() == ("A", "A")


def test_log_events_carry_module_version_stage_and_duration(make_module) -> None:
    mod = make_module("def f():\n    return 1\n")
    engine = Engine()
    with capture_logs() as logs:
        result = engine.patch(mod.__name__, source="def f():\n    return 2\n")
        with pytest.raises(PatchRejected):
            engine.patch(mod.__name__, source="def f(:\n")
        engine.rollback(mod.__name__)
    by_event = {e["event"]: e for e in logs}
    assert {
        "patch.started",
        "patch.applied",
        "patch.rejected",
        "patch.rolled_back",
    } <= by_event.keys()
    assert by_event["patch.started"]["modules"] == [mod.__name__]  # one event per change set
    applied = by_event["patch.applied"]
    assert applied["module"] == mod.__name__ and applied["version"] == result.version
    assert applied["duration_s"] >= 0 and applied["changed"] == ["f"]
    rejected = by_event["patch.rejected"]
    assert rejected["stage"] == "compile" and rejected["lineno"] == 1
    assert by_event["patch.rolled_back"]["restored"] == result.previous


LONG = """
import threading
entered = threading.Event()
release = threading.Event()

def step():
    return "old"

def long_call():
    entered.set()
    release.wait(30)
    return "old:" + step()

def short_call():
    return step()
"""


def test_a_long_call_does_not_hold_other_callers_at_the_gate(make_module) -> None:
    """A caller waits at a gate at most a moment, even while a long call holds up the commit."""
    mod = make_module(LONG)
    engine = Engine(safepoint_timeout_s=30)
    long_thread, long_box = run_in_thread(mod.long_call, "long-request")
    wait_until(mod.entered.is_set, what="the long call inside long_call()")
    stop = threading.Event()
    calls = [0]

    def short_caller() -> None:
        while not stop.is_set():
            mod.short_call()
            calls[0] += 1

    short_thread = threading.Thread(target=short_caller, name="short-requests", daemon=True)
    short_thread.start()
    patcher, patch_box = run_in_thread(
        lambda: engine.patch(mod.__name__, source=LONG.replace('"old', '"new')), "patcher"
    )
    try:
        wait_until(lambda: calls[0] > 0, what="short calls running")
        for _ in range(3):  # short calls keep completing while the commit waits for the long one
            seen = calls[0]
            wait_until(
                lambda seen=seen: calls[0] > seen + 50, timeout_s=10, what="more short calls"
            )
            assert patcher.is_alive(), patch_box
        mod.release.set()
        long_thread.join(10)
        patcher.join(30)
        assert long_box == {"result": "old:old"}  # the long call finished on the old code
        assert "error" not in patch_box, patch_box
        assert mod.short_call() == "new"
    finally:
        mod.release.set()
        stop.set()
        short_thread.join(10)


def test_wsgi_health_check_rolls_back_a_patch_that_breaks_the_endpoint(make_module) -> None:
    from hotpatch.health import wsgi_health_check

    source = (
        "from flask import Flask\n\napp = Flask(__name__)\n\n"
        "@app.get('/healthz')\ndef healthz():\n    return 'ok'\n"
    )
    mod = make_module(source)
    engine = Engine()
    engine.health_check(mod.__name__)(wsgi_health_check(mod.app, "/healthz"))
    engine.patch(mod.__name__, source=source.replace("'ok'", "'fine'"))
    assert mod.app.test_client().get("/healthz").get_data(as_text=True) == "fine"
    with pytest.raises(PatchRejected) as info:
        engine.patch(mod.__name__, source=source.replace("return 'ok'", "return 'down', 503"))
    assert info.value.stage == "health" and "GET /healthz answered 503" in info.value.reason
    assert mod.app.test_client().get("/healthz").status_code == 200


def test_check_many_guards_a_change_whose_modules_need_each_others_new_names(make_module) -> None:
    """One module imports a name the other adds: guarded one at a time, the second is refused
    (the live first module has no such name); guarded as one change, both pass, and nothing
    live changes (what phase 1 of an in-place deploy and ``patch --check`` rely on)."""
    util = make_module("def helper():\n    return 1\n")
    view = make_module(f"from {util.__name__} import helper\n\ndef page():\n    return helper()\n")
    new_util = "def helper():\n    return 1\n\ndef added():\n    return 2\n"
    new_view = (
        f"from {util.__name__} import added, helper\n\ndef page():\n    return helper() + added()\n"
    )
    engine = Engine()
    engine.track(util.__name__, view.__name__)
    with pytest.raises(PatchRejected) as refused:
        engine.check(view.__name__, source=new_view)
    assert refused.value.stage == "execute"

    results = engine.check_many({view.__name__: new_view, util.__name__: new_util})
    assert [r.module for r in results] == [view.__name__, util.__name__]  # the order given
    assert results[1].added == ("added",) and results[0].changed == ("page",)
    assert not hasattr(util, "added") and view.page() == 1  # nothing live changed
    assert [v.is_live for v in engine.history(util.__name__)] == [True]  # nothing recorded

    engine.patch_many({view.__name__: new_view, util.__name__: new_util})
    assert view.page() == 3
