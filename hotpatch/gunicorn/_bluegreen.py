"""``hotpatch deploy --strategy blue-green``: a second gunicorn master, then a switch, then a window.

The problem: some changes cannot reach a running master's workers at all, however they are
restarted: the gunicorn config (read by the master), the installed packages a master preloads or
a worker imports from outside the app directory, the interpreter itself. gunicorn's answer is its
own re-exec (``USR2``): the master forks and execs a second master on the same listening sockets,
with a full set of new workers, while the old master keeps its workers; ``WINCH`` then stops the
old workers, ``HUP`` brings them back (the documented revert), and ``QUIT`` ends the old master.
Done by hand this is unguarded: nothing waits for the new workers to be healthy, ``WINCH`` is
ignored unless gunicorn runs daemonized, a re-exec from ``python -m gunicorn`` fails to start
(the new master runs ``gunicorn/__main__.py`` as a script, and the ``gunicorn`` package directory
on ``sys.path`` hides the standard ``http`` package), and whoever holds the timer for the
switch-back must stay alive.

The mechanism: the OLD master's controller runs the whole switch (``BlueGreenDriver``), from
gunicorn's own loop like a rollout, because it is the one process sure to outlive every step:
the new master is its child (its pid cannot be reused before the old master reaps it, and the old
master learns of its exit through ``SIGCHLD``), and the old workers are its own. ``hotpatch
deploy`` only asks for it (request ``blue_green``) and follows the published record; with
``--no-wait``, or if the command dies, the switch and the window go on without it.

1. ``starting``: the old master calls gunicorn's ``reexec`` (what ``USR2`` does), opens a pidfd
   on the new master and reads the new master's own published state (``gunicorn-<new pid>/``,
   checked as any client checks it). The new master runs the same hooks; until it is promoted its
   workers boot as rollout candidates: a worker whose load or health check fails exits before it
   takes a request, and the failure is published. Any failure, the new master's exit, or the
   deadline: the new master gets ``TERM`` (graceful: a new worker that was already ready finishes
   its requests) and the old workers never stopped serving (outcome ``refused``).
2. ``draining``: every new worker is ready (as many as the new master's size): the old master
   stops its own workers gracefully, exactly as gunicorn's ``WINCH`` does when daemonized
   (``num_workers = 0``, ``SIGTERM`` to each worker).
3. ``window``: the old master stays idle for ``keep_old_s`` and watches the new set: its master
   exiting, a new worker failing its load or health check, three unexpected worker exits (a crash
   loop) or its state unreadable for ``STATE_LOST_S``. Any of those, ``hotpatch deploy --pid
   <old> --switch-back`` or a ``SIGHUP`` to the old master: ``switching_back``.
4. ``switching_back``: the old master restores its worker count (its known-good release, so the
   old code even though the new code is on disk), waits until they are all ready, then ``TERM``
   to the new master (``stopping_new``) and waits for it to exit (outcome ``switched_back``). If
   the old workers cannot come back, the new master is left serving (``switch_back_failed``).
5. ``quitting``: the window ended with the new set healthy: the old master records ``deployed``
   and sends itself ``QUIT``; with no workers left it exits at once. gunicorn's new master then
   notices its parent is gone, is promoted and renames its pidfile ``<pidfile>.2`` to
   ``<pidfile>`` (gunicorn 27; older gunicorn renamed the old master's to ``<pidfile>.oldbin``).

Each step is an event in the record (``state.json``: ``blue_green`` while it runs, then
``last_blue_green``); the client side (``run_blue_green``, ``switch_back``) prints them and turns
the record into a ``DeployResult``. A record the command did not see end is reported ``unknown``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotpatch._log import get_logger
from hotpatch.errors import ConfigError, HotpatchError
from hotpatch.gunicorn._client import is_alive, load_state
from hotpatch.gunicorn._state import (
    WAKE_SIGNAL,
    StateError,
    load_state_file,
    process_start_time,
    write_request,
)

if TYPE_CHECKING:
    from hotpatch.gunicorn._coordinator import DeployResult, _Run

log = get_logger(__name__)

MAX_KEEP_OLD_S = 86_400.0
MAX_BOOT_S = 3_600.0
STATE_LOST_S = 5.0
"""The new master's state unreadable this long, while it runs: the new set has failed."""
CRASH_LOOP_EXITS = 3
"""Unexpected exits of new workers (not ``max_requests`` recycling) that make a crash loop."""
POLL_S = 0.2
"""How often the old master reads the new master's state while something is awaited."""
WINDOW_POLL_S = 0.5
STOP_GRACE_S = 10.0
"""What a master may take beyond gunicorn's ``graceful_timeout`` to exit after ``TERM``."""
NUDGE_S = 1.0
"""While the new master stops: how often its remaining workers get ``TERM`` again."""
MAX_TICK_FAILURES = 3
_MAX_EVENTS = 100
_ACTIVE = ("starting", "draining", "window", "switching_back", "stopping_new", "quitting")


