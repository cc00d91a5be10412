"""Shadow runs and A/B experiments in process, with real calls and the real controller."""

from __future__ import annotations

import random
from collections.abc import Callable
from types import ModuleType

import hotpatch
from hotpatch.engine import Engine
from hotpatch.trial import experiment, shadow

OLD = "def double(i):\n    return i * 2\n"
SAME = "def double(i):\n    return i + i\n"  # other code, same results
ONE_PERCENT_OFF = "def double(i):\n    return -1 if i % 100 == 7 else i * 2\n"
ONE_PERCENT_RAISES = (
    "def double(i):\n    if i % 100 == 7:\n        raise KeyError(i)\n    return i * 2\n"
)


def drive(fn: Callable[[int], int], *, until: Callable[[], bool], limit: int) -> list[int]:
    """Call ``fn(i)`` for i = 0, 1, ... until ``until()`` or ``limit`` calls; the results."""
    out = []
    for i in range(limit):
        if until():
            break
        out.append(fn(i))
    return out


def test_a_shadow_that_differs_on_1_percent_is_discarded_and_never_seen(
    make_module: Callable[..., ModuleType],
) -> None:
    for new in (ONE_PERCENT_OFF, ONE_PERCENT_RAISES):
        mod = make_module(OLD)
        engine = Engine()
        trial = shadow(
            {mod.__name__: new},
            sample=1.0,
            min_calls=1000,
            max_mismatch_rate=0.001,
            check_s=0.05,
            engine=engine,
        )
        done = trial._done.is_set
        results = drive(mod.double, until=done, limit=2_000_000)
        result = trial.wait(timeout=60)
        assert (result.outcome, result.reason) == ("rolled_back", "shadow_mismatch"), result
        assert results == [i * 2 for i in range(len(results))]  # no caller saw the new result
        first = result.mismatches[0]
        assert first.arguments == "((7,), {})" and first.old == "14"
        assert first.new in ("-1", "raised KeyError: '7'")
        assert mod.double(7) == 14  # the old code is live
        assert engine.history(mod.__name__)[0].stage == "shadow"


def test_an_identical_shadow_is_promoted_after_min_calls(
    make_module: Callable[..., ModuleType],
) -> None:
    mod = make_module(OLD)
    engine = Engine()
    trial = shadow({mod.__name__: SAME}, sample=0.5, min_calls=300, check_s=0.05, engine=engine)
    drive(mod.double, until=trial._done.is_set, limit=5_000_000)
    result = trial.wait(timeout=60)
    assert result.outcome == "promoted", result
    assert trial.status().compared >= 300 and trial.status().mismatches == 0
    assert result.new_calls >= 300 and result.new_errors == 0
    assert mod.double.__code__.co_names == () and mod.double(4) == 8  # i + i is live
    assert engine.history(mod.__name__)[0].outcome == "applied"


def test_the_caller_never_waits_for_the_shadow(make_module: Callable[..., ModuleType]) -> None:
    """A shadow slower than the queue drains: samples are dropped and counted, never queued
    behind the caller, and calls over the deadline are mismatches."""
    mod = make_module(OLD)
    slow = (
        "import threading\nGATE = threading.Event()\n"
        "def double(i):\n    GATE.wait(5)\n    return i * 2\n"
    )
    trial = shadow(
        {mod.__name__: slow},
        sample=1.0,
        min_calls=10**6,
        queue_size=4,
        shadow_timeout_s=0.5,
        check_s=0.05,
        promote=False,
        engine=Engine(),
    )
    try:
        results = [mod.double(i) for i in range(500)]  # would take 500 x 5 s if it waited
        assert results == [i * 2 for i in range(500)]
        status = trial.status()
        assert status.compared <= 1 and status.dropped >= 500 - 4 - 1 - 1
    finally:
        trial._targets[0].versions[1].__globals__["GATE"].set()  # the new version's own name
        trial.abort()


def _checkout_module(new_mean: float) -> tuple[str, str]:
    body = (
        "import hotpatch\n"
        "def checkout(rng):\n"
        "    value = rng.gauss({mean}, 2.0)\n"
        "    hotpatch.record('revenue', value)\n"
        "    return value\n"
    )
    # The new version's code must differ for any mean (Python 3.10's code objects carry no
    # columns: a whitespace edit compiles to the same code, and there is nothing to try).
    new = body.format(mean=new_mean).replace(
        "    return value", "    result = value\n    return result"
    )
    return body.format(mean=10.0), new


def test_an_experiment_finds_a_true_difference_and_reports_per_arm(
    make_module: Callable[..., ModuleType],
) -> None:
    old, new = _checkout_module(11.0)
    mod = make_module(old)
    trial = experiment({mod.__name__: new}, split=50, check_s=600, engine=Engine())
    rng = random.Random(1234)
    for user in range(2000):
        with hotpatch.routing_key(user):
            mod.checkout(rng)
    report = trial.report(confidence=0.99)
    metric = report.metrics["revenue"]
    assert metric.old_count + metric.new_count == 2000
    assert abs(metric.new_count / 2000 - 0.5) < 0.05
    assert metric.significant and metric.p_value is not None and metric.p_value < 0.01
    assert metric.low is not None and metric.high is not None and metric.low < 1.0 < metric.high
    assert report.arms["old"].calls == metric.old_count
    assert report.arms["new"].calls == metric.new_count
    assert trial.abort().outcome == "aborted"


def test_an_a_a_experiment_finds_no_difference_at_the_stated_rate(
    make_module: Callable[..., ModuleType],
) -> None:
    """60 A/A experiments at 99% confidence: about 0.6 false findings expected; 5 or more
    happens with probability below 0.0004 when the test is calibrated."""
    old, new = _checkout_module(10.0)
    mod = make_module(old)
    engine = Engine()
    false_findings = 0
    for seed in range(60):
        trial = experiment({mod.__name__: new}, split=50, check_s=600, engine=engine)
        rng = random.Random(seed)
        for user in range(200):
            with hotpatch.routing_key(user):
                mod.checkout(rng)
        metric = trial.report(confidence=0.99).metrics["revenue"]
        false_findings += metric.significant
        trial.abort()
    assert false_findings < 5


def test_record_outside_a_call_uses_the_routing_key(make_module: Callable[..., ModuleType]) -> None:
    mod = make_module("def page():\n    return 'old'\n")
    trial = experiment(
        {mod.__name__: "def page():\n    return 'new'\n"}, split=50, check_s=600, engine=Engine()
    )
    try:
        for user in range(200):
            with hotpatch.routing_key(user):
                arm = mod.page()
                assert hotpatch.record("converted", 1.0 if arm == "new" else 0.0)
        metric = trial.report().metrics["converted"]
        assert metric.old_mean == 0.0 and metric.new_mean == 1.0  # each outcome on its arm
        assert not hotpatch.record("converted", 1.0)  # no key, no call: attributed nowhere
        assert trial.report().unattributed == 1
    finally:
        trial.abort()
