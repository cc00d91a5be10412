"""The rollout state machine: given what the workers reported and the time, what to do next.

Pure logic: no processes, signals or clocks. The controller (``_master.py``) feeds it events
(``worker_spawned``, ``worker_loaded``, ``worker_healthy``, ``worker_failed``, ``worker_exited``)
and asks ``next_actions(now)``, then carries the actions out (fork, SIGTERM, SIGKILL).

A rollout replaces the workers one at a time: spawn one worker of the target release, wait until
it has loaded the app and passed its health check, retire one worker of another release, repeat.
At most one new worker boots at a time and a worker is retired only after its replacement is
ready, so at least ``size`` workers are ready throughout. The first failure of a target worker
turns the rollout into a rollback: the same procedure towards the known-good release.

A canary rollout (``hold=True``) stops going forward once its first target worker is ready: that
worker (the canary) serves beside every old worker (one more than ``size``; none is retired)
until ``release_hold()`` (the judge passed it: the rollout goes on as any other) or
``reject(reason)`` (it failed: the rollback retires the canary, and the old workers never
stopped). No verdict by ``hold_until`` is a failure too (stage ``canary``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Phase = Literal["booting", "loaded", "ready", "retiring", "failed", "killed"]
Mode = Literal["forward", "rollback", "finished"]
Outcome = Literal["completed", "rolled_back", "rollback_failed"]
FailStage = Literal["spawn", "boot", "load", "health", "crash", "internal", "canary"]

HEALTH_GRACE_S = 2.0
"""Extra time the master gives a worker past the health deadline (the worker enforces its own)."""
FAILED_EXIT_GRACE_S = 5.0
"""How long a worker that reported a failure may take to exit before it is killed."""
MAX_ROLLBACK_FAILURES = 3


@dataclass(frozen=True)
class Spawn:
    """Fork one worker pinned to ``release``."""

    release: str


@dataclass(frozen=True)
class Retire:
    """Stop a worker gracefully (SIGTERM): it finishes its in-flight requests."""

    pid: int


@dataclass(frozen=True)
class Kill:
    """Stop a worker now (SIGKILL); it takes no traffic (still booting) or ignored SIGTERM."""

    pid: int
    reason: str


@dataclass(frozen=True)
class Finish:
    """The rollout is over."""

    outcome: Outcome


Action = Spawn | Retire | Kill | Finish


@dataclass(frozen=True)
class Failure:
    """Why a rollout stopped.

    Attributes:
        stage: ``spawn`` (fork failed), ``boot`` (no report by the deadline), ``load`` (the app
            failed to import), ``health`` (the check failed, timed out, or the worker died during
            it), ``crash`` (the worker died after passing its check), ``internal`` (hotpatch's
            own code failed in the master), ``canary`` (the judge failed the canary, or gave no
            verdict in time).
        reason: one line, naming the file and line when there is one.
        error: the worker's error output (traceback text), when there is one.
    """

    pid: int | None
    release: str
    stage: FailStage
    reason: str
    error: str = ""


@dataclass(frozen=True)
class Timeouts:
    """Deadlines, in seconds."""

    boot_s: float
    health_s: float
    settle_s: float
    retire_s: float


@dataclass
class WorkerSlot:
    """One worker as the rollout sees it."""

    pid: int
    release: str
    phase: Phase
    spawned_at: float
    since: float
    """When ``phase`` last changed."""
    order: int
    """Spawn order (lower is older)."""
    kill_sent: bool = False


@dataclass
class Rollout:
    """One rollout from the known-good release to ``target``.

    Args:
        rollout_id: a number, increasing per master.
        target: the release being rolled out.
        known_good: the release to roll back to.
        workers: the live workers at the start: pid -> release (all counted as ready).
        size: how many workers must be ready at all times.
        timeouts: the deadlines.
        now: the current time (any monotonic clock; the same one for every later call).
    """

    rollout_id: int
    target: str
    known_good: str
    size: int
    timeouts: Timeouts
    started_at: float
    mode: Mode = "forward"
    outcome: Outcome | None = None
    failure: Failure | None = None
    workers: dict[int, WorkerSlot] = field(default_factory=dict)
    settle_until: float | None = None
    rollback_failures: int = 0
    hold: bool = False
    """A canary rollout still waiting for its verdict."""
    hold_until: float | None = None
    """The verdict's deadline (while ``hold``)."""
    _order: int = 0
    _finish_emitted: bool = False

    @classmethod
    def start(
        cls,
        *,
        rollout_id: int,
        target: str,
        known_good: str,
        workers: dict[int, str],
        size: int,
        timeouts: Timeouts,
        now: float,
        hold_until: float | None = None,
    ) -> Rollout:
        """Begin a rollout with ``workers`` (pid -> release) serving.

        With ``hold_until``, a canary rollout: it holds once one target worker is ready, until
        ``release_hold``, ``reject`` or that time (a failure).
        """
        rollout = cls(
            rollout_id=rollout_id,
            target=target,
            known_good=known_good,
            size=max(size, 1),
            timeouts=timeouts,
            started_at=now,
            hold=hold_until is not None,
            hold_until=hold_until,
        )
        for pid in sorted(workers):
            rollout._add(pid, workers[pid], "ready", now)
        return rollout

    # -- events -----------------------------------------------------------------------------

    def worker_spawned(self, pid: int, release: str, now: float) -> None:
        """A worker was forked (by this rollout or by gunicorn)."""
        self._add(pid, release, "booting", now)

    def worker_loaded(self, pid: int, now: float) -> None:
        """The worker imported the app; its health check starts now."""
        slot = self.workers.get(pid)
        if slot is not None and slot.phase == "booting":
            self._set(slot, "loaded", now)

    def worker_healthy(self, pid: int, now: float) -> None:
        """The worker passed its health check: it takes traffic."""
        slot = self.workers.get(pid)
        if slot is not None and slot.phase in ("booting", "loaded"):
            self._set(slot, "ready", now)

    def worker_failed(
        self, pid: int, stage: FailStage, reason: str, error: str, now: float
    ) -> None:
        """The worker reported that it could not load the app or failed its check."""
        slot = self.workers.get(pid)
        if slot is None or slot.phase not in ("booting", "loaded", "ready"):
            return
        self._set(slot, "failed", now)
        self._record_failure(Failure(pid, slot.release, stage, reason, error))

    def abort(self, reason: str) -> None:
        """hotpatch itself failed in the master: stop going forward and roll back.

        During a rollback (or once finished) it changes nothing: the rollback goes on.
        """
        if self.mode == "forward":
            self._record_failure(Failure(None, self.target, "internal", reason))

    def spawn_failed(self, release: str, reason: str) -> None:
        """Forking a worker failed."""
        self._record_failure(Failure(None, release, "spawn", reason))

    def worker_exited(self, pid: int, now: float, *, is_recycled: bool = False) -> None:
        """The worker's process is gone (reaped).

        Args:
            pid: the worker.
            now: the current time.
            is_recycled: it left on its own after ``max_requests`` (not a crash).
        """
        slot = self.workers.pop(pid, None)
        if slot is None or slot.phase in ("retiring", "failed", "killed"):
            return
        if slot.phase == "ready" and (is_recycled or slot.release != self.target):
            return  # recycled, or an old worker died: the replacement logic refills
        if slot.phase == "ready":
            reason = f"worker {pid} exited after passing its health check (stage: crash)"
            self._record_failure(Failure(pid, slot.release, "crash", reason))
        elif slot.phase == "loaded":  # the app had loaded: it died in its health check
            reason = f"worker {pid} exited during its health check (stage: health)"
            self._record_failure(Failure(pid, slot.release, "health", reason))
        else:
            reason = f"worker {pid} exited while loading the app, before reporting (stage: load)"
            self._record_failure(Failure(pid, slot.release, "load", reason))

    @property
    def canary(self) -> WorkerSlot | None:
        """The canary (the first ready target worker) while the rollout holds."""
        if not self.hold or self.mode != "forward":
            return None
        ready = [s for s in self._in_phase("ready") if s.release == self.target]
        return min(ready, key=lambda s: s.order) if ready else None

    def release_hold(self) -> bool:
        """The canary passed: go on replacing workers. Returns whether the rollout held."""
        if not self.hold or self.mode != "forward":
            return False
        self.hold = False
        self.hold_until = None
        return True

    def reject(self, reason: str, now: float) -> bool:
        """The canary failed: roll back. Returns whether the rollout held (and now rolls back)."""
        if not self.hold or self.mode != "forward":
            return False
        canary = self.canary
        self.hold = False
        self.hold_until = None
        self._record_failure(Failure(canary.pid if canary else None, self.target, "canary", reason))
        return True

    # -- decisions --------------------------------------------------------------------------

    @property
    def is_finished(self) -> bool:
        return self.mode == "finished"

    @property
    def goal(self) -> str:
        """The release workers are being moved to now."""
        return self.target if self.mode == "forward" else self.known_good

    def next_actions(self, now: float) -> list[Action]:
        """What to do now. Call again after each event and at ``next_deadline()``."""
        actions = self._enforce_deadlines(now) if self.mode != "finished" else []
        if self.mode != "finished":
            actions.extend(self._replace(now))
        if self.mode == "finished" and not self._finish_emitted:
            self._finish_emitted = True
            actions.append(Finish(self.outcome or "rollback_failed"))
        return actions

    def _replace(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if self.mode == "rollback":
            for slot in self._in_phase("booting", "loaded"):
                if slot.release != self.known_good:
                    self._set(slot, "killed", now)
                    actions.append(Kill(slot.pid, "the rollout is rolling back"))
        if self._in_phase("booting", "loaded"):
            return actions  # one new worker at a time
        goal = self.goal
        ready = sorted(self._in_phase("ready"), key=lambda s: s.order)
        stale = [s for s in ready if s.release != goal]
        if self.hold and self.mode == "forward" and len(stale) < len(ready):
            if len(stale) < self.size:  # an old worker died while the canary bakes
                actions.append(Spawn(self.known_good))
            return actions  # the canary serves beside every old worker until the verdict
        if len(ready) > self.size and stale:
            oldest = stale.pop(0)
            ready.remove(oldest)
            self._set(oldest, "retiring", now)
            actions.append(Retire(oldest.pid))
        if stale or len(ready) < self.size:
            actions.append(Spawn(goal))
            return actions
        while len(ready) > self.size:
            extra = ready.pop(0)
            self._set(extra, "retiring", now)
            actions.append(Retire(extra.pid))
        if self.mode == "forward":
            if self.settle_until is None:
                self.settle_until = now + self.timeouts.settle_s
            if now < self.settle_until:
                return actions
        if self._in_phase("retiring", "failed", "killed"):
            return actions  # wait until the old processes are gone
        self._finish("completed" if self.mode == "forward" else "rolled_back")
        return actions

    def next_deadline(self) -> float | None:
        """The next time ``next_actions`` must run even if nothing is reported."""
        t = self.timeouts
        times: list[float] = []
        for slot in self.workers.values():
            if slot.phase == "booting":
                times.append(slot.spawned_at + t.boot_s)
            elif slot.phase == "loaded":
                times.append(slot.since + t.health_s + HEALTH_GRACE_S)
            elif slot.phase == "retiring" and not slot.kill_sent:
                times.append(slot.since + t.retire_s)
            elif slot.phase == "failed" and not slot.kill_sent:
                times.append(slot.since + FAILED_EXIT_GRACE_S)
        if self.mode == "forward" and self.settle_until is not None:
            times.append(self.settle_until)
        if self.mode == "forward" and self.hold and self.hold_until is not None:
            times.append(self.hold_until)
        return min(times) if times and self.mode != "finished" else None

    # -- internals --------------------------------------------------------------------------

    def _enforce_deadlines(self, now: float) -> list[Action]:
        t = self.timeouts
        actions: list[Action] = []
        if (
            self.hold
            and self.mode == "forward"
            and self.hold_until is not None
            and now >= self.hold_until
        ):
            self.reject("no canary verdict came before the deadline (stage: canary)", now)
        for slot in list(self.workers.values()):
            if slot.phase == "booting" and now >= slot.spawned_at + t.boot_s:
                reason = (
                    f"worker {slot.pid} did not load the app within {t.boot_s:g} s (stage: boot)"
                )
                self._set(slot, "killed", now)
                slot.kill_sent = True
                actions.append(Kill(slot.pid, reason))
                self._record_failure(Failure(slot.pid, slot.release, "boot", reason))
            elif slot.phase == "loaded" and now >= slot.since + t.health_s + HEALTH_GRACE_S:
                reason = (
                    f"worker {slot.pid}: health check did not finish within {t.health_s:g} s "
                    "(stage: health)"
                )
                self._set(slot, "killed", now)
                slot.kill_sent = True
                actions.append(Kill(slot.pid, reason))
                self._record_failure(Failure(slot.pid, slot.release, "health", reason))
            elif slot.phase == "retiring" and not slot.kill_sent and now >= slot.since + t.retire_s:
                slot.kill_sent = True
                actions.append(Kill(slot.pid, f"did not exit within {t.retire_s:g} s of SIGTERM"))
            elif (
                slot.phase == "failed"
                and not slot.kill_sent
                and now >= slot.since + FAILED_EXIT_GRACE_S
            ):
                slot.kill_sent = True
                actions.append(Kill(slot.pid, "did not exit after reporting a failure"))
        return actions

    def _record_failure(self, failure: Failure) -> None:
        if self.mode == "forward" and failure.release == self.target:
            self.failure = failure
            self.mode = "rollback"
            self.settle_until = None
        elif self.mode == "rollback" and failure.release == self.known_good:
            self.rollback_failures += 1
            if self.rollback_failures >= MAX_ROLLBACK_FAILURES:
                self._finish("rollback_failed")

    def _finish(self, outcome: Outcome) -> None:
        self.mode = "finished"
        self.outcome = outcome

    def _in_phase(self, *phases: Phase) -> list[WorkerSlot]:
        return [s for s in self.workers.values() if s.phase in phases]

    def _add(self, pid: int, release: str, phase: Phase, now: float) -> None:
        self._order += 1
        self.workers[pid] = WorkerSlot(pid, release, phase, now, now, self._order)

    @staticmethod
    def _set(slot: WorkerSlot, phase: Phase, now: float) -> None:
        slot.phase = phase
        slot.since = now