def reexec_argv(args: list[str], package_dir: str) -> list[str]:
    """The argv gunicorn's re-exec should use: ``-m gunicorn`` instead of its ``__main__.py``.

    ``python -m gunicorn`` leaves ``sys.argv[0]`` as the path of ``gunicorn/__main__.py``;
    gunicorn re-execs ``[sys.executable, *sys.argv]``, which runs that file as a script with the
    package directory first on ``sys.path``, where ``gunicorn/http`` hides the standard ``http``
    package: the new master dies at once ("No module named 'http.client'").
    """
    if (
        len(args) >= 2
        and os.path.basename(args[1]) == "__main__.py"
        and os.path.realpath(os.path.dirname(args[1])) == os.path.realpath(package_dir)
    ):
        return [args[0], "-m", "gunicorn", *args[2:]]
    return list(args)


def fix_reexec_argv(arbiter: Any) -> list[str]:
    """Make gunicorn's own re-exec (``USR2``, or a blue-green) work for ``python -m gunicorn``
    (``reexec_argv``); returns the argv it will use. Called when the controller is installed."""
    import gunicorn  # type: ignore[import-untyped]

    args = list(arbiter.START_CTX.get("args") or [])
    fixed = reexec_argv(args, os.path.dirname(os.path.abspath(gunicorn.__file__)))
    if fixed != args:
        arbiter.START_CTX["args"] = fixed
    return fixed


def new_set_problem(state: dict[str, Any], baseline: dict[str, int]) -> str | None:
    """Why the new master's published state shows a failed new set, or ``None``.

    Args:
        state: the new master's state.
        baseline: its ``worker_failure_count`` and ``worker_crash_count`` when the switch began
            (0 and 0: a new master counts from its start).
    """
    failures = _count(state.get("worker_failure_count"))
    if failures > baseline.get("worker_failure_count", 0):
        last = state.get("worker_failures") or []
        detail = last[-1] if isinstance(last, list) and last else {}
        detail = detail if isinstance(detail, dict) else {}
        return (
            f"worker {detail.get('pid')} of the new master failed at "
            f"{detail.get('stage') or 'boot'}: {str(detail.get('reason') or 'no reason given')[:1000]}"
        )
    crashes = _count(state.get("worker_crash_count")) - baseline.get("worker_crash_count", 0)
    if crashes >= CRASH_LOOP_EXITS:
        return f"{crashes} workers of the new master exited unexpectedly (a crash loop)"
    return None


def ready_workers(state: dict[str, Any]) -> tuple[int, int]:
    """``(ready, size)`` of the new master: workers that passed their health check, and how many
    it should have."""
    workers = state.get("workers") or []
    ready = sum(1 for w in workers if isinstance(w, dict) and w.get("phase") == "ready")
    return ready, _count(state.get("size"))


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


# -- the old master's side --------------------------------------------------------------------


