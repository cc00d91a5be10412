"""The canary's pure parts: the holding rollout, the judging window, the bake, the ``stats`` request.

No processes, no sockets, no real clock: the state machine gets times, the bake a fake clock and
a fake reader that plays the workers' ``stats`` answers.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from hotpatch.control.protocol import BadRequest, Request, parse_request
from hotpatch.errors import ConfigError
from hotpatch.gunicorn._canary import Bake, CanaryOptions, Window, describe_failure, flat_figures
from hotpatch.gunicorn._machine import Finish, Retire, Rollout, Spawn, Timeouts

TIMEOUTS = Timeouts(boot_s=10.0, health_s=5.0, settle_s=1.0, retire_s=30.0)
OLD, NEW = "r0-old", "r1-new"


def canary_rollout(*, hold_s: float = 60.0, now: float = 100.0) -> Rollout:
    return Rollout.start(
        rollout_id=1,
        target=NEW,
        known_good=OLD,
        workers={pid: OLD for pid in range(1, 5)},
        size=4,
        timeouts=TIMEOUTS,
        now=now,
        hold_until=now + hold_s,
    )


def boot_canary(rollout: Rollout, now: float) -> int:
    actions = rollout.next_actions(now)
    assert actions == [Spawn(NEW)]
    rollout.worker_spawned(1000, NEW, now)
    rollout.worker_loaded(1000, now)
    rollout.worker_healthy(1000, now)
    return 1000


# -- the holding rollout ---------------------------------------------------------------------


def test_a_canary_rollout_holds_beside_every_old_worker_after_its_first_new_one() -> None:
    rollout = canary_rollout()
    pid = boot_canary(rollout, 101.0)
    assert rollout.next_actions(102.0) == []  # no old worker retired, no second new worker
    assert rollout.canary is not None
    assert rollout.canary.pid == pid
    assert rollout.next_deadline() == 160.0  # the verdict's deadline


def test_without_hold_the_first_new_worker_replaces_an_old_one() -> None:
    rollout = Rollout.start(
        rollout_id=1,
        target=NEW,
        known_good=OLD,
        workers={pid: OLD for pid in range(1, 5)},
        size=4,
        timeouts=TIMEOUTS,
        now=100.0,
    )
    boot_canary(rollout, 101.0)
    assert rollout.next_actions(102.0) == [Retire(1), Spawn(NEW)]
    assert rollout.canary is None


def test_a_passed_canary_lets_the_rollout_go_on() -> None:
    rollout = canary_rollout()
    boot_canary(rollout, 101.0)
    assert rollout.release_hold()
    assert rollout.next_actions(102.0) == [Retire(1), Spawn(NEW)]
    assert not rollout.release_hold()  # once only


def test_a_rejected_canary_is_retired_and_the_old_workers_stay() -> None:
    rollout = canary_rollout()
    pid = boot_canary(rollout, 101.0)
    assert rollout.reject("canary more errors (stage: canary)", 102.0)
    assert rollout.failure is not None
    assert (rollout.failure.stage, rollout.failure.pid) == ("canary", pid)
    actions = rollout.next_actions(102.0)
    assert actions == [Retire(pid)]  # only the canary; no old worker, no new one
    rollout.worker_exited(pid, 103.0)
    assert rollout.next_actions(103.0) == [Finish("rolled_back")]


def test_no_verdict_by_the_deadline_rolls_the_canary_back() -> None:
    rollout = canary_rollout(hold_s=30.0)
    pid = boot_canary(rollout, 101.0)
    assert rollout.next_actions(129.0) == []
    actions = rollout.next_actions(130.0)
    assert actions == [Retire(pid)]
    assert rollout.failure is not None
    assert "no canary verdict" in rollout.failure.reason


def test_a_verdict_after_the_rollback_began_is_refused() -> None:
    rollout = canary_rollout()
    rollout.next_actions(100.0)
    rollout.worker_spawned(1000, NEW, 100.0)
    rollout.worker_failed(1000, "health", "GET /healthz answered 500", "", 101.0)
    assert not rollout.release_hold()
    assert not rollout.reject("late", 102.0)


def test_an_old_worker_lost_during_the_bake_is_replaced_on_the_known_good_release() -> None:
    rollout = canary_rollout()
    boot_canary(rollout, 101.0)
    rollout.worker_exited(2, 102.0)  # an old worker crashed (or was recycled)
    assert rollout.next_actions(102.0) == [Spawn(OLD)]


# -- the window and the bake -------------------------------------------------------------------


def answer(release: str, requests: int, errors: int, latencies: list[float]) -> dict[str, Any]:
    return {
        "outcome": "stats",
        "stats_v": 1,
        "releases": {
            release: {
                "requests": requests,
                "errors": errors,
                "exceptions": 0,
                "seq": requests,
                "latencies_s": latencies,
                "missed": 0,
            }
        },
    }


def test_the_window_counts_only_what_each_worker_served_after_its_first_reading() -> None:
    window = Window(canary_pid=9, target=NEW, known_good=OLD, seed=1)
    window.add(1, answer(OLD, 500, 3, []))  # served before the bake: not counted
    window.add(9, answer(NEW, 0, 0, []))
    window.add(1, answer(OLD, 700, 3, [0.01] * 200))
    window.add(9, answer(NEW, 50, 5, [0.02] * 50))
    window.add(9, answer(OLD, 1, 1, [0.5]))  # the canary's counts of another release: ignored
    baseline, canary = window.summaries()
    assert (baseline.calls, baseline.errors, len(baseline.latencies_s)) == (200, 0, 200)
    assert (canary.calls, canary.errors, len(canary.latencies_s)) == (50, 5, 50)
    assert window.since(1) == 700
    assert window.since(2) == 2**62  # not read yet: its past is not part of the window


def test_a_restarted_worker_with_the_same_pid_opens_a_new_window() -> None:
    window = Window(canary_pid=9, target=NEW, known_good=OLD)
    window.add(1, answer(OLD, 100, 0, []))
    window.add(1, answer(OLD, 10, 10, [0.1] * 10))  # counts went down: another process
    baseline, _ = window.summaries()
    assert baseline.calls == 0


class FakeWorkers:
    """Plays the workers: each poll, every worker has served ``per_poll`` more requests."""

    def __init__(self, canary_error_every: int | None, *, per_poll: int = 40) -> None:
        self.totals: dict[int, list[int]] = {}
        self.canary_error_every = canary_error_every
        self.per_poll = per_poll
        self.random = random.Random(7)

    def read(self, pid: int, since: int) -> dict[str, Any]:
        requests, errors = self.totals.setdefault(pid, [0, 0])
        new = self.per_poll
        new_errors = 0
        if pid == 9 and self.canary_error_every:
            new_errors = new // self.canary_error_every
        self.totals[pid] = [requests + new, errors + new_errors]
        release = NEW if pid == 9 else OLD
        latencies = [0.01 + self.random.random() / 1000 for _ in range(new)]
        return answer(release, requests + new, errors + new_errors, latencies)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def bake_until_verdict(
    workers: FakeWorkers, options: CanaryOptions, *, step_s: float = 1.0
) -> tuple[Any, float, list[tuple[str, dict[str, Any]]]]:
    clock = Clock()
    events: list[tuple[str, dict[str, Any]]] = []
    bake = Bake(
        Window(9, NEW, OLD, seed=3),
        options,
        read=workers.read,
        emit=lambda kind, **f: events.append((kind, f)),
        clock=clock,
    )
    for _ in range(1000):
        bake.poll([9, 1, 2, 3, 4])
        verdict = bake.verdict()
        if verdict is not None:
            return verdict, clock.now, events
        clock.now += step_s
    raise AssertionError("no verdict")


def test_a_good_canary_passes_when_the_bake_is_over() -> None:
    verdict, at, events = bake_until_verdict(
        FakeWorkers(None), CanaryOptions(bake_s=10, min_samples=100)
    )
    assert verdict.decision == "pass"
    assert at == 10.0
    assert any(kind == "canary.progress" for kind, _ in events)


def test_a_canary_failing_one_request_in_ten_fails_on_its_error_rate() -> None:
    verdict, at, _ = bake_until_verdict(FakeWorkers(10), CanaryOptions(bake_s=10, min_samples=100))
    assert at == 10.0
    assert verdict.decision == "fail"
    assert verdict.reason == "error_rate"
    assert verdict.candidate.errors == 40
    assert verdict.baseline.errors == 0
    assert verdict.error_p_value is not None
    assert verdict.error_p_value < 0.01
    assert "more errors than the old workers" in describe_failure(verdict)
    assert "(stage: canary)" in describe_failure(verdict)


def test_too_few_samples_extend_the_bake_to_the_deadline_then_fail() -> None:
    workers = FakeWorkers(None, per_poll=2)
    options = CanaryOptions(bake_s=5, min_samples=100, deadline_s=20)
    verdict, at, _ = bake_until_verdict(workers, options)
    assert verdict.decision == "inconclusive"
    assert at == 20.0
    assert "too few requests" in describe_failure(verdict)


def test_enough_samples_after_the_bake_end_the_extension_early() -> None:
    workers = FakeWorkers(None, per_poll=10)
    options = CanaryOptions(bake_s=5, min_samples=100, deadline_s=60)
    verdict, at, _ = bake_until_verdict(workers, options)
    assert verdict.decision == "pass"
    assert 5.0 < at < 60.0


def test_a_sub_millisecond_latency_shift_does_not_fail_the_canary() -> None:
    window = Window(9, NEW, OLD, seed=1)
    for pid in (1, 9):
        window.add(pid, answer(NEW if pid == 9 else OLD, 0, 0, []))
    window.add(1, answer(OLD, 400, 0, [0.0002] * 400))
    window.add(9, answer(NEW, 400, 0, [0.0004] * 400))  # twice as slow, but 0.2 ms
    strict = window.judge(min_samples=100)
    assert (strict.decision, strict.reason) == ("fail", "latency")
    floored = window.judge(min_samples=100, min_latency_shift_s=0.001)
    assert floored.decision == "pass"
    assert "under the 1 ms floor" in floored.detail


@pytest.mark.parametrize(
    "options",
    [
        {"bake_s": 0},
        {"bake_s": float("nan")},
        {"bake_s": True},
        {"min_samples": 0},
        {"min_samples": 1.5},
        {"bake_s": 10, "deadline_s": 5},
        {"min_latency_shift_s": -1},
    ],
)
def test_bad_canary_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        CanaryOptions(**options)


def test_flat_figures_keep_only_flat_finite_values() -> None:
    kept = flat_figures(
        {"a": 1, "b": 0.5, "c": float("inf"), "d": [1], "e": {"x": 1}, "f": "t" * 999, "g": None}
    )
    assert kept == {"a": 1, "b": 0.5, "f": "t" * 500, "g": None}


# -- the stats request (control protocol v2) ------------------------------------------------------


def test_a_stats_request_round_trips_with_since() -> None:
    line = Request("stats", 42, since=17).encode()
    request = parse_request(line.rstrip(b"\n"))
    assert (request.action, request.pid, request.since, request.v) == ("stats", 42, 17, 2)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"v":1,"action":"stats","pid":1}', "needs protocol version 2"),
        (b'{"v":2,"action":"status","pid":1,"since":3}', "belongs to action 'stats' only"),
        (b'{"v":2,"action":"stats","pid":1,"since":-1}', "must be 0 to"),
        (b'{"v":2,"action":"stats","pid":1,"since":"3"}', "must be int"),
        (b'{"v":2,"action":"stats","pid":1,"since":true}', "must be int"),
    ],
)
def test_bad_stats_requests_are_refused(line: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_request(line)
