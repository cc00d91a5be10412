"""The dispatch of a trial: every function kind, signatures, module state, routing options.

Each test installs a real trial on a real module (the controller idles: ``step_s`` is long) and
drives the share directly where it needs one arm or the other.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest

import hotpatch
from hotpatch.engine import Engine
from hotpatch.errors import ConfigError, PatchRejected
from hotpatch.trial import Trial, canary, experiment

KINDS_OLD = """\
import functools

class Base:
    def describe(self):
        return "base"

class Shop(Base):
    def describe(self):
        return "old:" + super().describe()

    @staticmethod
    def tax(x):
        return ("old", x)

def make_counter(start):
    count = start
    def step(by=1):
        return ("old", count + by)
    return step

counter = make_counter(10)

def signature(a, b=2, /, c=3, *args, d, e=5, **kw):
    return ("old", a, b, c, args, d, e, kw)

def numbers(n):
    received = yield "old-start"
    for i in range(n):
        received = yield ("old", i, received)
    return "old-done"

async def fetch(x):
    await asyncio.sleep(0)
    return ("old", x)

async def stream(n):
    for i in range(n):
        got = yield ("old", i)
        if got is not None:
            yield ("old-got", got)

import asyncio
"""


def new_kinds() -> str:
    return KINDS_OLD.replace('"old', '"new').replace("'old", "'new")


@pytest.fixture(name="engine")
def _engine() -> Engine:
    return Engine()


def on_arm(trial: Trial, arm: str) -> None:
    """Send every call to one arm (what the controller's share does at 0% or 100%)."""
    trial._dispatcher.share = 1.0 if arm == "new" else 0.0


@pytest.fixture(name="kinds")
def _kinds(
    make_module: Callable[..., ModuleType], engine: Engine
) -> Iterator[tuple[ModuleType, Trial]]:
    mod = make_module(KINDS_OLD)
    trial = canary({mod.__name__: new_kinds()}, steps=(50, 100), step_s=600, engine=engine)
    try:
        yield mod, trial
    finally:
        trial.abort()


@pytest.mark.parametrize("arm", ["old", "new"])
def test_every_function_kind_runs_the_version_of_its_arm(
    kinds: tuple[ModuleType, Trial], arm: str
) -> None:
    mod, trial = kinds
    on_arm(trial, arm)
    assert mod.Shop().describe() == f"{arm}:base"  # super() through the __class__ cell
    assert mod.Shop.tax(1) == (arm, 1)
    assert mod.counter() == (arm, 11)  # a closure keeps its live cell
    assert mod.signature(1, d=4) == (arm, 1, 2, 3, (), 4, 5, {})
    assert mod.signature(1, 9, 8, 7, d=4, e=6, z=0) == (arm, 1, 9, 8, (7,), 4, 6, {"z": 0})
    gen = mod.numbers(2)
    assert next(gen) == f"{arm}-start"
    assert gen.send("a") == (arm, 0, "a")
    assert gen.send("b") == (arm, 1, "b")
    with pytest.raises(StopIteration) as stop:
        gen.send("c")
    assert stop.value.value == f"{arm}-done"
    gen = mod.numbers(5)
    next(gen)
    with pytest.raises(KeyError):
        gen.throw(KeyError("x"))
    assert asyncio.run(mod.fetch(2)) == (arm, 2)

    async def consume() -> list[object]:
        agen = mod.stream(3)
        out = [await agen.__anext__()]
        out.append(await agen.asend("hi"))
        out.append(await agen.__anext__())
        await agen.aclose()
        return out

    assert asyncio.run(consume()) == [(arm, 0), (f"{arm}-got", "hi"), (arm, 1)]


def test_signatures_and_kinds_are_unchanged_under_dispatch(kinds: tuple[ModuleType, Trial]) -> None:
    mod, trial = kinds
    assert str(inspect.signature(mod.signature)) == "(a, b=2, /, c=3, *args, d, e=5, **kw)"
    assert inspect.isgeneratorfunction(mod.numbers)
    assert inspect.iscoroutinefunction(mod.fetch)
    assert inspect.isasyncgenfunction(mod.stream)
    assert mod.signature.__code__.co_filename == "<hotpatch trial>"
    with pytest.raises(TypeError):
        mod.signature(1)  # d is required: the same binding as the live function
    trial.abort()
    assert mod.signature.__code__.co_filename == mod.__file__


def test_changed_defaults_are_each_versions_own(
    make_module: Callable[..., ModuleType], engine: Engine
) -> None:
    mod = make_module("def rate(x, factor=2):\n    return ('old', x * factor)\n")
    trial = canary(
        {mod.__name__: "def rate(x, factor=3):\n    return ('new', x * factor)\n"},
        step_s=600,
        engine=engine,
    )
    try:
        on_arm(trial, "new")
        assert mod.rate(2) == ("new", 6)
        assert mod.rate(2, 5) == ("new", 10)
        on_arm(trial, "old")
        assert mod.rate(2) == ("old", 4)
    finally:
        trial.abort()


def test_the_new_version_shares_live_state_and_sees_its_own_constants(
    make_module: Callable[..., ModuleType], engine: Engine
) -> None:
    mod = make_module(
        "SEEN = []\nRATE = 2\n"
        "class Item:\n    pass\n"
        "def price(x, item=None):\n"
        "    SEEN.append(x)\n"
        "    return ('old', x * RATE, isinstance(item, Item))\n"
    )
    new = (
        "SEEN = []\nRATE = 3\n"
        "class Item:\n    pass\n"
        "def bonus(x):\n    return x + EXTRA\n"
        "EXTRA = 100\n"
        "def price(x, item=None):\n"
        "    SEEN.append(x)\n"
        "    return ('new', bonus(x * RATE), isinstance(item, Item))\n"
    )
    live_item = mod.Item()
    trial = canary({mod.__name__: new}, step_s=600, engine=engine)
    try:
        on_arm(trial, "new")
        # The live list (state), the live class (isinstance), the changed constant and the
        # added names of the candidate.
        assert mod.price(1, live_item) == ("new", 103, True)
        on_arm(trial, "old")
        assert mod.price(2, live_item) == ("old", 4, True)
        assert mod.SEEN == [1, 2]
        assert "bonus" not in vars(mod) and mod.RATE == 2  # the live module is untouched
    finally:
        trial.abort()


def test_route_key_and_a_failing_key_function(
    make_module: Callable[..., ModuleType], engine: Engine
) -> None:
    mod = make_module("def who():\n    return 'old'\n")
    new = "def who():\n    return 'new'\n"
    trial = canary(
        {mod.__name__: new},
        steps=(1, 100),
        step_s=600,
        route=lambda key: True if key == "dogfood" else None,
        engine=engine,
    )
    try:
        with hotpatch.routing_key("dogfood"):
            assert {mod.who() for _ in range(50)} == {"new"}
        with hotpatch.routing_key(12345):
            assert len({mod.who() for _ in range(50)}) == 1  # sticky, whichever arm
    finally:
        trial.abort()

    def broken_key() -> str:
        raise RuntimeError("no request")

    trial = canary({mod.__name__: new}, steps=(50, 100), step_s=600, key=broken_key, engine=engine)
    try:
        assert {mod.who() for _ in range(20)} == {"old"}  # a routing failure serves the old
        assert trial.status().routing_errors == 20
    finally:
        trial.abort()


def test_an_openfeature_flag_decides_per_targeting_key(
    make_module: Callable[..., ModuleType], engine: Engine
) -> None:
    api = pytest.importorskip("openfeature.api")
    from openfeature.evaluation_context import EvaluationContext
    from openfeature.flag_evaluation import FlagResolutionDetails
    from openfeature.provider.in_memory_provider import InMemoryFlag, InMemoryProvider

    def beta_only(flag: InMemoryFlag[bool], ctx: EvaluationContext) -> FlagResolutionDetails[bool]:
        return FlagResolutionDetails(value=ctx.targeting_key in {"alice", "bob"})

    api.set_provider(
        InMemoryProvider(
            {
                "new-who": InMemoryFlag(
                    "off", {"on": True, "off": False}, context_evaluator=beta_only
                )
            }
        )
    )
    mod = make_module("def who():\n    return 'old'\n")
    trial = canary(
        {mod.__name__: "def who():\n    return 'new'\n"},
        step_s=600,
        flag="new-who",
        engine=engine,
    )
    try:
        for user, arm in (("alice", "new"), ("carol", "old"), ("bob", "new")):
            with hotpatch.routing_key(user):
                assert mod.who() == arm
        assert mod.who() == "old"  # no key: no targeting key, the flag says no
    finally:
        trial.abort()
        api.clear_providers()


def test_options_are_checked(make_module: Callable[..., ModuleType], engine: Engine) -> None:
    mod = make_module("def who():\n    return 'old'\n")
    new = {mod.__name__: "def who():\n    return 'new'\n"}
    for bad in ((), (50, 20, 100), (0, 100), (50, 101), "100"):
        with pytest.raises(ConfigError, match="steps"):
            canary(new, steps=bad, engine=engine)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="step_s"):
        canary(new, step_s=float("nan"), engine=engine)
    with pytest.raises(ConfigError, match="split"):
        experiment(new, split=0, engine=engine)
    with pytest.raises(ConfigError, match="route"):
        canary(new, route="yes", engine=engine)  # type: ignore[arg-type]
    with pytest.raises(PatchRejected, match="not imported"):
        canary({"no_such_module_here": "x = 1\n"}, engine=engine)
    assert mod.who() == "old"