class BlueGreenDriver:
    """Runs blue-green switches for one (old) master; owned by its ``Controller``.

    Args:
        controller: the master's controller (``_master.Controller``): its arbiter, state
            directory, settings, worker records, ``publish`` and ``_arm_timer``.
    """

    def __init__(self, controller: Any) -> None:
        self.c = controller
        self.record: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None
        self.origin: dict[str, Any] | None = None
        """In a new master: the old master's summary of the blue-green that made it live."""
        self.next_id = 1
        self._pidfd: int | None = None
        self._new_pid = 0
        self._new_start: int | None = None
        self._started = 0.0
        self._deadline = 0.0
        self._next_poll = 0.0
        self._last_good_read = 0.0
        self._state_error = ""
        self._baseline: dict[str, int] = {}
        self._shown_ready = -1
        self._pending_outcome = ""
        self._pending_reason = ""
        self._keep_old_s = 0.0
        self._tick_failures = 0
        self._next_nudge = 0.0
        self._new_workers: dict[int, int] = {}
        """The new master's workers seen while it ran: pid -> start time (to stop orphans)."""

    @property
    def is_active(self) -> bool:
        return self.record is not None

    @property
    def phase(self) -> str | None:
        return None if self.record is None else str(self.record["phase"])

    # -- requests -------------------------------------------------------------------------

    def start(self, request: dict[str, Any]) -> dict[str, Any]:
        """Request ``blue_green``: re-exec a new master; the answer names it (or the refusal)."""
        c = self.c
        arbiter = c.arbiter
        keep_old = request.get("keep_old_s")
        timeout = request.get("timeout_s")
        for name, value in (("keep_old_s", keep_old), ("timeout_s", timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                return {"ok": False, "reason": f"{name} must be a positive number of seconds"}
        assert isinstance(keep_old, (int, float)) and isinstance(timeout, (int, float))
        problem = self._start_problem()
        if problem is not None:
            return {"ok": False, "reason": problem}
        executable = arbiter.START_CTX.get(0) or sys.executable
        if not os.access(executable, os.X_OK):
            return {
                "ok": False,
                "reason": f"gunicorn would re-exec {executable}, which is not an executable file "
                "(removed or replaced since this master started?); start a new master instead",
            }
        fixed = fix_reexec_argv(arbiter)
        try:
            arbiter.reexec()
        finally:
            if os.getpid() != c.master_pid:  # the forked child whose exec failed: never return
                os._exit(127)  # into gunicorn's loop, which would stop the old master's workers
        new_pid = int(arbiter.reexec_pid or 0)
        if new_pid <= 0:
            return {"ok": False, "reason": "gunicorn did not re-exec (see its log)"}
        self._pidfd = _pidfd_open(new_pid)
        self._new_pid = new_pid
        self._new_start = process_start_time(new_pid)
        now = time.monotonic()
        self._started = now
        self._deadline = now + min(float(timeout), MAX_BOOT_S)
        self._keep_old_s = min(float(keep_old), MAX_KEEP_OLD_S)
        self._next_poll = now + POLL_S
        self._last_good_read = now
        self._state_error = ""
        self._baseline = {}
        self._shown_ready = -1
        self._pending_outcome = self._pending_reason = ""
        self._new_workers = {}
        bg_id = self.next_id
        self.next_id += 1
        self.record = {
            "id": bg_id,
            "phase": "starting",
            "old_master_pid": c.master_pid,
            "new_master_pid": new_pid,
            "size": int(c.size),
            "keep_old_s": self._keep_old_s,
            "started": time.time(),
            "boot_deadline": time.time() + (self._deadline - now),
            "window_ends": None,
            "outcome": None,
            "reason": None,
            "events": [],
        }
        self._event("bluegreen.started", new_master_pid=new_pid, argv=fixed[1:8])
        c._arm_timer(c._next_wakeup())
        return {"ok": True, "id": bg_id, "new_master_pid": new_pid}

    def _start_problem(self) -> str | None:
        c = self.c
        arbiter = c.arbiter
        if self.record is not None:
            return f"blue-green {self.record['id']} is already running ({self.record['phase']})"
        if c.settings.state_dir is not None:
            return (
                "HOTPATCH_STATE_DIR / configure(state_dir=...) names one state directory, which "
                "the second master would share with this one: blue-green needs the default "
                "per-master state directory in the runtime directory"
            )
        if getattr(arbiter, "master_pid", 0):
            return (
                f"this master is itself the new master of a blue-green started by master "
                f"{arbiter.master_pid}, which still runs: wait until it quits, or switch back"
            )
        fd_binds = [a for a in getattr(arbiter.cfg, "address", []) or [] if isinstance(a, int)]
        if fd_binds:
            return (
                f"gunicorn is bound to an inherited descriptor (--bind fd://{fd_binds[0]}): its "
                "re-exec cannot carry that (the new master would open the configured descriptor, "
                "closed by now, besides the one it inherits, and die); bind an address (host:port "
                "or unix:path) to use blue-green"
            )
        if getattr(arbiter, "reexec_pid", 0):
            return f"this master already has a re-exec'd master, pid {arbiter.reexec_pid}"
        if c.rollout is not None:
            return f"rollout {c.rollout.rollout_id} is running"
        if c.deploy is not None:
            return f"deploy {c.deploy['id']} is running"
        if c.known_good is None:
            return c.disabled_reason or "hotpatch is not running in this master"
        return None

    def switch_back(self, *, by: str) -> dict[str, Any]:
        """Request ``switch_back`` (or ``SIGHUP`` during a blue-green): bring the old workers back."""
        record = self.record
        if record is None:
            last = self.last
            if last is not None and last.get("outcome") in ("switched_back",):
                return {"ok": True, "id": last["id"], "already": True}
            return {"ok": False, "reason": "no blue-green is running in this master"}
        phase = record["phase"]
        if phase == "starting":
            self._event("bluegreen.aborted", by=by)
            self._stop_new("refused", f"switch-back requested ({by}) before the new set was live")
        elif phase in ("draining", "window"):
            self._begin_switch_back(f"switch-back requested ({by})")
        elif phase not in ("switching_back", "stopping_new"):
            return {"ok": False, "reason": f"blue-green {record['id']} is {phase}: too late"}
        return {"ok": True, "id": record["id"]}

    # -- the loop ---------------------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        if self.record is None:
            return None
        return self._next_poll

    def tick(self) -> None:
        """Advance the switch; called from the controller's ``tick`` (gunicorn's loop).

        An error here is logged; after ``MAX_TICK_FAILURES`` in a row the switch is abandoned
        with both sets serving (``_abandon``), never left stuck in a phase.
        """
        try:
            self._tick()
        except Exception as exc:
            self._tick_failures += 1
            log.exception(
                "bluegreen.tick_failed", master_pid=self.c.master_pid, failures=self._tick_failures
            )
            if self._tick_failures >= MAX_TICK_FAILURES and self.record is not None:
                self._abandon(f"{type(exc).__name__}: {exc}")
        else:
            self._tick_failures = 0

    def _abandon(self, error: str) -> None:
        """The driver keeps failing: bring the old workers back, leave the new master serving,
        and say so; no request is dropped on a guess."""
        c = self.c
        with contextlib.suppress(Exception):
            if c.arbiter.num_workers != c.size:
                c._set_num_workers(c.size)
        alive = False
        with contextlib.suppress(Exception):
            alive = self._new_alive()
        reason = f"the blue-green driver failed ({error}); the old master's workers were restored"
        if alive:
            reason += (
                f" and the new master {self._new_pid} was left running: both serve; stop one "
                f"(kill -TERM {self._new_pid} for the old code)"
            )
        self._finish("failed", reason)

    def _tick(self) -> None:
        record = self.record
        if record is None:
            return
        now = time.monotonic()
        if now < self._next_poll and record["phase"] not in ("draining", "switching_back"):
            return
        phase = record["phase"]
        self._next_poll = now + (WINDOW_POLL_S if phase == "window" else POLL_S)
        alive = self._new_alive()
        if alive:
            self._remember_new_workers()
        if phase == "stopping_new":
            self._tick_stopping(now, alive)
            return
        state = self._read_new_state() if alive else None
        if state is not None:
            self._last_good_read = now
        if phase == "starting":
            self._tick_starting(now, alive, state)
        elif phase in ("draining", "window"):
            problem = self._problem(now, alive, state)
            if problem is not None:
                self._event("bluegreen.failed", reason=problem, level="error")
                self._begin_switch_back(problem)
            elif phase == "draining":
                if not self.c.arbiter.WORKERS:
                    self._event("bluegreen.old_workers_stopped")
                    record["phase"] = "window"
                    record["window_ends"] = time.time() + self._keep_old_s
                    self._deadline = now + self._keep_old_s
                    self._event("bluegreen.window_opened", window_ends=record["window_ends"])
                    self._next_poll = min(self._next_poll, self._deadline)
            elif now >= self._deadline:
                record["phase"] = "quitting"
                record["outcome"] = "deployed"
                self._event("bluegreen.old_master_quitting", new_master_pid=self._new_pid)
                self._hand_over(record)
                self._close()
                self.c.publish()
                os.kill(os.getpid(), signal.SIGQUIT)  # gunicorn queues it: this master exits
            else:
                self._next_poll = min(self._next_poll, self._deadline)
        elif phase == "switching_back":
            self._tick_switching_back(now, alive)

    def _tick_starting(self, now: float, alive: bool, state: dict[str, Any] | None) -> None:
        assert self.record is not None
        if not alive:
            self._stop_orphans()  # the old workers serve: the new master's leftovers may go now
            self._finish(
                "refused",
                f"the new master {self._new_pid} exited before its workers were healthy "
                "(gunicorn's log says why)",
            )
            return
        if state is not None:
            problem = new_set_problem(state, self._baseline)
            if problem is None and state.get("disabled_reason") and not state.get("rolling"):
                problem = (
                    "the new master runs without hotpatch's controller, so the health of its "
                    f"workers cannot be known: {str(state['disabled_reason'])[:500]}"
                )
            if problem is not None:
                self._stop_new("refused", problem)
                return
            ready, size = ready_workers(state)
            if ready != self._shown_ready:
                self._shown_ready = ready
                self._event("bluegreen.workers_ready", ready=ready, size=size)
            if size > 0 and ready >= size:
                self._event("bluegreen.healthy", ready=ready, size=size)
                self._drain()
                return
        if now >= self._deadline:
            ready, size = ready_workers(state or {})
            why = f"{ready}/{size} workers ready" if state else f"no state: {self._state_error}"
            self._stop_new(
                "refused",
                f"the new master's workers were not all healthy within "
                f"{self._deadline - self._started:g} s ({why})",
            )

    def _problem(self, now: float, alive: bool, state: dict[str, Any] | None) -> str | None:
        if not alive:
            return f"the new master {self._new_pid} exited"
        if state is not None:
            return new_set_problem(state, self._baseline)
        if now - self._last_good_read >= STATE_LOST_S:
            return f"the new master's state could not be read for {STATE_LOST_S:g} s: {self._state_error}"
        return None

    def _drain(self) -> None:
        """What gunicorn's ``WINCH`` does when daemonized: stop this master's workers, gracefully."""
        assert self.record is not None
        c = self.c
        old = sorted(c.arbiter.WORKERS)
        self.record["phase"] = "draining"
        self._event("bluegreen.old_workers_stopping", workers=old)
        c._set_num_workers(0)
        c.arbiter.kill_workers(signal.SIGTERM)
        self._deadline = time.monotonic() + float(c.arbiter.cfg.graceful_timeout) + STOP_GRACE_S

    def _begin_switch_back(self, reason: str) -> None:
        assert self.record is not None
        c = self.c
        self.record["phase"] = "switching_back"
        self.record["reason"] = reason
        c.spawn_release = c.known_good
        c._set_num_workers(int(self.record["size"]))
        s = c.settings
        self._deadline = time.monotonic() + s.boot_timeout_s + s.health_timeout_s + STOP_GRACE_S
        self._event(
            "bluegreen.switching_back",
            reason=reason,
            release=c.known_good.id if c.known_good else None,
        )

    def _tick_switching_back(self, now: float, alive: bool) -> None:
        assert self.record is not None
        c = self.c
        size = int(self.record["size"])
        good = c.known_good.id if c.known_good else None
        ready = [
            p
            for p in c.arbiter.WORKERS
            if c.worker_stage.get(p) == "ready" and c.worker_release.get(p) == good
        ]
        if len(ready) >= size:
            self._event("bluegreen.old_workers_back", ready=len(ready), size=size)
            reason = str(self.record.get("reason") or "")
            if alive:
                self._stop_new("switched_back", reason)
            else:
                self._stop_orphans()
                self._finish("switched_back", reason)
            return
        if now >= self._deadline:
            self._finish(
                "switch_back_failed",
                f"{self.record.get('reason')}; but only {len(ready)}/{size} old workers became "
                "ready on the known-good release in time"
                + (f": the new master {self._new_pid} is left serving" if alive else ""),
            )

    def _stop_new(self, outcome: str, reason: str) -> None:
        assert self.record is not None
        self._pending_outcome, self._pending_reason = outcome, reason
        self.record["phase"] = "stopping_new"
        self.record["reason"] = reason
        self._signal_new(signal.SIGTERM)
        self._event("bluegreen.new_master_stopping", new_master_pid=self._new_pid, reason=reason)
        graceful = float(self.c.arbiter.cfg.graceful_timeout)
        self._deadline = time.monotonic() + graceful + STOP_GRACE_S
        self._next_poll = time.monotonic() + POLL_S
        self._next_nudge = time.monotonic() + NUDGE_S

    def _remember_new_workers(self) -> None:
        for pid in _children(self._new_pid):
            if pid not in self._new_workers:
                start = process_start_time(pid)
                if start is not None and _parent_of(pid) == self._new_pid:
                    self._new_workers[pid] = start

    def _stop_orphans(self) -> None:
        """The new master died: its workers live on (gunicorn's notice their parent is gone only
        between requests, up to ``timeout`` later) and serve the new code. ``TERM`` each one seen
        as its child, through a pidfd, only if it is still the process with that start time."""
        stopped = []
        for pid, start in sorted(self._new_workers.items()):
            fd = _pidfd_open(pid)
            if fd is None:
                continue
            try:
                if process_start_time(pid) == start:
                    signal.pidfd_send_signal(fd, signal.SIGTERM)
                    stopped.append(pid)
            except OSError:
                pass
            finally:
                os.close(fd)
        self._new_workers = {}
        if stopped:
            self._event("bluegreen.orphans_stopped", workers=stopped)

    def _nudge_new_workers(self) -> None:
        """``TERM`` again to the new master's workers that are still there.

        gunicorn's stop sends ``TERM`` to each worker once. A worker forked just before it still
        has the master's signal handlers (they only queue the signal) until its own are set up:
        it ignores that ``TERM``, boots, serves, and is killed mid-request at the end of
        ``graceful_timeout``. Each pid is a child of the new master (``/proc``), checked after
        a pidfd on it was opened, and signalled through that pidfd.
        """
        for pid in _children(self._new_pid):
            fd = _pidfd_open(pid)
            if fd is None:
                continue
            try:
                if _parent_of(pid) == self._new_pid and self._new_alive():
                    signal.pidfd_send_signal(fd, signal.SIGTERM)
            except OSError:
                pass
            finally:
                os.close(fd)

    def _tick_stopping(self, now: float, alive: bool) -> None:
        if not alive:
            self._event("bluegreen.new_master_stopped", new_master_pid=self._new_pid)
            self._finish(self._pending_outcome, self._pending_reason)
            return
        if now >= self._next_nudge:
            self._next_nudge = now + NUDGE_S
            self._nudge_new_workers()
        if now >= self._deadline:
            self._event("bluegreen.new_master_killed", new_master_pid=self._new_pid, level="error")
            self._signal_new(signal.SIGKILL)
            self._deadline = now + STOP_GRACE_S

    def _finish(self, outcome: str, reason: str) -> None:
        record = self.record
        assert record is not None
        record["phase"] = "finished"
        record["outcome"] = outcome
        record["reason"] = reason or None
        record["duration_s"] = round(time.monotonic() - self._started, 3)
        level = "info" if outcome in ("deployed", "switched_back") else "error"
        self._event(f"bluegreen.{outcome}", reason=reason or None, level=level)
        self.last = record
        self.record = None
        self._close()
        c = self.c
        if outcome in ("refused", "switched_back") and c.arbiter.num_workers != c.size:
            c._set_num_workers(c.size)
        c.publish()

    def _hand_over(self, record: dict[str, Any]) -> None:
        """Tell the new master how it became live (request ``blue_green_done``), so that its own
        state says so once this master is gone; a failure here changes nothing else."""
        summary = {k: v for k, v in record.items() if k != "events"}
        directory = Path(self.c.state_dir).parent / f"gunicorn-{self._new_pid}"
        try:
            write_request(
                directory, os.urandom(16).hex(), {"op": "blue_green_done", "record": summary}
            )
        except (OSError, ValueError) as exc:
            log.warning("bluegreen.handover_failed", master_pid=self.c.master_pid, error=str(exc))
            return
        self._signal_new(WAKE_SIGNAL)

    def adopt(self, request: dict[str, Any]) -> dict[str, Any]:
        """Request ``blue_green_done`` (in the new master): keep the old master's summary."""
        record = request.get("record")
        if not isinstance(record, dict) or record.get("new_master_pid") != self.c.master_pid:
            return {"ok": False, "reason": "not a blue-green record naming this master"}
        keep = ("id", "old_master_pid", "new_master_pid", "keep_old_s", "started", "window_ends")
        self.origin = {k: record.get(k) for k in keep if isinstance(record.get(k), (int, float))}
        self.origin["outcome"] = "deployed"
        self.origin["adopted"] = time.time()
        log.info("bluegreen.adopted", master_pid=self.c.master_pid, **self.origin)
        return {"ok": True}

    # -- the new master -------------------------------------------------------------------

    def _new_alive(self) -> bool:
        """Whether the new master runs: still our unreaped child (gunicorn zeroes ``reexec_pid``
        when it reaps it), with the start time it had."""
        if not self._new_pid or getattr(self.c.arbiter, "reexec_pid", 0) != self._new_pid:
            return False
        return is_alive(self._new_pid, self._new_start)

    def _read_new_state(self) -> dict[str, Any] | None:
        directory = Path(self.c.state_dir).parent / f"gunicorn-{self._new_pid}"
        try:
            state = load_state_file(directory)
        except StateError as exc:
            self._state_error = str(exc)
            return None
        if state.get("master_pid") != self._new_pid or (
            self._new_start is not None and state.get("master_start_time") != self._new_start
        ):
            self._state_error = f"{directory}: the state is not the new master's"
            return None
        return state

    def _signal_new(self, sig: int) -> None:
        """Signal the new master through the pidfd opened when it was forked (never a bare pid:
        after gunicorn reaps it, the pid may be another process's)."""
        if not self._new_alive():
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:  # pragma: no cover - no pidfds: still our unreaped child, so the pid is its own
                os.kill(self._new_pid, sig)
        except ProcessLookupError:
            pass

    def _close(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None

    def _event(self, name: str, *, level: str = "info", **fields: Any) -> None:
        record = self.record
        if record is not None and len(record["events"]) < _MAX_EVENTS:
            entry = {"event": name, "t": round(time.monotonic() - self._started, 3)}
            entry.update(fields)
            record["events"].append(entry)
        getattr(log, level)(
            name,
            master_pid=self.c.master_pid,
            blue_green_id=record["id"] if record else None,
            **fields,
        )
        self.c.publish()

    def snapshot(self) -> dict[str, Any]:
        """What the master publishes: ``blue_green`` (running) and ``last_blue_green``."""
        return {
            "blue_green": self.record,
            "last_blue_green": self.last,
            "blue_green_origin": self.origin,
        }


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (``/proc/<pid>/task/<pid>/children``), or none."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as fh:
            return [int(p) for p in fh.read(1 << 16).split() if p.isdigit()]
    except (OSError, ValueError):
        return []


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read(4096).rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _pidfd_open(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:  # pragma: no cover - Linux < 5.3
        return None
    try:
        return int(opener(pid))
    except OSError:  # pragma: no cover - kernel without pidfds
        return None


# -- the client's side (``hotpatch deploy``) --------------------------------------------------

FINAL_WAIT_S = 30.0
"""Beyond the boot timeout and the window: what stopping a master may take, and slack."""


def run_blue_green(run: _Run, *, keep_old_s: float, wait: bool) -> DeployResult:
    """Ask master ``run.pid`` for a blue-green switch and follow it (``deploy``'s strategy)."""
    try:
        ack = run.master({"op": "blue_green", "keep_old_s": keep_old_s, "timeout_s": run.timeout_s})
    except HotpatchError as exc:
        return run.result("unknown", "blue-green", reason=f"{exc}")
    if not ack.get("ok"):
        reason = str(ack.get("reason"))
        run.emit("bluegreen.refused", reason=reason)
        return run.result("refused", "blue-green", reason=reason)
    bg_id = int(ack["id"])
    new_pid = int(ack["new_master_pid"])
    info = {"id": bg_id, "old_master_pid": run.pid, "new_master_pid": new_pid}
    if not wait:
        run.emit("bluegreen.started", new_master_pid=new_pid)
        return run.result(
            "started",
            "blue-green",
            reason=f"the old master {run.pid} runs the switch and the {keep_old_s:g} s window",
            blue_green=info,
        )
    deadline = time.monotonic() + run.timeout_s + keep_old_s + FINAL_WAIT_S
    return _follow(run, bg_id, deadline, info, switch_back=False)


def switch_back(
    pid: int,
    *,
    timeout_s: float = 120.0,
    state_dir: str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> DeployResult:
    """``hotpatch deploy --switch-back``: bring the old workers of a blue-green back.

    Args:
        pid: the old master (the one the blue-green was started on); the new master's pid is
            accepted too while its old master runs (it is found through the new master's state).
        timeout_s: how long to wait for the old workers and the new master's exit.
        state_dir: the master's state directory, when not the default.
        on_event: called with each progress event.

    Raises:
        ConfigError: no such master of this user running hotpatch's hooks.
    """
    from hotpatch.gunicorn._coordinator import _Run

    run = _Run(
        pid, timeout_s=timeout_s, state_dir=state_dir, on_event=on_event, between_phases=None
    )
    state = load_state(pid, state_dir)
    parent = state.get("parent_master_pid")
    if not state.get("blue_green") and isinstance(parent, int) and parent > 0:
        load_state(parent, state_dir)  # the old master, verified like any
        run.emit("bluegreen.redirected", new_master_pid=pid, old_master_pid=parent)
        run.pid = pid = parent
    try:
        ack = run.master({"op": "switch_back"})
    except HotpatchError as exc:
        return run.result("unknown", "blue-green", reason=f"{exc}")
    if not ack.get("ok"):
        reason = str(ack.get("reason"))
        run.emit("bluegreen.refused", reason=reason)
        return run.result("refused", "blue-green", reason=reason)
    info = {"id": int(ack["id"]), "old_master_pid": pid}
    return _follow(run, int(ack["id"]), time.monotonic() + run.timeout_s, info, switch_back=True)


_OUTCOMES = {
    "deployed": "deployed",
    "refused": "refused",
    "failed": "rollback_failed",
    "switched_back": "rolled_back",
    "switch_back_failed": "rollback_failed",
}


def _follow(
    run: _Run, bg_id: int, deadline: float, info: dict[str, Any], *, switch_back: bool
) -> DeployResult:
    """Print the record's events until it ends; what the command saw is what it reports."""
    shown = 0 if not switch_back else -1
    seen: dict[str, Any] | None = None
    pid = run.pid
    start_time = process_start_time(pid)
    while True:
        record = None
        if _running(pid, start_time):
            with contextlib.suppress(ConfigError):
                state = load_state(pid, run.state_dir)
                for key in ("blue_green", "last_blue_green"):
                    candidate = state.get(key)
                    if isinstance(candidate, dict) and candidate.get("id") == bg_id:
                        record = candidate
                        break
        if record is not None:
            seen = record
            events = record.get("events") or []
            if shown < 0:  # a switch-back: only what happens from now on
                shown = max(0, len(events) - 1)
            for event in events[shown:]:
                if isinstance(event, dict):
                    fields = {k: v for k, v in event.items() if k not in ("event", "t")}
                    run.emit(str(event.get("event")), master_t=event.get("t"), **fields)
            shown = len(events)
            info.update(
                {
                    k: record.get(k)
                    for k in ("phase", "new_master_pid", "window_ends", "keep_old_s", "outcome")
                }
            )
            outcome = record.get("outcome")
            if record.get("phase") == "finished" and outcome in _OUTCOMES:
                mapped = _OUTCOMES[str(outcome)]
                if switch_back and outcome in ("switched_back", "refused"):
                    mapped = "switched_back"  # (refused: stopped before the switch) old code serves
                return run.result(
                    mapped, "blue-green", reason=str(record.get("reason") or ""), blue_green=info
                )
        elif not _running(pid, start_time):
            new_pid = int(info.get("new_master_pid") or 0)
            if _adopted(new_pid, bg_id, pid, run.state_dir):
                run.emit("bluegreen.old_master_quit", old_master_pid=pid, new_master_pid=new_pid)
                info.update(phase="finished", outcome="deployed")
                return run.result("deployed", "blue-green", blue_green=info)
            if seen is not None and seen.get("phase") == "quitting":
                return run.result(
                    "unknown",
                    "blue-green",
                    reason=f"the old master {pid} quit after the window, but the new master "
                    f"{new_pid} does not confirm it took over (not running, or no record)",
                    blue_green=info,
                )
            return run.result(
                "unknown",
                "blue-green",
                reason=f"the old master {pid} exited in phase "
                f"{(seen or {}).get('phase', 'unknown')}, before the end of blue-green {bg_id}; "
                f"the new master {info.get('new_master_pid')} may still run",
                blue_green=info,
            )
        if time.monotonic() >= deadline:
            phase = (seen or {}).get("phase", "unknown")
            ends = (seen or {}).get("window_ends")
            extra = ""
            if phase == "window" and isinstance(ends, (int, float)):
                extra = (
                    f"; the window ends at {_clock(ends)}, then the old master quits unless the "
                    "new set fails or you switch back"
                )
            return run.result(
                "unknown",
                "blue-green",
                reason=f"blue-green {bg_id} is still running in the old master {pid} (phase "
                f"{phase}){extra}; see `hotpatch status --pid {pid}`",
                blue_green=info,
            )
        time.sleep(0.05)


def _running(pid: int, start_time: int | None) -> bool:
    """``is_alive``, but a zombie (exited, not yet reaped by its parent) is not running."""
    if not is_alive(pid, start_time):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read(4096).rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _adopted(new_pid: int, bg_id: int, old_pid: int, state_dir: str | None) -> bool:
    """Whether the new master runs and says the old one handed over blue-green ``bg_id``
    (waits a few seconds for the hand-over request to be served)."""
    if new_pid <= 0:
        return False
    deadline = time.monotonic() + STATE_LOST_S
    while time.monotonic() < deadline:
        try:
            origin = load_state(new_pid, state_dir).get("blue_green_origin")
        except ConfigError:
            return False
        if (
            isinstance(origin, dict)
            and origin.get("id") == bg_id
            and origin.get("old_master_pid") == old_pid
        ):
            return True
        time.sleep(0.05)
    return False


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(epoch))
