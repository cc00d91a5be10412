"""The rollout state machine alone: events in, actions out; no processes, no clocks."""

from __future__ import annotations

import pytest

from hotpatch.gunicorn._machine import (
    FAILED_EXIT_GRACE_S,
    HEALTH_GRACE_S,
    Action,
    Finish,
    Kill,
    Retire,
    Rollout,
    Spawn,
    Timeouts,
)

TIMEOUTS = Timeouts(boot_s=10.0, health_s=5.0, settle_s=1.0, retire_s=30.0)
OLD, NEW = "r0-old", "r1-new"


class Driver:
    """Plays the master: carries out actions, hands out pids, keeps time."""

    def __init__(self, size: int = 4) -> None:
        self.now = 100.0
        self.next_pid = 1000
        self.rollout = Rollout.start(
            rollout_id=1,
            target=NEW,
            known_good=OLD,
            workers={pid: OLD for pid in range(1, size + 1)},
            size=size,
            timeouts=TIMEOUTS,
            now=self.now,
        )
        self.log: list[Action] = []

    def step(self) -> list[Action]:
        actions = self.rollout.next_actions(self.now)
        self.log.extend(actions)
        for action in actions:
            if isinstance(action, Spawn):
                self.next_pid += 1
                self.rollout.worker_spawned(self.next_pid, action.release, self.now)
        return actions

    def last_spawned(self) -> int:
        return self.next_pid

    def boot(self, pid: int) -> None:
        self.rollout.worker_loaded(pid, self.now)
        self.rollout.worker_healthy(pid, self.now)

    def exit_retired(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, (Retire, Kill)):
                self.rollout.worker_exited(action.pid, self.now)

    def ready_count(self) -> int:
        return sum(1 for s in self.rollout.workers.values() if s.phase == "ready")


def test_replaces_one_worker_at_a_time_never_below_size() -> None:
    d = Driver()
    actions = d.step()
    assert actions == [Spawn(NEW)]
    for _ in range(4):
        new = d.last_spawned()
        assert d.step() == []  # waits for the new worker
        assert d.ready_count() == 4
        d.boot(new)
        actions = d.step()
        assert isinstance(actions[0], Retire)
        assert d.ready_count() >= 4
        d.exit_retired(actions)
    d.now += TIMEOUTS.settle_s
    assert d.step() == [Finish("completed")]
    assert {s.release for s in d.rollout.workers.values()} == {NEW}
    assert d.rollout.is_finished and d.rollout.outcome == "completed"


def test_retires_oldest_first() -> None:
    d = Driver()
    d.step()
    d.boot(d.last_spawned())
    actions = d.step()
    assert actions[0] == Retire(1)
    assert actions[1] == Spawn(NEW)


def test_waits_for_retiring_workers_and_settle_before_completing() -> None:
    d = Driver(size=1)
    d.step()
    d.boot(d.last_spawned())
    assert d.step() == [Retire(1)]
    d.now += TIMEOUTS.settle_s
    assert d.step() == []  # the old worker has not exited yet
    d.rollout.worker_exited(1, d.now)
    assert d.step() == [Finish("completed")]


@pytest.mark.parametrize("stage", ["load", "health"])
def test_reported_failure_rolls_back(stage: str) -> None:
    d = Driver()
    d.step()
    bad = d.last_spawned()
    d.rollout.worker_failed(bad, stage, "app.py:3: boom", "Traceback...", d.now)  # type: ignore[arg-type]
    assert d.rollout.mode == "rollback"
    assert d.rollout.failure is not None and d.rollout.failure.stage == stage
    assert d.rollout.failure.pid == bad and d.rollout.failure.error == "Traceback..."
    d.rollout.worker_exited(bad, d.now)
    assert d.step() == [Finish("rolled_back")]  # nothing new was ready: already back


def test_third_of_four_failing_replaces_the_new_ones_with_known_good() -> None:
    d = Driver()
    d.step()
    for _ in range(2):
        d.boot(d.last_spawned())
        d.exit_retired(d.step())
    third = d.last_spawned()
    d.rollout.worker_failed(third, "load", "boom", "", d.now)
    d.rollout.worker_exited(third, d.now)
    releases = sorted(s.release for s in d.rollout.workers.values() if s.phase == "ready")
    assert releases == [OLD, OLD, NEW, NEW]
    actions = d.step()
    assert actions == [Spawn(OLD)]
    while not d.rollout.is_finished:
        assert d.ready_count() >= 4
        new = d.last_spawned()
        d.boot(new)
        actions = d.step()
        d.exit_retired(actions)
        if not d.rollout.is_finished:
            d.exit_retired(d.step())
    assert d.rollout.outcome == "rolled_back"
    assert {s.release for s in d.rollout.workers.values()} == {OLD}
    assert len(d.rollout.workers) == 4


