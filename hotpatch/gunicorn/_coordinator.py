"""``hotpatch deploy``'s coordinator: one change to every worker of a gunicorn server.

The problem: the in-place strategy must be all or nothing across processes that keep serving,
and the coordinator is an ordinary command that may be slow, interrupted or given a stuck worker.
Whatever happens, the verdict it prints must be what happened, and the server must never stay on
a mix of versions: no worker committed while another refused, no respawned worker booting from
a release the others rolled back.

The mechanism, for ``in-place`` (``deploy``):

1. ``begin`` (master): snapshot the app directory as the release to deploy; the master records
   the workers taking part. A change that is not only Python modules (a template, a config
   file) cannot be carried in place: ``in-place`` refuses, ``auto`` rolls.
2. Phase 1, in every worker at once (``DeploySession.open``): read the release's files, guard
   every changed module; nothing commits. Any refusal, error or missing answer: every session is
   closed (each worker discards), the master drops the deploy, nothing changed anywhere.
   ``auto`` then runs a rolling reload and says why.
3. ``switch`` (master): only if the worker set is exactly the one that began, workers spawned
   from now on boot from the new release.
4. Phase 2 (``commit``) then phase 3 (``health``) in every worker at once; any failure or missing
   answer: every worker that may have committed is told ``rollback`` (one that cannot be reached
   rolls back by itself when its session closes, and is retired by the master to be sure), and
   the master's ``finish`` puts the spawn release back and retires any worker that booted from
   the new one.
5. ``confirm`` in every worker, then ``finish`` (deployed): the new release is known-good, so a
   worker recycled later boots the new code. A worker that cannot be confirmed is retired (and
   respawned on the new release).

``rolling`` is the master's rollout (``start_rollout``/``wait_for_rollout``); ``canary`` is a
rollout that holds after its first new worker while this coordinator judges that worker
against the old ones on real traffic (``_canary``); ``blue-green`` is a second master run by
the old one (``_bluegreen``). Each step reports an event (``on_event``) as it happens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from hotpatch.control.client import DeploySession, OutcomeUnknown
from hotpatch.errors import ConfigError, HotpatchError
from hotpatch.gunicorn._bluegreen import run_blue_green
from hotpatch.gunicorn._canary import CanaryOptions, run_canary
from hotpatch.gunicorn._client import (
    RolloutStillRunning,
    ask_master,
    load_state,
    start_rollout,
    wait_for_rollout,
)
from hotpatch.gunicorn._deploy import STRATEGIES, committed, phase_verdict

MASTER_TIMEOUT_S = 10.0
"""How long one request to the master may take (a snapshot of a large app included)."""
CLEANUP_S = 5.0
"""What a rollback step or the master's ``finish`` may still take when the deadline has passed:
undoing is never skipped because waiting ran out."""

Event = dict[str, Any]


@dataclass
class DeployResult:
    """What a deploy did.

    Attributes:
        outcome: ``deployed``, ``unchanged``, ``refused``, ``rolled_back``, ``rollback_failed``,
            ``started`` (rolling, not waited for) or ``unknown`` (the coordinator stopped waiting:
            still running).
        strategy: the strategy that ran (``in-place`` or ``rolling``).
        reason: why it was refused or rolled back, or why ``auto`` chose rolling.
        deploy_id: the master's deploy id (in-place), if one began.
        rollout_id: the rollout's id (rolling).
        release: the release deployed (or tried).
        to_last_commit_s: in-place: from the start of the deploy to the last worker's commit.
        duration_s: the whole deploy.
        events: every event reported, in order.
        record: rolling: the master's record of the rollout.
        blue_green: blue-green: the old and new master's pids, the phase reached, the window.
        canary: canary: the judge's figures (requests and errors per arm, rates, p-values,
            median shift), once judged.
    """

    outcome: str
    strategy: str
    reason: str = ""
    deploy_id: int | None = None
    rollout_id: int | None = None
    release: str | None = None
    to_last_commit_s: float | None = None
    duration_s: float = 0.0
    events: list[Event] = field(default_factory=list)
    record: dict[str, Any] | None = None
    blue_green: dict[str, Any] | None = None
    canary: dict[str, Any] | None = None

    @property
    def is_success(self) -> bool:
        return self.outcome in ("deployed", "unchanged", "started")

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "strategy": self.strategy,
            "reason": self.reason,
            "deploy_id": self.deploy_id,
            "rollout_id": self.rollout_id,
            "release": self.release,
            "to_last_commit_s": self.to_last_commit_s,
            "duration_s": self.duration_s,
            "events": self.events,
            **({"blue_green": self.blue_green} if self.blue_green is not None else {}),
            **({"canary": self.canary} if self.strategy == "canary" else {}),
        }


class _Run:
    def __init__(
        self,
        pid: int,
        *,
        timeout_s: float,
        state_dir: str | None,
        on_event: Callable[[Event], None] | None,
        between_phases: Callable[[str], None] | None,
    ) -> None:
        self.pid = pid
        self.started = time.perf_counter()
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.state_dir = state_dir
        self.on_event = on_event
        self.between_phases = between_phases
        self.events: list[Event] = []

    def emit(self, kind: str, **fields: Any) -> None:
        event = {"t": round(time.perf_counter() - self.started, 4), "event": kind, **fields}
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def remaining(self, *, at_least: float = 0.05) -> float:
        return max(self.deadline - time.monotonic(), at_least)

    def master(self, request: dict[str, Any]) -> dict[str, Any]:
        cleanup = request.get("op") == "finish"
        return ask_master(
            self.pid,
            request,
            timeout_s=min(
                MASTER_TIMEOUT_S, self.remaining(at_least=CLEANUP_S if cleanup else 0.05)
            ),
            state_dir=self.state_dir,
        )

    def pause(self, phase: str) -> None:
        if self.between_phases is not None:
            self.between_phases(phase)

    def result(self, outcome: str, strategy: str, **fields: Any) -> DeployResult:
        return DeployResult(
            outcome,
            strategy,
            duration_s=round(time.perf_counter() - self.started, 4),
            events=self.events,
            **fields,
        )


def deploy(
    pid: int,
    *,
    strategy: str = "auto",
    timeout_s: float = 120.0,
    wait: bool = True,
    state_dir: str | None = None,
    on_event: Callable[[Event], None] | None = None,
    between_phases: Callable[[str], None] | None = None,
    keep_old_s: float = 60.0,
    canary: CanaryOptions | None = None,
) -> DeployResult:
    """Deploy the code in the app directory of gunicorn master ``pid`` to all its workers.

    Args:
        pid: the master.
        strategy: ``auto`` (in-place when phase 1 accepts in every worker, else rolling),
            ``in-place``, ``rolling`` or ``blue-green``.
        timeout_s: how long to wait in all; a deploy still running then is reported
            ``unknown``. For blue-green: how long the new master's workers may take to become
            healthy (the old master's deadline); the command waits through the window on top.
        wait: rolling and blue-green: wait for the outcome (``False``: ``started``; a blue-green
            goes on in the old master).
        state_dir: the master's state directory, when not the default.
        on_event: called with each progress event as it happens.
        between_phases: a test seam, called with ``"prepared"``, ``"switched"``,
            ``"committed"``, ``"checked"`` between the phases of an in-place deploy.
        keep_old_s: blue-green: how long the old master stays idle, ready to switch back.
        canary: ``canary`` only: bake time, minimum samples, deadline (default:
            ``CanaryOptions()``, a 60 s bake). ``timeout_s`` must leave room for the deadline.

    Raises:
        ConfigError: a wrong argument, or no master of this user running hotpatch's hooks.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    run = _Run(
        pid,
        timeout_s=timeout_s,
        state_dir=state_dir,
        on_event=on_event,
        between_phases=between_phases,
    )
    if canary is not None and strategy != "canary":
        raise ConfigError("canary options are for --strategy canary only")
    if strategy == "canary":
        canary = canary or CanaryOptions()
        if timeout_s < canary.until_s + 10:
            raise ConfigError(
                f"a timeout of {timeout_s:g} s leaves no room for the canary's bake deadline of "
                f"{canary.until_s:g} s (plus the canary's boot): give --timeout at least "
                f"{canary.until_s + 10:g}"
            )
    load_state(pid, state_dir)  # raises ConfigError: nothing to deploy to
    if strategy == "canary":
        assert canary is not None
        result: DeployResult = run_canary(run, canary)
        return result
    if strategy == "rolling":
        return _rolling(run, reason="", wait=wait)
    if strategy == "blue-green":
        if not (0 < keep_old_s < float("inf")):
            raise ConfigError(
                f"keep_old_s must be a positive number of seconds, got {keep_old_s!r}"
            )
        return run_blue_green(run, keep_old_s=keep_old_s, wait=wait)
    return _in_place(run, fallback=strategy == "auto", wait=wait)


