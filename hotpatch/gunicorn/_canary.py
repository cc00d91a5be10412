"""``hotpatch deploy --strategy canary``: one worker on the new release, judged on real traffic.

The problem: a release can pass every health check and still be worse under real traffic (an
error on one request in ten, a slower query). A rolling reload would replace every worker before
anyone noticed. The canary strategy lets one worker of the new release serve its share of real
requests first, compares it with the old workers over the same stretch of time, and lets the rest
roll only if it is not worse; if it is, only that worker is stopped, and the old workers (which
never stopped serving) stay the known-good release.

The mechanism, in three parts:

- The master runs an ordinary rollout that *holds* after its first new worker is ready
  (``canary_begin``; ``_machine.Rollout`` with ``hold_until``): the canary serves beside every old
  worker, one more than the configured count. It rolls back by itself if no verdict comes by the
  hold deadline (a coordinator that died).
- Every worker records its own requests (``_metrics``); this coordinator reads them through each
  worker's control socket (the read-only ``stats`` request). The first reading of each worker
  opens its window; each later one adds the worker's new requests, errors (5xx answers and
  escaped exceptions) and latencies to its arm, the canary's or the old workers' (``Window``, pure).
- After ``bake_s`` the judge (``hotpatch.judge.judge``: one-sided Fisher exact test on the error
  rates at ``p < 0.01`` with at least 0.5 percentage points more, and Mann-Whitney U on latency
  with at most a 25% median shift; a shift of less than ``min_latency_shift_s``, 1 ms by default,
  is never a failure: at sub-millisecond latencies a busy host's scheduling alone moves a new
  process's median by more than 25%) decides: ``pass`` -> the master goes on (``canary_verdict``),
  the rest roll; ``fail`` -> the master rolls back (retires the canary); ``inconclusive`` (fewer
  than ``min_samples`` requests in an arm) -> the bake goes on until ``deadline_s``, then fails.
  The verdict's figures (requests and errors per arm, rates, p-values, median shift) are part of
  the result and the rollout's record.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from hotpatch.errors import ConfigError, HotpatchError
from hotpatch.judge import Arm, ArmSummary, Verdict, judge

DEFAULT_BAKE_S = 60.0
DEFAULT_MIN_SAMPLES = 100
DEFAULT_MIN_LATENCY_SHIFT_S = 0.001
STATS_TIMEOUT_S = 3.0
"""How long one worker's ``stats`` answer may take (a worker that misses it is read next time)."""
HOLD_GRACE_S = 10.0
"""The master's hold deadline is the coordinator's own deadline plus this."""
MAX_FIGURES = 40
Event = dict[str, Any]
StatsReader = Callable[[int, int], dict[str, Any]]
"""``read(pid, since)``: a worker's ``stats`` answer (raises ``HotpatchError``/``OSError``)."""


