"""The handle and the controller of a parallel run: canary, shadow, experiment.

A run starts by guarding the candidate exactly as ``patch`` does (``Engine.prepare``: load,
compile, execute, compatibility, verifiers), holds its modules (``patch``/``rollback`` of them is
refused until the run ends), and puts a dispatch (``_dispatch``) on every function the change
updates, at a safe point. A controller thread then drives it:

- **canary**: the new arm's share ramps through ``steps``; at the end of each step the step's
  calls are judged (``hotpatch.judge``) and the health checks run. Pass: next step. Inconclusive
  (too few calls): the step is held and extended, until the progress deadline rolls it back.
  Fail: rolled back at once. The last step (100) is the promote.
- **shadow**: every caller gets the old arm's outcome; sampled calls run the new arm too, on a
  worker thread, and the two outcomes are compared. Promoted after ``min_calls`` comparisons
  within ``max_mismatch_rate``; discarded as soon as the mismatches exceed it.
- **experiment**: a fixed sticky split until someone calls ``promote`` or ``abort``;
  ``hotpatch.record`` attributes outcomes to the arm of the current call.

The end is one of two safe-point commits. *Rollback* puts every function's own code back at once
(the candidate is discarded and the history records it, outcome ``rejected``, stage = the run's
kind). *Promote* takes the dispatch off and commits the candidate in the same safe point
(``Engine.commit_prepared``: the same history entry, fidelity and health checks as ``patch``), so
the functions are the same objects as before and run the new code with no dispatch left.
"""

from __future__ import annotations

import itertools
import math
import queue
import random
import reprlib
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hotpatch._log import get_logger
from hotpatch.engine import Engine, PatchResult, SourceInput, default_engine
from hotpatch.engine.changeset import SetAttr, SetFunction, SetName
from hotpatch.engine.safepoint import SafePointTimeout, commit_at_safe_point
from hotpatch.errors import ConfigError, HotpatchError, PatchRejected
from hotpatch.judge import ArmSummary, compare_means, judge
from hotpatch.routing import RoutingKey, bucket
from hotpatch.trial._dispatch import (
    NEW,
    OLD,
    Dispatcher,
    StepStats,
    Target,
    build_trampoline,
    count_value,
    install_set,
    new_globals,
    refusal_of,
    restore_set,
)

log = get_logger(__name__)

Kind = Literal["canary", "shadow", "experiment"]
Outcome = Literal["promoted", "rolled_back", "aborted"]
Phase = Literal["running", "paused", "passed", "promoted", "rolled_back", "aborted"]
Modules = str | Iterable[str] | Mapping[str, SourceInput]

MAX_MISMATCHES_KEPT = 100
MAX_METRIC_VALUES = 100_000
_POLL_S = 0.02

_ACTIVE: dict[str, Trial] = {}
_ACTIVE_LOCK = threading.Lock()

_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80
_repr.maxlong = 40


def _safe_repr(value: object) -> str:
    try:
        text = _repr.repr(value)
    except Exception as exc:  # a broken __repr__ is the application's; never ours to raise
        text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    return text if len(text) <= 200 else text[:197] + "..."


# -- what a trial reports -------------------------------------------------------------------------


MIN_LATENCY_RISE_S = 0.0001
"""A step fails on latency only if the new version's median is also 100 us above the old one's:
identical code differed by 25% (9 us against 11 us, p = 0.004) on a shared 2-core machine."""


@dataclass(frozen=True)
class ArmStatus:
    """What one arm served: calls, errors (exceptions raised) and latency quantiles."""

    calls: int
    errors: int
    p50_s: float | None
    p99_s: float | None

    @classmethod
    def of(cls, summary: ArmSummary) -> ArmStatus:
        return cls(
            summary.calls,
            summary.errors,
            summary.latency_quantile(0.5),
            summary.latency_quantile(0.99),
        )


@dataclass(frozen=True)
class Mismatch:
    """A shadowed call whose two versions disagreed (reprs truncated)."""

    function: str
    arguments: str
    old: str
    new: str


@dataclass(frozen=True)
class TrialStatus:
    """A trial at one moment.

    Attributes:
        id: the run id (also the salt of its routing buckets).
        kind: ``canary``, ``shadow`` or ``experiment``.
        modules: the modules under trial.
        phase: ``running``, ``paused``, ``passed`` (judged good, waiting for ``promote``), or the
            outcome once ended.
        step: index of the current step in ``steps`` (canary), else 0.
        share: the new arm's share of calls, in percent.
        step_arms: per arm (``old``, ``new``), this step's figures.
        total_arms: per arm, the whole run's calls and errors (latencies: this step's).
        reason: why it ended (empty while running).
        detail: the figures behind the last decision.
        compared, mismatches, dropped: shadow only: calls compared, disagreements, sampled calls
            dropped because the shadow queue was full.
    """

    id: str
    kind: Kind
    modules: tuple[str, ...]
    phase: Phase
    step: int
    share: float
    step_arms: dict[str, ArmStatus]
    total_arms: dict[str, ArmStatus]
    reason: str
    detail: str
    compared: int = 0
    mismatches: int = 0
    dropped: int = 0
    routing_errors: int = 0


