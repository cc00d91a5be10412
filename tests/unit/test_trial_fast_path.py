"""The outermost call's fast path: routing tables (exact share and counts) and the affinity cell.

The trampoline of a plain function routes an unkeyed call by the next byte of a shuffled routing
table and keeps the arm of the running call in a per-thread cell, written only by the outermost
call. Each test pins one guarantee that a cheaper shortcut would break: the exact share, counts
that are never lost under threads or across tables, one call in eight timed, the arm of a call
chain held for every call beneath it (direct, indirect, generators) even when the share changes
meanwhile, and never seen by another thread (not even one running a copy of its context).
"""

from __future__ import annotations

import contextvars
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest

import hotpatch
from hotpatch.demo.harness import wait_until
from hotpatch.engine import Engine
from hotpatch.trial import Trial, canary
from hotpatch.trial._dispatch import NEW, OLD, TABLE_SIZE, TIMED_SHARE

OLD_SOURCE = "def who(i):\n    return 'old'\n"
NEW_SOURCE = "def who(i):\n    return 'new'\n"


@pytest.fixture(name="who")
def _who(make_module: Callable[..., ModuleType]) -> Iterator[tuple[ModuleType, Trial]]:
    mod = make_module(OLD_SOURCE)
    trial = canary({mod.__name__: NEW_SOURCE}, steps=(30, 100), step_s=600, engine=Engine())
    try:
        yield mod, trial
    finally:
        trial.abort()


def totals(trial: Trial) -> tuple[int, int]:
    """(old, new) calls of the whole run, as the status reports them."""
    arms = trial.status().total_arms
    return arms["old"].calls, arms["new"].calls


def test_the_share_of_unkeyed_calls_is_exact_over_each_table(who: tuple[ModuleType, Trial]) -> None:
    mod, trial = who
    trial._dispatcher.share = 0.3  # a fresh table starts here
    calls = 20 * TABLE_SIZE
    seen = Counter(mod.who(i) for i in range(calls))
    assert seen["new"] == calls * 3 // 10, seen  # a random draw misses this by ~65 (1 sd)
    # A share that is no whole number of calls per table: each table rounds it up or down.
    trial._dispatcher.share = 0.12345
    more = 30 * TABLE_SIZE
    exact = Counter(mod.who(i) for i in range(more))["new"]
    assert 30 * int(0.12345 * TABLE_SIZE) <= exact <= 30 * (int(0.12345 * TABLE_SIZE) + 1)
    assert abs(exact / more - 0.12345) < 0.001
    assert totals(trial) == (calls + more - seen["new"] - exact, seen["new"] + exact)


def test_counts_are_exact_under_threads_keyed_or_not(who: tuple[ModuleType, Trial]) -> None:
    """4 threads, half of the calls with a routing key, across several tables and a share
    change: the status counts exactly the calls each arm served."""
    mod, trial = who
    trial._dispatcher.share = 0.5
    calls = 10 * TABLE_SIZE
    tallies: list[Counter[str]] = []
    start = threading.Barrier(4)

    def run(n: int) -> None:
        tally: Counter[str] = Counter()
        start.wait(timeout=30)
        for i in range(calls):
            if i % 2:
                with hotpatch.routing_key(f"user-{n}-{i % 97}"):
                    tally[mod.who(i)] += 1
            else:
                tally[mod.who(i)] += 1
            if n == 0 and i == calls // 2:
                trial._dispatcher.share = 0.25  # the table in use is left behind, still counted
        tallies.append(tally)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    served = sum(tallies, Counter())
    assert sum(served.values()) == 4 * calls
    assert totals(trial) == (served["old"], served["new"])


def test_one_call_in_eight_is_timed(who: tuple[ModuleType, Trial]) -> None:
    mod, trial = who
    trial._dispatcher.share = 0.5
    stats = trial._dispatcher.stats
    for i in range(TABLE_SIZE):  # one whole table
        mod.who(i)
    assert len(stats.lat[OLD]) + len(stats.lat[NEW]) == TABLE_SIZE // TIMED_SHARE
    with hotpatch.routing_key("one-user"):  # keyed: its arm's timing table
        arm = NEW if mod.who(0) == "new" else OLD
        before = len(stats.lat[arm])
        for i in range(8 * TABLE_SIZE):
            mod.who(i)
    # Whole tables but the two partial ones at the ends: within one table's timed calls.
    per_table = TABLE_SIZE // TIMED_SHARE
    assert abs(len(stats.lat[arm]) - before - 8 * per_table) <= per_table
    assert all(s >= 0 for s in stats.lat[arm])