@dataclass(frozen=True)
class CanaryOptions:
    """How a canary is judged.

    Attributes:
        bake_s: how long the canary serves before the first verdict.
        min_samples: requests each arm needs before any verdict (fewer: inconclusive).
        deadline_s: an inconclusive verdict extends the bake until this long after the bake
            began; then the canary fails (``None``: twice ``bake_s``).
        min_latency_shift_s: the smallest rise of the median latency (absolute) that can fail
            the canary, on top of the judge's 25% relative bound.
    """

    bake_s: float = DEFAULT_BAKE_S
    min_samples: int = DEFAULT_MIN_SAMPLES
    deadline_s: float | None = None
    min_latency_shift_s: float = DEFAULT_MIN_LATENCY_SHIFT_S

    def __post_init__(self) -> None:
        for name in ("bake_s", "deadline_s"):
            value = getattr(self, name)
            if value is None and name == "deadline_s":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number of seconds, not {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
        if (
            isinstance(self.min_samples, bool)
            or not isinstance(self.min_samples, int)
            or self.min_samples < 1
        ):
            raise ConfigError(f"min_samples must be a positive int, not {self.min_samples!r}")
        shift = self.min_latency_shift_s
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift >= 0:
            raise ConfigError(f"min_latency_shift_s must be >= 0 seconds, not {shift!r}")
        if self.deadline_s is not None and self.deadline_s < self.bake_s:
            raise ConfigError(
                f"the bake deadline ({self.deadline_s:g} s) is shorter than the bake "
                f"({self.bake_s:g} s)"
            )

    @property
    def until_s(self) -> float:
        """The bake's deadline, from its start."""
        return self.deadline_s if self.deadline_s is not None else 2 * self.bake_s


@dataclass
class _Seen:
    release: str
    requests: int
    errors: int
    seq: int


@dataclass
class Window:
    """The requests the canary and the old workers served since each was first read (pure).

    ``add(pid, release, answer)`` takes one worker's ``stats`` answer; the first answer of a
    worker only opens its window. Only the worker's counts for ``release`` count (the release it
    was started on: ``target`` for the canary, ``known_good`` for the others).
    """

    canary_pid: int
    target: str
    known_good: str
    seed: int | None = None
    calls: dict[str, int] = field(default_factory=lambda: {"canary": 0, "baseline": 0})
    errors: dict[str, int] = field(default_factory=lambda: {"canary": 0, "baseline": 0})
    missed: int = 0
    _seen: dict[int, _Seen] = field(default_factory=dict)
    _arms: dict[str, Arm] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._arms = {"canary": Arm(seed=self.seed), "baseline": Arm(seed=self.seed)}

    def arm_of(self, pid: int) -> str:
        return "canary" if pid == self.canary_pid else "baseline"

    def release_of(self, pid: int) -> str:
        return self.target if pid == self.canary_pid else self.known_good

    def add(self, pid: int, answer: Mapping[str, Any]) -> None:
        """Add worker ``pid``'s answer (``{"releases": {release: counts}}``)."""
        release = self.release_of(pid)
        releases = answer.get("releases")
        counts = releases.get(release) if isinstance(releases, dict) else None
        if not isinstance(counts, dict):
            counts = {"requests": 0, "errors": 0, "seq": 0, "latencies_s": []}
        requests, errors, seq = (_count(counts.get(k)) for k in ("requests", "errors", "seq"))
        before = self._seen.get(pid)
        self._seen[pid] = _Seen(release, requests, errors, seq)
        if before is None or requests < before.requests:  # first reading (or a new process)
            return
        arm = self.arm_of(pid)
        self.calls[arm] += requests - before.requests
        self.errors[arm] += max(errors - before.errors, 0)
        self.missed += _count(counts.get("missed"))
        samples = counts.get("latencies_s")
        if isinstance(samples, list):
            for value in samples[: requests - before.requests]:
                if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
                    self._arms[arm].record(float(value))

    def since(self, pid: int) -> int:
        """The ``since`` to ask worker ``pid`` with (a huge number before its first reading: its
        past requests are not part of the window)."""
        seen = self._seen.get(pid)
        return seen.seq if seen is not None else 2**62

    def forget(self, pid: int) -> None:
        """Worker ``pid`` is gone: what it served stays counted."""
        self._seen.pop(pid, None)

    def summaries(self) -> tuple[ArmSummary, ArmSummary]:
        """``(baseline, canary)`` as the judge takes them."""
        out = []
        for arm in ("baseline", "canary"):
            latencies = self._arms[arm].summary().latencies_s
            out.append(ArmSummary(self.calls[arm], self.errors[arm], latencies))
        return out[0], out[1]

    def judge(self, *, min_samples: int, min_latency_shift_s: float = 0.0) -> Verdict:
        """The judge's verdict on the two arms; a latency failure whose median rose by less
        than ``min_latency_shift_s`` passes (its detail says so)."""
        baseline, canary = self.summaries()
        verdict = judge(baseline, canary, min_calls=min_samples)
        if verdict.decision == "fail" and verdict.reason == "latency":
            rise = (_median(canary) or 0.0) - (_median(baseline) or 0.0)
            if rise < min_latency_shift_s:
                return replace(
                    verdict,
                    decision="pass",
                    reason="",
                    detail=f"{verdict.detail}: {rise * 1e3:.3g} ms slower, under the "
                    f"{min_latency_shift_s * 1e3:g} ms floor",
                )
        return verdict


def figures(verdict: Verdict, *, window_s: float, baseline_workers: int) -> dict[str, Any]:
    """The verdict's figures, flat and JSON-ready (the result, the record and ``--json``)."""
    base, cand = verdict.baseline, verdict.candidate
    out: dict[str, Any] = dict(verdict.figures())
    out.update(
        window_s=round(window_s, 3),
        baseline_workers=baseline_workers,
        baseline_error_rate=round(base.error_rate, 6),
        candidate_error_rate=round(cand.error_rate, 6),
        baseline_median_s=_median(base),
        candidate_median_s=_median(cand),
        detail=verdict.detail,
    )
    return out


def _median(arm: ArmSummary) -> float | None:
    value = arm.latency_quantile(0.5)
    return round(value, 6) if value is not None else None


def describe_failure(verdict: Verdict) -> str:
    """One line: why the canary failed (the judge's reason and figures)."""
    kind = {
        "error_rate": "more errors than the old workers",
        "success_rate": "too many errors",
        "latency": "slower than the old workers",
        "latency_p99": "p99 latency over the bound",
        "min_calls": "too few requests to judge before the deadline",
    }.get(verdict.reason, verdict.reason or "failed")
    return f"canary {kind}: {verdict.detail} (stage: canary)"


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def flat_figures(values: Mapping[str, Any]) -> dict[str, Any]:
    """Only flat JSON scalars, short keys, at most ``MAX_FIGURES`` (what the master keeps)."""
    out: dict[str, Any] = {}
    for key, value in list(values.items())[:MAX_FIGURES]:
        if not isinstance(key, str) or len(key) > 64:
            continue
        is_number = isinstance(value, (bool, int)) or (
            isinstance(value, float) and math.isfinite(value)
        )
        if value is None or is_number:
            out[key] = value
        elif isinstance(value, str):
            out[key] = value[:500]
    return out


class Bake:
    """The coordinator's loop around ``Window``: read every worker, judge when it is time.

    Args:
        window: the arms.
        options: bake time, minimum samples, deadline.
        read: reads one worker's stats.
        workers: the worker pids now (the canary and the old workers).
        emit: progress events.
        clock: ``time.monotonic`` (a seam for the unit tests).
    """

    def __init__(
        self,
        window: Window,
        options: CanaryOptions,
        *,
        read: StatsReader,
        emit: Callable[..., None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.options = options
        self.read = read
        self.emit = emit
        self.clock = clock
        self.started = clock()
        self.unread: dict[int, str] = {}
        self._next_progress = self.started

    def poll(self, workers: Iterable[int]) -> None:
        """Read every worker once (a worker that cannot be read now is read next time)."""
        live = set(workers)
        for pid in list(self.window._seen):
            if pid not in live:
                self.window.forget(pid)
        for pid in sorted(live):
            try:
                answer = self.read(pid, self.window.since(pid))
            except (HotpatchError, OSError) as exc:
                self.unread[pid] = str(exc)
                continue
            if answer.get("outcome") != "stats":
                self.unread[pid] = str(answer.get("message") or answer.get("outcome"))
                continue
            self.unread.pop(pid, None)
            self.window.add(pid, answer)
        now = self.clock()
        if now >= self._next_progress:
            self._next_progress = now + max(self.options.bake_s / 4, 1.0)
            self.emit(
                "canary.progress",
                elapsed_s=round(now - self.started, 3),
                canary_requests=self.window.calls["canary"],
                canary_errors=self.window.errors["canary"],
                baseline_requests=self.window.calls["baseline"],
                baseline_errors=self.window.errors["baseline"],
            )

    def verdict(self) -> Verdict | None:
        """The verdict once the bake is over: ``None`` while baking (or inconclusive before the
        deadline); an inconclusive verdict at the deadline is returned (the caller fails it)."""
        elapsed = self.clock() - self.started
        if elapsed < self.options.bake_s:
            return None
        verdict = self.window.judge(
            min_samples=self.options.min_samples,
            min_latency_shift_s=self.options.min_latency_shift_s,
        )
        if verdict.decision == "inconclusive" and elapsed < self.options.until_s:
            return None
        return verdict

    @property
    def elapsed_s(self) -> float:
        return self.clock() - self.started


def stats_reader(timeout_s: float = STATS_TIMEOUT_S) -> StatsReader:
    """The real reader: the worker's control socket, ``stats`` request."""
    from hotpatch.control.client import send_request

    def read(pid: int, since: int) -> dict[str, Any]:
        return send_request(pid, "stats", since=since, timeout_s=timeout_s)

    return read


def sleep_until(deadline: float, *, step_s: float) -> None:
    """Sleep to the next poll (bounded by ``deadline``)."""
    with contextlib.suppress(ValueError):
        time.sleep(max(min(step_s, deadline - time.monotonic()), 0.0))


class Coordinator(Protocol):
    """What ``run_canary`` needs from the deploy coordinator's run (``_coordinator._Run``)."""

    pid: int
    state_dir: str | None
    timeout_s: float

    def emit(self, kind: str, **fields: Any) -> None: ...

    def remaining(self, *, at_least: float = 0.05) -> float: ...

    def master(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def result(self, outcome: str, strategy: str, **fields: Any) -> Any: ...


POLL_S = 0.5
"""Time between two readings of the workers (shorter for short bakes)."""


def run_canary(run: Coordinator, options: CanaryOptions, *, read: StatsReader | None = None) -> Any:
    """The canary strategy, from the coordinator's side (see the module docstring).

    Returns the coordinator's ``DeployResult``: ``deployed`` (passed, every worker rolled),
    ``rolled_back`` (failed; with the figures), ``refused`` (never started), ``unknown`` (the
    coordinator stopped waiting or lost the master: the master decides by itself then, and
    rolls back a canary whose verdict never came).
    """
    from hotpatch.gunicorn._client import RolloutStillRunning, load_state, wait_for_rollout

    read = read or stats_reader()
    # The master's own deadline: ours, plus a grace; never a canary held after we gave up.
    hold_s = run.remaining() + HOLD_GRACE_S
    try:
        begin = run.master({"op": "canary_begin", "hold_s": hold_s})
    except HotpatchError as exc:
        return run.result("unknown", "canary", reason=str(exc))
    if not begin.get("ok"):
        reason = str(begin.get("reason"))
        run.emit("deploy.refused", phase="begin", reason=reason)
        return run.result("refused", "canary", reason=reason)
    rollout_id = int(begin["rollout_id"])
    release = str(begin["release"])
    run.emit("canary.started", rollout_id=rollout_id, release=release)
    shown = [0]  # the master's rollout events already passed on

    def follow(record: dict[str, Any] | None) -> None:
        events = (record or {}).get("events") or []
        for event in events[shown[0] :]:
            if isinstance(event, dict):
                run.emit("rolling.event", rollout=event)
        shown[0] = max(shown[0], len(events))

    def follow_late(event: dict[str, Any]) -> None:
        if shown[0] > 0:  # wait_for_rollout starts from the first event: skip those shown
            shown[0] -= 1
            return
        run.emit("rolling.event", rollout=event)

    def finished(**extra: Any) -> Any:
        try:
            record = wait_for_rollout(
                run.pid,
                rollout_id,
                timeout_s=run.remaining(),
                state_dir=run.state_dir,
                on_event=follow_late,
            )
        except (RolloutStillRunning, HotpatchError) as exc:
            return run.result(
                "unknown",
                "canary",
                reason=str(exc),
                rollout_id=rollout_id,
                release=release,
                **extra,
            )
        outcome = record.get("outcome")
        canary = record.get("canary") if isinstance(record.get("canary"), dict) else {}
        verdict = (canary or {}).get("verdict") or {}
        fields = {"canary": verdict.get("figures") or extra.get("canary"), "record": record}
        if outcome == "completed":
            run.emit("rolling.completed", rollout_id=rollout_id, release=release)
            return run.result(
                "deployed", "canary", rollout_id=rollout_id, release=release, **fields
            )
        reason = str(record.get("reason") or outcome)
        status = (
            "rolled_back"
            if record.get("rolled_back")
            else "refused"
            if outcome == "refused"
            else "rollback_failed"
        )
        return run.result(
            status, "canary", reason=reason, rollout_id=rollout_id, release=release, **fields
        )

    # 1. the canary boots and opens its control socket
    canary_pid = None
    known_good = ""
    old: list[int] = []
    deadline = time.monotonic() + run.remaining()
    while time.monotonic() < deadline:
        with contextlib.suppress(ConfigError):
            state = load_state(run.pid, run.state_dir)
            current = state.get("rollout") if isinstance(state.get("rollout"), dict) else None
            if current is None or current.get("id") != rollout_id:
                return finished()  # over already: the canary failed to boot, or was stopped
            follow(current)
            info = current.get("canary") if isinstance(current.get("canary"), dict) else {}
            pid = (info or {}).get("pid")
            workers = [w for w in state.get("workers") or [] if isinstance(w, dict)]
            listening = {w.get("pid") for w in workers if w.get("listening")}
            if isinstance(pid, int) and pid in listening:
                canary_pid = pid
                known_good = str(current.get("known_good"))
                old = [
                    w["pid"]
                    for w in workers
                    if isinstance(w.get("pid"), int) and w.get("release") == known_good
                ]
                break
        time.sleep(0.05)
    if canary_pid is None:
        return run.result(
            "unknown",
            "canary",
            reason="the canary did not start serving before the timeout; the master rolls it "
            "back by itself when its hold deadline passes",
            rollout_id=rollout_id,
            release=release,
        )
    run.emit("canary.serving", worker_pid=canary_pid, release=release, old_workers=old)

    # 2. the bake: read every worker until the judge decides
    window = Window(canary_pid, release, known_good)
    bake = Bake(window, options, read=read, emit=run.emit)
    step = min(POLL_S, max(options.bake_s / 10, 0.05))
    verdict = None
    while verdict is None:
        replaced = False
        with contextlib.suppress(ConfigError):
            state = load_state(run.pid, run.state_dir)
            current = state.get("rollout") if isinstance(state.get("rollout"), dict) else None
            info = (current or {}).get("canary") if current else None
            if (
                current is None
                or current.get("id") != rollout_id
                or current.get("mode") != "forward"
            ):
                return finished()  # the canary crashed, or the master's deadline passed
            follow(current)
            workers = [w for w in state.get("workers") or [] if isinstance(w, dict)]
            holding = isinstance(info, dict) and info.get("holding")
            pid = info.get("pid") if isinstance(info, dict) else None
            listening = {w.get("pid") for w in workers if w.get("listening")}
            if not holding or pid not in listening:
                replaced = True  # no canary serving now (recycled by max_requests: a new one boots)
            elif pid != canary_pid and isinstance(pid, int):
                run.emit("canary.replaced", worker_pid=pid, previous_pid=canary_pid)
                canary_pid = pid  # its window starts over: the bake goes on from here
                window = Window(canary_pid, release, known_good)
                bake = Bake(window, options, read=read, emit=run.emit)
            old = [
                w["pid"]
                for w in workers
                if isinstance(w.get("pid"), int)
                and w.get("release") == known_good
                and w.get("listening")
            ]
        if replaced:
            if time.monotonic() >= deadline:
                return finished()
            sleep_until(deadline, step_s=step)
            continue
        bake.poll([canary_pid, *old])
        verdict = bake.verdict()
        if verdict is None:
            if time.monotonic() >= deadline:
                return run.result(
                    "unknown",
                    "canary",
                    reason="the bake outlasted the timeout; the master rolls the canary back "
                    "by itself when its hold deadline passes",
                    rollout_id=rollout_id,
                    release=release,
                )
            sleep_until(deadline, step_s=step)
    numbers = figures(verdict, window_s=bake.elapsed_s, baseline_workers=len(old))
    decision = "pass" if verdict.decision == "pass" else "fail"
    reason = "" if decision == "pass" else describe_failure(verdict)
    run.emit("canary.judged", decision=decision, reason=reason or None, figures=numbers)

    # 3. the verdict: the master goes on or rolls back
    try:
        ack = run.master(
            {
                "op": "canary_verdict",
                "rollout_id": rollout_id,
                "decision": decision,
                "reason": reason,
                "figures": flat_figures(numbers),
            }
        )
    except HotpatchError as exc:
        return run.result(
            "unknown",
            "canary",
            reason=f"the verdict ({decision}) could not be handed to the master: {exc}",
            rollout_id=rollout_id,
            release=release,
            canary=numbers,
        )
    if not ack.get("ok"):
        run.emit("canary.verdict_refused", reason=ack.get("reason"))
    return finished(canary=numbers)