def _rolling(run: _Run, *, reason: str, wait: bool) -> DeployResult:
    rollout_id = start_rollout(run.pid, run.state_dir)
    run.emit("rolling.started", rollout_id=rollout_id, reason=reason or None)
    if not wait:
        return run.result("started", "rolling", reason=reason, rollout_id=rollout_id)
    try:
        record = wait_for_rollout(
            run.pid,
            rollout_id,
            timeout_s=run.remaining(),
            state_dir=run.state_dir,
            on_event=lambda event: run.emit("rolling.event", rollout=event),
        )
    except RolloutStillRunning as exc:
        return run.result("unknown", "rolling", reason=str(exc), rollout_id=rollout_id)
    except HotpatchError as exc:  # the master exited
        return run.result("unknown", "rolling", reason=str(exc), rollout_id=rollout_id)
    outcome = record.get("outcome")
    why = reason if outcome == "completed" else str(record.get("reason") or outcome)
    return run.result(
        "deployed"
        if outcome == "completed"
        else "rolled_back"
        if record.get("rolled_back")
        else "refused"
        if outcome == "refused"
        else "rollback_failed",
        "rolling",
        reason=why,
        rollout_id=rollout_id,
        release=record.get("release"),
        record=record,
    )


def _in_place(run: _Run, *, fallback: bool, wait: bool) -> DeployResult:
    strategy = "auto" if fallback else "in-place"
    try:
        begin = run.master({"op": "begin", "strategy": strategy, "timeout_s": run.timeout_s})
    except HotpatchError as exc:
        return run.result("unknown", "in-place", reason=f"{exc}")
    if not begin.get("ok"):
        reason = str(begin.get("reason"))
        run.emit("deploy.refused", phase="begin", reason=reason)
        return run.result("refused", "in-place", reason=reason)
    deploy_id = int(begin["deploy_id"])
    release = str(begin["release"])
    workers = [int(p) for p in begin.get("workers") or []]
    run.emit(
        "deploy.started",
        deploy_id=deploy_id,
        release=release,
        known_good=begin.get("known_good"),
        workers=workers,
        changed=list(begin.get("changed_python") or []) + list(begin.get("changed_other") or []),
    )

    def finish(outcome: str, *, reason: str = "", retire: list[int] | None = None) -> str | None:
        try:
            ack = run.master(
                {
                    "op": "finish",
                    "deploy_id": deploy_id,
                    "outcome": outcome,
                    "reason": reason,
                    "retire": retire or [],
                }
            )
        except HotpatchError as exc:
            return str(exc)
        return None if ack.get("ok") else str(ack.get("reason"))

    if not begin.get("changed_count"):
        finish("unchanged")
        run.emit("deploy.unchanged", release=release)
        return run.result(
            "unchanged",
            "in-place",
            reason="the app directory holds the code already running",
            deploy_id=deploy_id,
            release=release,
        )
    other = list(begin.get("changed_other") or [])
    if other:
        reason = (
            f"files that are not Python modules changed ({', '.join(other[:5])}"
            f"{', ...' if len(other) > 5 else ''}): an in-place patch carries Python modules only"
        )
        return _refused(
            run,
            finish,
            "begin",
            reason,
            fallback=fallback,
            wait=wait,
            deploy_id=deploy_id,
            release=release,
        )

    sessions = {
        pid: DeploySession(
            pid,
            deploy_id=str(deploy_id),
            release=release,
            release_dir=str(begin["release_dir"]),
            expires_s=run.timeout_s + 1.0,
        )
        for pid in workers
    }
    with ThreadPoolExecutor(max_workers=max(1, len(sessions))) as pool:

        def everywhere(phase: str, targets: list[int]) -> dict[int, dict[str, Any]]:
            def one(pid: int) -> dict[str, Any]:
                session = sessions[pid]
                try:
                    if phase == "prepare":
                        answer = session.open(timeout_s=run.remaining())
                    else:
                        floor = CLEANUP_S if phase == "rollback" else 0.05
                        answer = session.step(phase, timeout_s=run.remaining(at_least=floor))
                except OutcomeUnknown as exc:
                    answer = {"outcome": "unknown", "unknown": True, "message": str(exc)}
                except HotpatchError as exc:  # never reached: nothing was sent
                    answer = {"outcome": "unreachable", "message": str(exc)}
                except OSError as exc:
                    answer = {"outcome": "unreachable", "message": f"{exc}"}
                run.emit(
                    "worker.phase",
                    phase=phase,
                    worker_pid=pid,
                    outcome=answer.get("outcome"),
                    message=answer.get("message"),
                    modules=answer.get("modules"),
                    duration_s=answer.get("duration_s"),
                )
                return answer

            return dict(zip(targets, pool.map(one, targets), strict=True))

        def close_all() -> None:
            for session in sessions.values():
                session.close()

        try:
            prepared = everywhere("prepare", workers)
            verdict = phase_verdict("prepare", prepared)
            if not verdict.ok:
                close_all()
                return _refused(
                    run,
                    finish,
                    "prepare",
                    verdict.reason,
                    fallback=fallback,
                    wait=wait,
                    deploy_id=deploy_id,
                    release=release,
                )
            run.pause("prepared")
            try:
                switch = run.master({"op": "switch", "deploy_id": deploy_id})
            except HotpatchError as exc:
                close_all()  # nothing committed; the master drops the deploy when it expires
                return run.result(
                    "unknown",
                    "in-place",
                    reason=f"{exc}; no worker committed",
                    deploy_id=deploy_id,
                    release=release,
                )
            if not switch.get("ok"):
                close_all()
                reason = str(switch.get("reason"))
                run.emit("deploy.refused", phase="switch", reason=reason)
                finish("refused", reason=reason)
                return run.result(
                    "refused", "in-place", reason=reason, deploy_id=deploy_id, release=release
                )
            run.pause("switched")
            commits = everywhere("commit", workers)
            last_commit = time.perf_counter() - run.started
            verdict = phase_verdict("commit", commits)
            if verdict.ok:
                run.pause("committed")
                checks = everywhere("health", workers)
                verdict = phase_verdict("health", checks)
                doubtful = workers
                failed_phase = "health"
            else:
                doubtful = committed(commits)
                failed_phase = "commit"
            if not verdict.ok:
                reason = f"{failed_phase}: {verdict.reason}"
                run.emit("deploy.failed", phase=failed_phase, reason=reason)
                back = everywhere("rollback", [p for p in doubtful if p not in verdict.unknown])
                close_all()
                stuck = sorted(
                    set(verdict.unknown)
                    | {p for p, a in back.items() if a.get("outcome") != "rolled_back"}
                )
                problem = finish("rolled_back", reason=reason, retire=stuck)
                outcome = "rolled_back"
                if problem is not None:
                    reason += f"; the master's record could not be updated: {problem}"
                    outcome = "unknown"
                if stuck:
                    reason += (
                        f"; workers {', '.join(map(str, stuck))} could not be rolled back in "
                        "place and were retired (respawned on the known-good release)"
                    )
                return run.result(
                    outcome,
                    "in-place",
                    reason=reason,
                    deploy_id=deploy_id,
                    release=release,
                    to_last_commit_s=round(last_commit, 4),
                )
            run.pause("checked")
            confirmed = everywhere("confirm", workers)
            close_all()
            unconfirmed = [p for p, a in confirmed.items() if a.get("outcome") != "deployed"]
            problem = finish("deployed", retire=unconfirmed)
        finally:
            close_all()
    reason = ""
    if unconfirmed:
        reason = (
            f"workers {', '.join(map(str, unconfirmed))} could not be confirmed and were "
            "retired (respawned on the new release)"
        )
    if problem is not None:
        return run.result(
            "unknown",
            "in-place",
            reason=f"every worker committed, but the master did not record it: {problem}",
            deploy_id=deploy_id,
            release=release,
            to_last_commit_s=round(last_commit, 4),
        )
    run.emit("deploy.completed", release=release)
    return run.result(
        "deployed",
        "in-place",
        reason=reason,
        deploy_id=deploy_id,
        release=release,
        to_last_commit_s=round(last_commit, 4),
    )


def _refused(
    run: _Run,
    finish: Callable[..., str | None],
    phase: str,
    reason: str,
    *,
    fallback: bool,
    wait: bool,
    deploy_id: int,
    release: str,
) -> DeployResult:
    """Phase 1 (or the release itself) refused in place: nothing changed anywhere."""
    run.emit("deploy.refused", phase=phase, reason=reason)
    problem = finish("refused", reason=reason)
    if problem is not None:
        return run.result(
            "unknown",
            "in-place",
            reason=f"{reason}; nothing was committed, but the master did not answer: {problem}",
            deploy_id=deploy_id,
            release=release,
        )
    if not fallback:
        return run.result(
            "refused", "in-place", reason=reason, deploy_id=deploy_id, release=release
        )
    run.emit("deploy.fallback", strategy="rolling", reason=reason)
    return _rolling(run, reason=f"in-place refused: {reason}", wait=wait)