AFFINITY_OLD = """\
import contextvars

def leaf(i):
    return "old"

def chain(hook):
    hook()  # the test changes the share here, in the middle of the call
    return ("old", leaf(0), REGISTRY["leaf"](0), list(stream()), Adder() + 1)

def stream():
    yield leaf(0)

class Adder:
    def __add__(self, other):
        return leaf(other)  # an operator: a call no static check of chain() would see

REGISTRY = {}
"""


@pytest.fixture(name="chain")
def _chain(make_module: Callable[..., ModuleType]) -> Iterator[tuple[ModuleType, Trial]]:
    mod = make_module(AFFINITY_OLD)
    mod.REGISTRY["leaf"] = mod.leaf  # a reference held elsewhere: an indirect call
    new = AFFINITY_OLD.replace('"old"', '"new"')
    trial = canary({mod.__name__: new}, steps=(50, 100), step_s=600, engine=Engine())
    try:
        yield mod, trial
    finally:
        trial.abort()


@pytest.mark.parametrize(("first", "then"), [(1.0, 0.0), (0.0, 1.0)])
def test_every_call_beneath_the_outermost_keeps_its_arm(
    chain: tuple[ModuleType, Trial], first: float, then: float
) -> None:
    mod, trial = chain
    d = trial._dispatcher
    arm = "new" if first else "old"
    d.share = first

    def flip() -> None:
        d.share = then

    # Direct, through a dict, a dispatched generator, an operator: all on the first arm.
    assert mod.chain(flip) == (arm, arm, arm, [arm], arm)
    other = "old" if first else "new"
    assert mod.leaf(0) == other  # the chain is over: a new outermost call, the new share
    assert d.arm() is None


def test_the_arm_is_released_when_the_outermost_call_raises(
    chain: tuple[ModuleType, Trial],
) -> None:
    mod, trial = chain
    d = trial._dispatcher
    d.share = 1.0

    def fail() -> None:
        raise KeyError("from the hook")

    for _ in range(20):  # timed calls (one in eight) and untimed ones
        with pytest.raises(KeyError):
            mod.chain(fail)
    assert d.arm() is None
    d.share = 0.0
    assert mod.leaf(0) == "old"  # not held on the arm of the call that raised


def test_the_arm_of_a_running_call_is_never_seen_by_another_thread(
    chain: tuple[ModuleType, Trial],
) -> None:
    """Thread A is inside a new-arm chain; the main thread, and a thread running a copy of A's
    context (as ``asyncio.to_thread`` and thread-pool bridges do), route their own calls."""
    mod, trial = chain
    d = trial._dispatcher
    d.share = 1.0
    inside, release = threading.Event(), threading.Event()
    copied: list[contextvars.Context] = []
    result: list[object] = []

    def hold() -> None:
        copied.append(contextvars.copy_context())
        inside.set()
        assert release.wait(timeout=30)

    a = threading.Thread(target=lambda: result.append(mod.chain(hold)))
    a.start()
    try:
        assert inside.wait(timeout=30)
        d.share = 0.0
        assert [mod.leaf(i) for i in range(50)] == ["old"] * 50
        from_copy: list[str] = []
        b = threading.Thread(target=lambda: from_copy.append(copied[0].run(mod.leaf, 0)))
        b.start()
        b.join(timeout=30)
        assert from_copy == ["old"]
    finally:
        release.set()
        a.join(timeout=30)
    assert result == [("new", "new", "new", ["new"], "new")]  # A kept its arm throughout


def test_a_shadow_samples_the_exact_share_and_counts_each_call_once(
    make_module: Callable[..., ModuleType],
) -> None:
    mod = make_module("def double(i):\n    return i * 2\n")
    trial = hotpatch.shadow(
        {mod.__name__: "def double(i):\n    return i + i\n"},
        sample=0.1,
        min_calls=10**6,
        promote=False,
        queue_size=10**6,
        engine=Engine(),
    )
    try:
        calls = 5 * TABLE_SIZE
        assert [mod.double(i) for i in range(calls)] == [i * 2 for i in range(calls)]
        sampled = calls // 10  # a random draw misses this by ~21 (1 sd)
        wait_until(
            lambda: trial.status().compared >= sampled,
            timeout_s=60,
            what="the worker to compare every sampled call",
        )
        status = trial.status()
        assert (status.compared, status.dropped, status.mismatches) == (sampled, 0, 0)
        assert status.total_arms["old"].calls == calls  # the sampled ones too, once
        assert status.total_arms["new"].calls == sampled  # the worker's runs
    finally:
        trial.abort()