@dataclass(frozen=True)
class TrialResult:
    """How a trial ended.

    Attributes:
        outcome: ``promoted`` (committed in place), ``rolled_back`` (judged bad, or its commit
            failed) or ``aborted`` (``Trial.abort``).
        reason: ``complete`` or ``manual`` for a promote; for a rollback ``error_rate``,
            ``latency``, ``health_check``, ``shadow_mismatch``, ``progress_deadline``,
            ``manual`` (abort), ``commit_refused`` (the final commit was refused) or
            ``internal_error``.
        new_calls, new_errors: calls (and exceptions among them) the new version served.
        old_calls, old_errors: the same for the old version.
        results: the commit's ``PatchResult`` per module (promoted only).
        mismatches: shadow only: the first disagreements recorded.
    """

    id: str
    kind: Kind
    modules: tuple[str, ...]
    outcome: Outcome
    reason: str
    detail: str
    new_calls: int
    new_errors: int
    old_calls: int
    old_errors: int
    results: tuple[PatchResult, ...] = ()
    mismatches: tuple[Mismatch, ...] = ()


@dataclass(frozen=True)
class MetricReport:
    """A recorded metric per arm, and Welch's comparison (new - old) when both arms have 2+."""

    name: str
    old_count: int
    new_count: int
    old_mean: float | None
    new_mean: float | None
    difference: float | None
    low: float | None
    high: float | None
    p_value: float | None
    significant: bool


@dataclass(frozen=True)
class ExperimentReport:
    """``Trial.report()``: per-arm calls, errors, latency, and each recorded metric."""

    arms: dict[str, ArmStatus]
    metrics: dict[str, MetricReport]
    unattributed: int
    confidence: float


# -- routing --------------------------------------------------------------------------------------


def _decode_key(encoded: bytes) -> RoutingKey:
    tag, data = encoded[:1], encoded[1:]
    if tag == b"s":
        return data.decode("utf-8", "surrogatepass")
    if tag == b"i":
        return int(data)
    return data


@dataclass
class _Metrics:
    lock: threading.Lock = field(default_factory=threading.Lock)
    values: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    seen: dict[str, list[int]] = field(default_factory=dict)
    random: random.Random = field(default_factory=lambda: random.Random(0))

    def add(self, name: str, arm: bool, value: float) -> None:
        with self.lock:
            kept = self.values.setdefault(name, ([], []))[arm]
            seen = self.seen.setdefault(name, [0, 0])
            seen[arm] += 1
            if len(kept) < MAX_METRIC_VALUES:
                kept.append(value)
            else:  # a uniform sample of every value recorded
                slot = self.random.randrange(seen[arm])
                if slot < MAX_METRIC_VALUES:
                    kept[slot] = value


# -- the trial ------------------------------------------------------------------------------------