def test_boot_deadline_kills_the_new_worker() -> None:
    d = Driver()
    d.step()
    stuck = d.last_spawned()
    assert d.rollout.next_deadline() == d.now + TIMEOUTS.boot_s
    d.now += TIMEOUTS.boot_s
    actions = d.step()
    assert actions[0] == Kill(stuck, actions[0].reason)  # type: ignore[union-attr]
    assert "did not load the app within 10 s (stage: boot)" in actions[0].reason  # type: ignore[union-attr]
    assert d.rollout.failure is not None and d.rollout.failure.stage == "boot"


def test_health_deadline_kills_a_loaded_worker_that_never_answers() -> None:
    d = Driver()
    d.step()
    slow = d.last_spawned()
    d.rollout.worker_loaded(slow, d.now)
    d.now += TIMEOUTS.health_s + HEALTH_GRACE_S
    actions = d.step()
    assert isinstance(actions[0], Kill) and actions[0].pid == slow
    assert d.rollout.failure is not None and d.rollout.failure.stage == "health"


def test_crash_after_passing_rolls_back() -> None:
    d = Driver()
    d.step()
    new = d.last_spawned()
    d.boot(new)
    d.exit_retired(d.step())
    d.rollout.worker_exited(new, d.now)  # not retired, not recycled: a crash
    assert d.rollout.failure is not None and d.rollout.failure.stage == "crash"
    assert d.rollout.mode == "rollback"


def test_death_during_the_health_check_is_stage_health() -> None:
    d = Driver()
    d.step()
    new = d.last_spawned()
    d.rollout.worker_loaded(new, d.now)  # the app loaded; its check is running
    d.rollout.worker_exited(new, d.now + 0.1)
    failure = d.rollout.failure
    assert failure is not None and failure.stage == "health" and failure.pid == new
    assert "during its health check" in failure.reason


def test_abort_rolls_back_once_and_never_twice() -> None:
    d = Driver()
    d.step()
    new = d.last_spawned()
    d.boot(new)
    d.exit_retired(d.step())
    d.rollout.abort("hotpatch failed in the master: RuntimeError: boom")
    failure = d.rollout.failure
    assert failure is not None and failure.stage == "internal" and failure.pid is None
    assert d.rollout.mode == "rollback"
    d.rollout.abort("again")  # during the rollback: no change, the rollback goes on
    assert d.rollout.failure is failure and d.rollout.mode == "rollback"


def test_crash_during_settle_rolls_back() -> None:
    d = Driver(size=1)
    d.step()
    new = d.last_spawned()
    d.boot(new)
    d.exit_retired(d.step())
    assert d.step() == []  # settling
    d.rollout.worker_exited(new, d.now + 0.5)
    assert d.rollout.mode == "rollback"
    assert d.step() == [Spawn(OLD)]


def test_recycled_new_worker_is_no_failure() -> None:
    d = Driver(size=1)
    d.step()
    new = d.last_spawned()
    d.boot(new)
    d.exit_retired(d.step())
    d.rollout.worker_exited(new, d.now, is_recycled=True)
    assert d.rollout.failure is None
    assert d.step() == [Spawn(NEW)]


def test_old_worker_dying_is_refilled_not_a_failure() -> None:
    d = Driver()
    d.rollout.worker_exited(2, d.now)
    assert d.rollout.failure is None
    assert d.step() == [Spawn(NEW)]


def test_retiring_worker_that_ignores_sigterm_is_killed() -> None:
    d = Driver(size=1)
    d.step()
    d.boot(d.last_spawned())
    assert d.step() == [Retire(1)]
    d.now += TIMEOUTS.retire_s
    actions = d.step()
    assert actions == [Kill(1, "did not exit within 30 s of SIGTERM")]
    assert d.step() == []  # killed once only


def test_failed_worker_that_does_not_exit_is_killed() -> None:
    d = Driver()
    d.step()
    bad = d.last_spawned()
    d.rollout.worker_failed(bad, "health", "500", "", d.now)
    d.now += FAILED_EXIT_GRACE_S
    assert Kill(bad, "did not exit after reporting a failure") in d.step()


def test_rollback_gives_up_after_repeated_known_good_failures() -> None:
    d = Driver()
    d.step()
    d.boot(d.last_spawned())
    d.exit_retired(d.step())
    d.rollout.worker_failed(d.last_spawned(), "load", "boom", "", d.now)  # the 2nd new one
    d.rollout.worker_exited(d.last_spawned(), d.now)
    outcome = None
    for _ in range(10):
        actions = d.step()
        if Finish("rollback_failed") in actions:
            outcome = "rollback_failed"
            break
        d.rollout.worker_failed(d.last_spawned(), "load", "db down", "", d.now)
        d.rollout.worker_exited(d.last_spawned(), d.now)
    assert outcome == "rollback_failed"
    assert d.rollout.is_finished


def test_finish_is_emitted_once() -> None:
    d = Driver(size=1)
    d.step()
    d.rollout.worker_failed(d.last_spawned(), "load", "x", "", d.now)
    d.rollout.worker_exited(d.last_spawned(), d.now)
    assert d.step() == [Finish("rolled_back")]
    assert d.step() == []
    assert d.rollout.next_deadline() is None