class Trial:
    """The handle of one parallel run (made by ``canary``, ``shadow`` or ``experiment``)."""

    def __init__(
        self,
        *,
        kind: Kind,
        engine: Engine,
        modules: Modules,
        allow_removals: bool,
        key: Callable[[], RoutingKey | None] | None,
        route: Callable[[RoutingKey | None], bool | None] | None,
        flag: str | None,
        step_s: float,
        min_calls: int,
        max_p99_s: float | None = None,
        progress_deadline_s: float | None = None,
        steps: Sequence[float] = (),
        split: float = 50.0,
        functions: Iterable[str] | None = None,
        sample: float = 0.01,
        compare: Callable[[Any, Any], bool] | None = None,
        max_mismatch_rate: float = 0.001,
        promote: bool = True,
        shadow_queue: int = 1000,
        shadow_timeout_s: float = 1.0,
    ) -> None:
        self.id = f"{kind}-{uuid.uuid4().hex[:12]}"
        self.kind: Kind = kind
        self._engine = engine
        self._step_s = step_s
        self._min_calls = min_calls
        self._max_p99_s = max_p99_s
        self._progress_deadline_s = progress_deadline_s or 10 * step_s
        self._steps = tuple(steps)
        self._split = split
        self._sample = sample
        self._compare = compare
        self._max_mismatch_rate = max_mismatch_rate
        self._auto_promote = promote
        self._shadow_timeout_s = shadow_timeout_s
        self._queue_size = shadow_queue
        self._key_fn = key
        self._route = route
        self._flag_client: Any = None
        self._flag = flag
        if flag is not None:
            self._flag_client = _openfeature_client()
        self._phase: Phase = "running"
        self._step = 0
        self._reason = ""
        self._detail = ""
        self._result: TrialResult | None = None
        self._done = threading.Event()
        self._wake = threading.Event()
        self._end_lock = threading.RLock()
        self._paused = False
        self._resumed = False
        # Every step's figures, kept (a few per run): a call that began in a step and ends after
        # it still counts there, so the run's totals are summed over all of them at read time.
        self._all_steps: list[StepStats] = []
        self._routing_errors = itertools.count()  # next() is atomic: no lost count
        self._compared = 0
        self._mismatch_count = 0
        self._dropped = 0
        self._mismatches: list[Mismatch] = []
        self._shadow_lock = threading.Lock()
        self._metrics = _Metrics()
        self._unattributed = itertools.count()

        changes = _as_changes(modules)
        self.modules = tuple(changes)
        holder = f"{kind} {self.id}"
        # Held first: nothing may patch these modules between the guard and the end of the run.
        engine.hold(
            self.modules,
            holder=holder,
            controls={
                "status": self.describe,
                "promote": lambda: _describe_result(self.promote()),
                "abort": lambda: _describe_result(self.abort()),
            },
        )
        try:
            self._start(changes, holder, allow_removals=allow_removals, functions=functions)
        except BaseException:
            engine.release(self.modules, holder=holder)
            raise
        with _ACTIVE_LOCK:
            _ACTIVE[self.id] = self
        self._log = log.bind(trial_id=self.id, kind=kind, modules=list(self.modules))
        self._log.info(
            "trial.started",
            functions=[t.path for t in self._targets],
            versions={m.name: m.version for m in self._change.modules},
            share=self._dispatcher.share * 100,
        )
        self._controller = threading.Thread(
            target=self._control, name=f"hotpatch-{self.id}", daemon=True
        )
        self._worker: threading.Thread | None = None
        try:
            if kind == "shadow":
                self._worker = threading.Thread(
                    target=self._shadow_worker, name=f"hotpatch-{self.id}-shadow", daemon=True
                )
                self._worker.start()
            self._controller.start()
        except BaseException as exc:  # no controller: the dispatch must not stay on
            self._roll_back("rolled_back", "internal_error", f"{type(exc).__name__}: {exc}")
            raise

    def _start(
        self,
        changes: dict[str, SourceInput],
        holder: str,
        *,
        allow_removals: bool,
        functions: Iterable[str] | None,
    ) -> None:
        """Guard, plan and install the dispatch (the modules are held); raises on refusal."""
        engine = self._engine
        kind = self.kind
        self._change = engine.prepare(changes, allow_removals=allow_removals, holder=holder)
        extra = [m.name for m in self._change.modules if m.name not in changes]
        if extra:
            raise PatchRejected(
                self.modules[0],
                "compatibility",
                f"the change re-derives values in {', '.join(extra)}, which a parallel run "
                "cannot show to one version only; use hotpatch.patch",
            )
        if not self._change.modules:
            verb = "is" if len(self.modules) == 1 else "are"
            raise HotpatchError(
                f"nothing to try: {', '.join(self.modules)} {verb} the live version already"
            )
        self._targets = self._plan_targets()
        d = self._dispatcher = Dispatcher(self.id, self._targets)
        d.choose = self._choose if self._needs_choose() else d.choose
        self._shadowed = self._pick_shadowed(functions)
        self._queue: queue.SimpleQueue[
            tuple[int, tuple[Any, ...], dict[str, Any], bool, Any] | None
        ]
        self._queue = queue.SimpleQueue()  # put and qsize are single C calls: no lock to wait on
        # The mode is compiled into the trampolines: set it (and the first share) first.
        if kind == "shadow":
            d.mode = 2
            d.sample = self._sample
            d.shadow = self._shadow_call
        elif self._needs_choose():
            d.mode = 1
        share = self._steps[0] if kind == "canary" else self._split if kind == "experiment" else 0
        d.stats = StepStats(share / 100, d.sample)
        for key_index, target in enumerate(self._targets):
            target.trampoline = build_trampoline(
                target.func,
                d,
                key_index,
                exact=target.same_defaults,
                shadowed=key_index in self._shadowed,
            )
        self._trampolines = frozenset(t.trampoline for t in self._targets if t.trampoline)
        self._new_codes = frozenset(t.new_code for t in self._targets)
        try:
            commit_at_safe_point(
                [install_set(self._targets)],
                codes=frozenset(t.original.code for t in self._targets),
                timeout_s=engine.safepoint_timeout_s,
            )
        except SafePointTimeout as exc:
            raise PatchRejected(
                self.modules[0],
                "safepoint",
                str(exc),
                filename=exc.busy.filename,
                lineno=exc.busy.lineno,
            ) from None

    # -- planning --------------------------------------------------------------------------------
    def _plan_targets(self) -> list[Target]:
        targets: list[Target] = []
        for m in self._change.modules:
            live = m.module.__dict__
            overlay = new_globals(live, m.changeset)
            for a in m.changeset.assignments:
                if isinstance(a, SetName) and a.namespace is live:
                    current = live.get(a.name)
                    if isinstance(current, types.FunctionType) and isinstance(
                        a.value, types.FunctionType
                    ):  # replaced, not updated in place: references keep the live one
                        why = (
                            refusal_of(current, a.value.__code__) or "it cannot be updated in place"
                        )
                        raise PatchRejected(
                            m.name,
                            "compatibility",
                            f"{m.name}.{a.name} cannot run beside its live version: {why}; "
                            "hotpatch.patch can still apply this change",
                            filename=a.value.__code__.co_filename,
                            lineno=a.value.__code__.co_firstlineno,
                        )
                    continue  # shown to the new version through its globals
                if isinstance(a, SetFunction):
                    func, state = a.func, a.state
                    if (
                        func.__code__ is state.code
                        and func.__defaults__ == state.defaults
                        and func.__kwdefaults__ == state.kwdefaults
                    ):
                        continue
                    path = f"{m.name}.{func.__qualname__}"
                    refusal = refusal_of(func, state.code)
                    if refusal is not None:
                        raise PatchRejected(
                            m.name,
                            "compatibility",
                            f"{path} cannot run beside its live version: {refusal}; "
                            "hotpatch.patch can still apply this change",
                            filename=func.__code__.co_filename,
                            lineno=state.code.co_firstlineno,
                        )
                    overlay_for = func.__globals__ if func.__globals__ is not live else overlay
                    targets.append(Target(func, state, overlay_for, path=path))
                    continue
                what = (
                    f"{a.cls.__qualname__}.{a.name}"
                    if isinstance(a, SetAttr)
                    else f"a name ({a.name}) outside the module"
                )
                raise PatchRejected(
                    m.name,
                    "compatibility",
                    f"the change sets {what}: a class or another module is shared by both "
                    "versions, so a parallel run cannot show it to the new one only; "
                    "use hotpatch.patch",
                )
        if not targets:
            raise HotpatchError(
                f"nothing to try: the change to {', '.join(self.modules)} updates no function "
                "(use hotpatch.patch)"
            )
        return targets

    def _pick_shadowed(self, functions: Iterable[str] | None) -> frozenset[int]:
        if functions is None:
            return frozenset(range(len(self._targets)))
        wanted = set(functions)
        picked = set()
        for index, t in enumerate(self._targets):
            short = t.path.partition(".")[2] if "." in t.path else t.path
            qual = t.func.__qualname__
            if wanted & {t.path, short, qual}:
                picked.add(index)
        known = {t.path for t in self._targets} | {t.func.__qualname__ for t in self._targets}
        unknown = {w for w in wanted if not any(w in (k, k.rsplit(".", 1)[-1]) for k in known)}
        unknown -= {t.path.rsplit(".", 1)[-1] for t in self._targets}
        if unknown or not picked:
            raise ConfigError(
                f"shadow(functions): {sorted(unknown or wanted)} not among the changed functions "
                f"({', '.join(t.path for t in self._targets)})"
            )
        return frozenset(picked)

    def _needs_choose(self) -> bool:
        return self._key_fn is not None or self._route is not None or self._flag is not None

    # -- the per-call paths that are not inline in the trampoline --------------------------------
    def _choose(self) -> bool:
        d = self._dispatcher
        try:
            if self._key_fn is not None:
                key: RoutingKey | None = self._key_fn()
            else:
                current = d.keyvar.get()
                key = None if current is None else _decode_key(current.encoded)
            if self._route is not None:
                forced = self._route(key)
                if forced is not None:
                    return bool(forced)
            if self._flag_client is not None:
                return bool(self._flag_client.get_boolean_value(self._flag, False, _context(key)))
            point = d.random() if key is None else bucket(self.id, key)
            return point < d.share
        except Exception:
            next(self._routing_errors)  # counted, not raised: the caller gets the old version
            return OLD

    def _shadow_call(
        self, k: int, cell: list[bool | None], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A sampled call of shadowed function ``k`` (``cell``: this thread's affinity): the old
        version for the caller, then its arguments and outcome offered to the worker. Counted
        already (the routing table's byte); timed here."""
        d = self._dispatcher
        stats = d.stats
        clock = d.clock
        cell[0] = OLD
        started = clock()
        try:
            result = d.fns[k][OLD](*args, **kwargs)
        except BaseException as exc:
            stats.fail(OLD)
            self._offer(k, args, kwargs, False, exc)
            raise
        finally:
            stats.lat[OLD].append(clock() - started)
            cell[0] = None
        self._offer(k, args, kwargs, True, result)
        return result

    def _offer(
        self, k: int, args: tuple[Any, ...], kwargs: dict[str, Any], ok: bool, outcome: Any
    ) -> None:
        q = self._queue
        # qsize and put are single C calls and never wait; threads racing here may overshoot
        # the bound by one each.
        if q.qsize() < self._queue_size:
            if self._result is None:
                q.put((k, args, kwargs, ok, outcome))
        else:
            with self._shadow_lock:
                self._dropped += 1

    def _shadow_worker(self) -> None:
        d = self._dispatcher
        d.var.set(NEW)  # this thread's own context: every call below runs the new version
        d.cell()[0] = NEW
        while True:
            item = self._queue.get()
            if item is None or self._done.is_set():
                return  # ended: what is still queued is never run (nor compared)
            k, args, kwargs, old_ok, old = item
            stats = d.stats
            started = d.clock()
            new_ok = True
            try:
                new: Any = d.fns[k][NEW](*args, **kwargs)
            except BaseException as exc:  # even SystemExit: an outcome to compare, not our end
                new_ok, new = False, exc
                stats.fail(NEW)
            elapsed = d.clock() - started
            stats.lat[NEW].append(elapsed)
            next(stats.calls[NEW])
            same, note = self._same(old_ok, old, new_ok, new)
            if elapsed > self._shadow_timeout_s:
                same, note = False, f" (took {elapsed:.3g}s, over the {self._shadow_timeout_s}s)"
            with self._shadow_lock:
                self._compared += 1
                if not same:
                    self._mismatch_count += 1
                    if len(self._mismatches) < MAX_MISMATCHES_KEPT:
                        self._mismatches.append(
                            Mismatch(
                                self._targets[k].path,
                                _safe_repr((args, kwargs)),
                                _outcome_repr(old_ok, old),
                                _outcome_repr(new_ok, new) + note,
                            )
                        )
                decisive = not same or self._compared == self._min_calls
            if decisive:  # wake the controller only when its decision may change
                self._wake.set()

    def _same(self, old_ok: bool, old: Any, new_ok: bool, new: Any) -> tuple[bool, str]:
        if old_ok != new_ok:
            return False, ""
        if not old_ok:
            return type(old) is type(new) and str(old) == str(new), ""
        try:
            return bool(self._compare(old, new) if self._compare else old == new), ""
        except Exception as exc:
            return False, f" (compare raised {type(exc).__name__}: {exc})"

    # -- the controller --------------------------------------------------------------------------
    def _control(self) -> None:
        try:
            if self.kind == "canary":
                self._run_canary()
            elif self.kind == "shadow":
                self._run_shadow()
            else:
                self._run_experiment()
        except BaseException as exc:  # never leave the dispatch on after a defect
            self._log.error("trial.failed", error=f"{type(exc).__name__}: {exc}")
            self._roll_back("rolled_back", "internal_error", f"{type(exc).__name__}: {exc}")

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(max(0.0, min(seconds, _POLL_S * 5)))
        self._wake.clear()

    def _next_step(self, index: int, share: float) -> StepStats:
        d = self._dispatcher
        fresh = StepStats(share, d.sample)
        self._all_steps.append(d.stats)
        d.stats = fresh
        self._step = index
        return fresh

    def _totals(self) -> list[tuple[int, int]]:
        """(calls, errors) of each arm over the whole run."""
        steps = [*self._all_steps, self._dispatcher.stats]
        out = []
        for arm in (OLD, NEW):
            summaries = [s.counts(arm) for s in steps]
            out.append((sum(c for c, _ in summaries), sum(e for _, e in summaries)))
        return out

    def _health(self) -> str | None:
        for name in self.modules:
            failure = self._engine.check_health(name)
            if failure is not None:
                return failure.reason
        return None

    def _wait_unpaused(self) -> bool:
        """Block while paused; True when the step must start over (resumed)."""
        restarted = False
        while self._paused and not self._done.is_set():
            self._sleep(_POLL_S)
            restarted = True
        return restarted

    def _run_canary(self) -> None:
        index = 0
        while index < len(self._steps) and not self._done.is_set():
            percent = self._steps[index]
            if percent >= 100:
                self.promote(_reason="complete")
                return
            # The first step's figures began with the dispatch (see _start).
            stats = self._dispatcher.stats if index == 0 else self._next_step(index, percent / 100)
            started = time.monotonic()
            judge_at = started + self._step_s
            held = False
            while not self._done.is_set():
                if self._wait_unpaused():
                    stats = self._next_step(index, percent / 100)
                    started = time.monotonic()
                    judge_at = started + self._step_s
                now = time.monotonic()
                if now < judge_at:
                    self._sleep(judge_at - now)
                    continue
                failure = self._health()
                if failure is not None:
                    self._roll_back("rolled_back", "health_check", failure)
                    return
                verdict = judge(
                    stats.summary(OLD),
                    stats.summary(NEW),
                    min_calls=self._min_calls,
                    max_p99_s=self._max_p99_s,
                    min_median_rise_s=MIN_LATENCY_RISE_S,
                )
                self._detail = verdict.detail
                if verdict.decision == "fail":
                    reason = "error_rate" if verdict.reason == "success_rate" else verdict.reason
                    reason = "latency" if reason == "latency_p99" else reason
                    self._roll_back("rolled_back", reason, verdict.detail)
                    return
                if verdict.decision == "pass":
                    self._log.info(
                        "trial.step_passed", step=index, share=percent, **verdict.figures()
                    )
                    break
                if now - started >= self._progress_deadline_s:
                    self._roll_back(
                        "rolled_back",
                        "progress_deadline",
                        f"still inconclusive after {now - started:.3g}s: {verdict.detail}",
                    )
                    return
                if not held:
                    self._log.info("trial.held", step=index, share=percent, detail=verdict.detail)
                    held = True
                judge_at = now + self._step_s
            index += 1
        if not self._done.is_set():  # the steps end below 100: hold the last share until told
            self._phase = "passed"

    def _run_shadow(self) -> None:
        health_at = time.monotonic() + self._step_s
        allowed = math.floor(self._max_mismatch_rate * self._min_calls)
        while not self._done.is_set():
            self._sleep(self._step_s)
            if self._done.is_set():
                return
            if time.monotonic() >= health_at:
                failure = self._health()
                if failure is not None:
                    self._roll_back("rolled_back", "health_check", failure)
                    return
                health_at = time.monotonic() + self._step_s
            with self._shadow_lock:
                compared, mismatches = self._compared, self._mismatch_count
            self._detail = f"{mismatches} mismatches in {compared} compared calls"
            if mismatches > allowed and (
                compared < self._min_calls or mismatches / compared > self._max_mismatch_rate
            ):
                self._roll_back(
                    "rolled_back",
                    "shadow_mismatch",
                    f"{self._detail}, over the {self._max_mismatch_rate:.3%} allowed",
                )
                return
            if compared >= self._min_calls and self._phase == "running":
                self._log.info("trial.step_passed", compared=compared, mismatches=mismatches)
                if self._auto_promote:
                    self.promote(_reason="complete")
                    return
                self._phase = "passed"

    def _run_experiment(self) -> None:
        while not self._done.is_set():
            self._sleep(self._step_s)
            if self._done.is_set() or self._paused:
                continue
            failure = self._health()
            if failure is not None:
                self._roll_back("rolled_back", "health_check", failure)
                return

    # -- the end ---------------------------------------------------------------------------------
    def _restore_dispatch(self) -> None:
        commit_at_safe_point(
            [restore_set(self._targets)],
            codes=self._trampolines | self._new_codes,
            timeout_s=self._engine.safepoint_timeout_s,
            force_at_deadline=True,
        )

    def _roll_back(self, outcome: Outcome, reason: str, detail: str) -> TrialResult:
        with self._end_lock:
            if self._result is not None:
                return self._result
            self._restore_dispatch()
            for m in self._change.modules:
                self._engine.record_discarded(
                    m.name, m.sha256, stage=self.kind, reason=f"{self.kind} {reason}: {detail}"
                )
            return self._end(outcome, reason, detail, announce=self._rolled_back_event)

    def _rolled_back_event(self, result: TrialResult) -> None:
        self._log.warning(
            "trial.rolled_back",
            reason=result.reason,
            detail=result.detail,
            new_calls=result.new_calls,
            new_errors=result.new_errors,
        )

    def _end(
        self,
        outcome: Outcome,
        reason: str,
        detail: str,
        results: Sequence[PatchResult] = (),
        *,
        announce: Callable[[TrialResult], None],
    ) -> TrialResult:
        """Record the outcome, log it (``announce``), then let ``wait`` return: whoever sees the
        result can also see its event."""
        self._phase = outcome
        self._reason = reason
        self._detail = detail
        totals = self._totals()
        with self._shadow_lock:
            mismatches = tuple(self._mismatches)
        self._result = TrialResult(
            self.id,
            self.kind,
            self.modules,
            outcome,
            reason,
            detail,
            new_calls=totals[NEW][0],
            new_errors=totals[NEW][1],
            old_calls=totals[OLD][0],
            old_errors=totals[OLD][1],
            results=tuple(results),
            mismatches=mismatches,
        )
        self._engine.release(self.modules, holder=f"{self.kind} {self.id}")
        with _ACTIVE_LOCK:
            _ACTIVE.pop(self.id, None)
        if self._worker is not None:
            self._queue.put(None)  # the worker ends at once: what is queued is not compared
        announce(self._result)
        self._done.set()
        self._wake.set()
        return self._result

    # -- the public handle -----------------------------------------------------------------------
    def status(self) -> TrialStatus:
        """The phase, step, share, per-arm figures and (once ended) the reason."""
        stats = self._dispatcher.stats
        step_arms = {"old": stats.summary(OLD), "new": stats.summary(NEW)}
        totals = self._totals()
        total = {
            name: ArmStatus(
                totals[arm][0],
                totals[arm][1],
                step_arms[name].latency_quantile(0.5),
                step_arms[name].latency_quantile(0.99),
            )
            for name, arm in (("old", OLD), ("new", NEW))
        }
        if self._result is not None:
            r = self._result
            total = {
                "old": ArmStatus(r.old_calls, r.old_errors, None, None),
                "new": ArmStatus(r.new_calls, r.new_errors, None, None),
            }
        with self._shadow_lock:
            compared, mismatches, dropped = self._compared, self._mismatch_count, self._dropped
        share = self._dispatcher.share * 100
        if self._result is not None:
            share = 100.0 if self._result.outcome == "promoted" else 0.0
        return TrialStatus(
            self.id,
            self.kind,
            self.modules,
            "paused" if self._paused and self._result is None else self._phase,
            self._step,
            share,
            {name: ArmStatus.of(s) for name, s in step_arms.items()},
            total,
            self._reason,
            self._detail,
            compared,
            mismatches,
            dropped,
            count_value(self._routing_errors),
        )

    def describe(self) -> dict[str, object]:
        """``status()`` as JSON-ready values (the control channel's answer)."""
        status = self.status()
        out: dict[str, object] = {
            "id": status.id,
            "kind": status.kind,
            "modules": list(status.modules),
            "phase": status.phase,
            "step": status.step,
            "share": status.share,
            "reason": status.reason,
            "detail": status.detail,
        }
        for name, arm in status.total_arms.items():
            out[name] = {
                "calls": arm.calls,
                "errors": arm.errors,
                "p50_s": arm.p50_s,
                "p99_s": arm.p99_s,
            }
        if status.kind == "shadow":
            out.update(
                compared=status.compared, mismatches=status.mismatches, dropped=status.dropped
            )
        return out

    def wait(self, timeout: float | None = None) -> TrialResult:
        """Block until the trial ends.

        Raises:
            TimeoutError: still running at ``timeout`` seconds (the outcome is unknown).
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"trial {self.id} is still running after {timeout}s")
        assert self._result is not None
        return self._result

    def promote(self, *, _reason: str = "manual") -> TrialResult:
        """Commit the candidate in place now, as ``patch`` would (any phase, any step).

        Returns:
            The result: ``promoted``, or ``rolled_back`` with reason ``health_check`` or
            ``commit_refused`` when the commit was refused (the old code is live then).
        """
        with self._end_lock:
            if self._result is not None:
                return self._result
            try:
                results = self._engine.commit_prepared(
                    self._change,
                    restore=restore_set(self._targets),
                    originals={id(t.func): t.original for t in self._targets},
                    codes=self._trampolines | self._new_codes,
                )
            except PatchRejected as exc:
                if any(t.func.__code__ is t.trampoline for t in self._targets):
                    self._restore_dispatch()  # refused before the commit: take the dispatch off
                reason = "health_check" if exc.stage == "health" else "commit_refused"
                return self._end("rolled_back", reason, str(exc), announce=self._rolled_back_event)

            def promoted(result: TrialResult) -> None:
                self._log.info(
                    "trial.promoted",
                    reason=result.reason,
                    versions=[r.version for r in result.results],
                    new_calls=result.new_calls,
                    new_errors=result.new_errors,
                )

            return self._end("promoted", _reason, self._detail, results, announce=promoted)

    def abort(self) -> TrialResult:
        """Roll back to the old version now; the outcome is ``aborted``, reason ``manual``."""
        return self._roll_back("aborted", "manual", "aborted by request")

    def pause(self) -> None:
        """Hold the current share: no judgement and no ramp until ``resume``."""
        self._paused = True

    def resume(self) -> None:
        """Continue; the current step starts over with fresh figures."""
        self._paused = False
        self._wake.set()

    def report(self, *, confidence: float = 0.95) -> ExperimentReport:
        """Per-arm calls, errors and latency, and for each ``record``-ed metric the means and
        Welch's interval and p-value of (new - old)."""
        status = self.status()
        metrics: dict[str, MetricReport] = {}
        with self._metrics.lock:
            snapshot = {k: (list(v[0]), list(v[1])) for k, v in self._metrics.values.items()}
            seen = {k: tuple(v) for k, v in self._metrics.seen.items()}
        for name, (old, new) in sorted(snapshot.items()):
            old_mean = math.fsum(old) / len(old) if old else None
            new_mean = math.fsum(new) / len(new) if new else None
            if len(old) >= 2 and len(new) >= 2:
                c = compare_means(old, new, confidence=confidence)
                metrics[name] = MetricReport(
                    name,
                    seen[name][0],
                    seen[name][1],
                    c.mean_a,
                    c.mean_b,
                    c.difference,
                    c.low,
                    c.high,
                    c.p_value,
                    c.significant,
                )
            else:
                metrics[name] = MetricReport(
                    name,
                    seen[name][0],
                    seen[name][1],
                    old_mean,
                    new_mean,
                    None,
                    None,
                    None,
                    None,
                    False,
                )
        return ExperimentReport(
            status.total_arms, metrics, count_value(self._unattributed), confidence
        )

    def _record(self, name: str, value: float) -> bool:
        d = self._dispatcher
        arm = d.arm()
        if arm is None and d.mode == 0:
            current = d.keyvar.get()
            if current is not None:
                arm = current.bucket(self.id) < d.share
        if arm is None:
            next(self._unattributed)
            return False
        self._metrics.add(name, arm, value)
        return True


def _describe_result(result: TrialResult) -> dict[str, object]:
    return {
        "id": result.id,
        "kind": result.kind,
        "modules": list(result.modules),
        "outcome": result.outcome,
        "reason": result.reason,
        "detail": result.detail,
        "new_calls": result.new_calls,
        "new_errors": result.new_errors,
        "old_calls": result.old_calls,
        "old_errors": result.old_errors,
        "versions": [r.version for r in result.results],
    }


def _outcome_repr(ok: bool, value: Any) -> str:
    if ok:
        return _safe_repr(value)
    return f"raised {type(value).__name__}: {_safe_repr(str(value))}"


def _as_changes(modules: Modules) -> dict[str, SourceInput]:
    if isinstance(modules, str):
        return {modules: None}
    if isinstance(modules, Mapping):
        out = dict(modules)
    elif isinstance(modules, bytes) or not isinstance(modules, Iterable):
        raise TypeError(f"modules must be a name, names or a mapping, not {type(modules).__name__}")
    else:
        out = dict.fromkeys(modules)
    if not out:
        raise ConfigError("a parallel run needs at least one module")
    for name in out:
        if not isinstance(name, str):
            raise TypeError(f"a module name is a str, not {type(name).__name__}")
    return out


def _openfeature_client() -> Any:
    try:
        from openfeature import api
    except ImportError:
        raise ConfigError(
            "flag= needs the OpenFeature SDK: pip install 'hotpatch[flags]' (openfeature-sdk)"
        ) from None
    return api.get_client()


def _context(key: RoutingKey | None) -> Any:
    from openfeature.evaluation_context import EvaluationContext

    if key is None:
        return EvaluationContext()
    text = key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else str(key)
    return EvaluationContext(targeting_key=text)


# -- validation and the public functions ----------------------------------------------------------


def _seconds(name: str, value: float, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")


def _count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, not {value!r}")


def _percent(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= 100
    ):
        raise ConfigError(f"{name} must be a percentage in (0, 100], not {value!r}")


def _check_routing(key: object, route: object, flag: object) -> None:
    if key is not None and not callable(key):
        raise ConfigError(f"key must be a callable returning the routing key, not {key!r}")
    if route is not None and not callable(route):
        raise ConfigError(f"route must be a callable predicate(key), not {route!r}")
    if flag is not None and (not isinstance(flag, str) or not flag):
        raise ConfigError(f"flag must be a non-empty flag name, not {flag!r}")


def canary(
    modules: Modules,
    *,
    steps: Sequence[float] = (1, 5, 25, 50, 100),
    step_s: float = 30.0,
    min_calls: int = 100,
    key: Callable[[], RoutingKey | None] | None = None,
    route: Callable[[RoutingKey | None], bool | None] | None = None,
    flag: str | None = None,
    max_p99_s: float | None = None,
    progress_deadline_s: float | None = None,
    allow_removals: bool = False,
    engine: Engine | None = None,
) -> Trial:
    """Run a new version of ``modules`` beside the live one on a growing share of calls.

    The candidate is guarded as ``patch`` guards it, then each call of a changed function goes
    to the old or the new version (sticky per routing key; a call chain keeps its version); the
    new share ramps through ``steps`` (percent), each step judged after ``step_s`` on its own
    calls. The last step, 100, commits the candidate in place. A failed judgement or health
    check rolls back at once.

    Args:
        modules: a module name, names, or a mapping name -> new source (``None``: its file).
        steps: increasing shares in percent, ending with 100.
        step_s: how long each step runs before it is judged.
        min_calls: calls each arm needs in a step before it is judged (else it is held).
        key: returns the current call's routing key (default: ``hotpatch.routing_key``).
        route: ``predicate(key)``: True forces the new version, False the old, None: bucket.
        flag: an OpenFeature boolean flag that decides per call (targeting key = routing key).
        max_p99_s: fail a step whose new-version p99 latency exceeds this.
        progress_deadline_s: roll back when a step stays inconclusive this long (10 x step_s).
        allow_removals: as for ``patch``.
        engine: the engine (default: ``hotpatch.default_engine()``).

    Returns:
        The running ``Trial``.

    Raises:
        PatchRejected: the candidate failed the guard, or a changed function cannot run beside
            its live version (its kind or free variables changed; ``patch`` can still apply it).
        ConfigError: a bad option.
    """
    if isinstance(steps, str | bytes) or not isinstance(steps, Sequence) or not steps:
        raise ConfigError(f"steps must be a non-empty sequence of percentages, not {steps!r}")
    for s in steps:
        _percent("steps", s)
    if list(steps) != sorted(set(steps)):
        raise ConfigError(f"steps must increase strictly, not {list(steps)!r}")
    _seconds("step_s", step_s)
    _seconds("progress_deadline_s", progress_deadline_s, allow_none=True)  # type: ignore[arg-type]
    _seconds("max_p99_s", max_p99_s, allow_none=True)  # type: ignore[arg-type]
    _count("min_calls", min_calls)
    _check_routing(key, route, flag)
    return Trial(
        kind="canary",
        engine=engine or default_engine(),
        modules=modules,
        allow_removals=allow_removals,
        key=key,
        route=route,
        flag=flag,
        step_s=step_s,
        min_calls=min_calls,
        max_p99_s=max_p99_s,
        progress_deadline_s=progress_deadline_s,
        steps=steps,
    )


def shadow(
    modules: Modules,
    *,
    functions: Iterable[str] | None = None,
    sample: float = 0.01,
    compare: Callable[[Any, Any], bool] | None = None,
    min_calls: int = 1000,
    max_mismatch_rate: float = 0.001,
    promote: bool = True,
    queue_size: int = 1000,
    shadow_timeout_s: float = 1.0,
    check_s: float = 1.0,
    allow_removals: bool = False,
    engine: Engine | None = None,
) -> Trial:
    """Run a new version in the shadow of the live one: callers always get the old outcome.

    For a sampled share of calls of the shadowed functions, the new version runs too, on a worker
    thread (the caller never waits for it; when the bounded queue is full the sample is dropped
    and counted), and its outcome is compared with the old one's (``compare(old, new)``, default
    ``==``; exceptions by type and message). Mismatches are kept with the arguments' and both
    outcomes' reprs, truncated. Shadowed code must not have side effects: it runs twice.

    Args:
        modules: a module name, names, or a mapping name -> new source.
        functions: names (``"f"``, ``"Class.method"`` or ``"module.f"``) of the functions to
            shadow; default: every function the change updates.
        sample: the share of calls (0..1] that are also run on the new version.
        compare: ``compare(old_result, new_result) -> bool``.
        min_calls: compared calls before the decision.
        max_mismatch_rate: the largest tolerated share of mismatches.
        promote: commit after ``min_calls`` within the rate (False: wait for ``promote()``).
        queue_size: sampled calls waiting for the worker, at most.
        shadow_timeout_s: a new-version call slower than this is a mismatch.
        check_s: how often the decision and the health checks run.
        allow_removals: as for ``patch``.
        engine: the engine (default: ``hotpatch.default_engine()``).
    """
    if isinstance(sample, bool) or not isinstance(sample, int | float) or not (0 < sample <= 1):
        raise ConfigError(f"sample must be a fraction in (0, 1], not {sample!r}")
    if (
        isinstance(max_mismatch_rate, bool)
        or not isinstance(max_mismatch_rate, int | float)
        or not (0 <= max_mismatch_rate < 1)
    ):
        raise ConfigError(f"max_mismatch_rate must be in [0, 1), not {max_mismatch_rate!r}")
    if compare is not None and not callable(compare):
        raise ConfigError(f"compare must be callable(old, new), not {compare!r}")
    if isinstance(functions, str):
        functions = [functions]
    _count("min_calls", min_calls)
    _count("queue_size", queue_size)
    _seconds("shadow_timeout_s", shadow_timeout_s)
    _seconds("check_s", check_s)
    return Trial(
        kind="shadow",
        engine=engine or default_engine(),
        modules=modules,
        allow_removals=allow_removals,
        key=None,
        route=None,
        flag=None,
        step_s=check_s,
        min_calls=min_calls,
        functions=functions,
        sample=sample,
        compare=compare,
        max_mismatch_rate=max_mismatch_rate,
        promote=promote,
        shadow_queue=queue_size,
        shadow_timeout_s=shadow_timeout_s,
    )


def experiment(
    modules: Modules,
    *,
    split: float = 50,
    key: Callable[[], RoutingKey | None] | None = None,
    route: Callable[[RoutingKey | None], bool | None] | None = None,
    flag: str | None = None,
    check_s: float = 30.0,
    allow_removals: bool = False,
    engine: Engine | None = None,
) -> Trial:
    """A/B: both versions live with a sticky split until ``promote()`` or ``abort()``.

    ``hotpatch.record(name, value)`` attributes an outcome to the current call's arm;
    ``Trial.report()`` compares the arms. Health checks run every ``check_s``; a failure rolls
    back.

    Args:
        modules: a module name, names, or a mapping name -> new source.
        split: the new version's share, in percent.
        key, route, flag: routing, as for ``canary``.
        check_s: how often the health checks run.
        allow_removals: as for ``patch``.
        engine: the engine (default: ``hotpatch.default_engine()``).
    """
    _percent("split", split)
    _seconds("check_s", check_s)
    _check_routing(key, route, flag)
    return Trial(
        kind="experiment",
        engine=engine or default_engine(),
        modules=modules,
        allow_removals=allow_removals,
        key=key,
        route=route,
        flag=flag,
        step_s=check_s,
        min_calls=1,
        split=split,
    )


def record(name: str, value: float) -> bool:
    """Attribute an outcome (a metric's value) to the current call's arm in running experiments.

    The arm is the one the current call chain runs in, or, outside any dispatched call, the one
    the current routing key (``hotpatch.routing_key``) is bucketed into.

    Returns:
        Whether some experiment took it (False: no experiment, or no arm for this call).

    Raises:
        TypeError, ValueError: the name is not a non-empty str, the value not a finite number.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"record(name) must be a non-empty str, not {name!r}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"record(value) must be a finite number, not {value!r}")
    with _ACTIVE_LOCK:
        trials = [t for t in _ACTIVE.values() if t.kind == "experiment"]
    taken = False
    for trial in trials:
        taken = trial._record(name, float(value)) or taken
    return taken


def active_trials() -> list[Trial]:
    """The trials running in this process."""
    with _ACTIVE_LOCK:
        return list(_ACTIVE.values())


__all__ = [
    "ArmStatus",
    "ExperimentReport",
    "MetricReport",
    "Mismatch",
    "Trial",
    "TrialResult",
    "TrialStatus",
    "active_trials",
    "canary",
    "experiment",
    "record",
    "shadow",
]
