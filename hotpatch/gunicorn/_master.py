"""Master side: the rollout controller, driven from gunicorn's own master loop (no threads).

``install_controller(arbiter)`` (from ``when_ready``) snapshots the boot release and replaces a few
of the arbiter's methods on the instance (the class is untouched):

- ``handle_hup``: starts a rollout (or queues one) instead of gunicorn's all-at-once reload;
- ``manage_workers``: first advances the rollout (reads worker reports, runs the state machine's
  actions, keeps ``num_workers`` equal to the live worker count so gunicorn neither spawns nor
  kills behind the rollout's back), then runs gunicorn's own;
- ``spawn_worker``: records which release each new worker is pinned to;
- ``handle_chld``: a guard so that a worker exiting with gunicorn's boot/load error codes (3, 4)
  never halts a server that has served (workers already exit with other codes; this is the net).

In watch mode (``HOTPATCH_WATCH=1``) ``manage_workers`` also polls the app directory's sources
when a scan is due (``_watch.py``) and requests a rollout, as SIGHUP does, when saved content
changed.

``hotpatch deploy`` talks to the master through request files and ``WAKE_SIGNAL`` (``_state``):
``begin`` snapshots the release to deploy and records the workers taking part; ``switch`` (all of
them accepted phase 1) makes workers spawned from then on boot from the new release, but only if
the worker set is still exactly the one that began; ``finish`` makes the new release known-good
(deployed) or puts the spawn release back and retires any worker that booted from the new one
(rolled back), plus the workers the coordinator names as in doubt. A deploy the coordinator
abandons expires: before the switch nothing was committed and it is dropped; after it, every
worker is retired and respawned on the known-good release (the master cannot know which
committed). While a deploy runs, a rollout request waits for it, and a deploy is refused while a
rollout runs.

``hotpatch deploy --strategy canary`` asks for a rollout that holds after its first new worker
(``canary_begin``; ``_machine``: ``hold_until``), judges that worker on its own (``_canary``),
and sends the verdict (``canary_verdict``): the rollout then goes on, or rolls back. A canary
whose verdict does not come by its deadline is rolled back.

Workers report through a pipe per worker whose read end wakes the master with ``WAKE_SIGNAL``
(``_state.py``); a ``SIGALRM`` timer wakes it at the next deadline, so progress never waits for
gunicorn's one-second loop.

**Nothing escapes into gunicorn's loop.** Every entry point gunicorn calls in the master (the hooks
in ``hotpatch.gunicorn``, the arbiter methods replaced here, the signal handlers installed here)
goes through one wrapper, ``contained``: an exception from hotpatch's code is logged
(``controller.failed``, with the traceback) and turns the running rollout into a rollback
(``Rollout.abort``); if the rollback itself keeps failing, the rollout is abandoned: the workers of
the new release are stopped and gunicorn respawns known-good ones. A rollout that fails before it
started (while snapshotting) is recorded as failed with no worker touched. ``SystemExit``,
``KeyboardInterrupt`` and gunicorn's ``HaltServer`` are not exceptions of that kind and pass, and
so does anything raised in a forked child (a worker leaves ``spawn_worker`` through ``SystemExit``).
If the controller cannot even be installed (an unsafe runtime directory, an unreadable app
directory at start-up), gunicorn serves as it would without hotpatch and every SIGHUP is refused
with the reason: never gunicorn's all-at-once reload behind the user's back.

**``gunicorn --user/--group``.** Workers then run as another uid than the master and cannot reach
its private directory. Each release is made readable by the workers' group (``_releases``:
``grant_release_access``; it stays unreachable by path, the directories above are 0700), and the
master hands each new worker an open descriptor of its release, which the worker uses as
``/proc/self/fd/<n>`` on ``sys.path``. Reports go through the inherited pipe, so they need no
file at all.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, ParamSpec, TypeVar

from hotpatch._log import get_logger
from hotpatch.errors import ConfigError
from hotpatch.gunicorn._bluegreen import BlueGreenDriver, fix_reexec_argv
from hotpatch.gunicorn._canary import flat_figures
from hotpatch.gunicorn._deploy import begin_problem, changed_files, pids, switch_problem
from hotpatch.gunicorn._fileset import SnapshotRule
from hotpatch.gunicorn._machine import (
    Action,
    FailStage,
    Finish,
    Kill,
    Retire,
    Rollout,
    Spawn,
    Timeouts,
)
from hotpatch.gunicorn._releases import (
    Release,
    SnapshotError,
    app_roots,
    check_release,
    grant_release_access,
    master_releases_dir,
    prune_releases,
    releases_root,
    remove_stale,
    take_snapshot,
)
from hotpatch.gunicorn._settings import Settings, load_settings
from hotpatch.gunicorn._state import (
    WAKE_SIGNAL,
    ReportReader,
    StageReport,
    open_report_pipe,
    prepare_state_dir,
    process_start_time,
    remove_stale_state_dirs,
    state_dir_for,
    take_requests,
    write_state,
)
from hotpatch.gunicorn._watch import ChangeDetector, hash_sources, scan_sources
from hotpatch.gunicorn._worker import SpawnPlan
from hotpatch.rundir import ENV_RUNTIME_DIR, check_private_dir, runtime_dir

log = get_logger(__name__)

PRELOAD_REFUSAL = (
    "rolling reload is disabled: preload_app is on, so every worker would run the code the master "
    "imported at start-up and a rollout could never load new code; remove --preload "
    "(preload_app = False) to roll workers one at a time, or restart the master (or send it "
    "SIGUSR2, then SIGTERM to the old master) to load new code"
)
WATCH_PRELOAD_REFUSAL = (
    "watch mode is off: it runs a rolling reload on each save, and rolling reload is disabled "
    "because preload_app is on; remove --preload (preload_app = False) to use HOTPATCH_WATCH"
)
GUNICORN_RELOAD_WARNING = (
    "gunicorn's own reload setting is also on: it restarts every worker at once and serves "
    "tracebacks while the code is broken; drop --reload (reload = False), HOTPATCH_WATCH "
    "replaces it with a rolling, health-checked reload"
)
_MAX_EVENTS = 200
MAX_INTERNAL_FAILURES = 3
"""Internal errors one rollout may meet (the first turns it into a rollback) before it is abandoned."""

P = ParamSpec("P")
R = TypeVar("R")
MAX_DEPLOY_TIMEOUT_S = 3600.0
DEPLOY_GRACE_S = 5.0
"""A deploy expires this long after its coordinator's own timeout."""
_MAX_ACKS = 16
_DEPLOY_OUTCOMES = frozenset({"deployed", "rolled_back", "refused", "aborted", "unchanged"})
_RELEASE_CHECK_INTERVAL_S = 5.0
"""How often the master checks, unasked, that the releases its workers run are intact."""


class Controller:
    """Runs rollouts for one gunicorn master. Created by ``install_controller``."""

    def __init__(self, arbiter: Any, settings: Settings) -> None:
        self.arbiter = arbiter
        self.master_pid = os.getpid()
        self.settings = settings
        self.state_dir = settings.state_dir or Path("/nonexistent")  # set by ``_install``
        self.has_state_dir = False
        self.app_dir = settings.app_dir or Path(arbiter.cfg.chdir)
        self.roots: tuple[Path, ...] = ()
        self.releases: dict[str, Release] = {}
        self.known_good: Release | None = None
        self.spawn_release: Release | None = None
        self.spawn_is_candidate = False
        self.has_served = False
        self.disabled_reason: str | None = None
        self.worker_release: dict[int, str] = {}
        # The release each worker booted from: an in-place deploy moves worker_release on, but the
        # worker still reads files under its boot release (package __path__, Django's templates).
        self.worker_boot_release: dict[int, str] = {}
        self.worker_stage: dict[int, str] = {}
        self.recycled: set[int] = set()
        self.listening: set[int] = set()
        """Workers whose control socket is open (they reported it): deploys wait for them."""
        self.candidates: set[int] = set()
        self.rollout: Rollout | None = None
        self.rollout_events: list[dict[str, Any]] = []
        self._failure_logged = False
        self.pending = False
        self.next_rollout_id = 1
        self.last_rollout: dict[str, Any] | None = None
        self.size = int(arbiter.num_workers)
        self._frozen: int | None = None
        self._published = ""
        self._originals: dict[str, Callable[..., Any]] = {}
        self._reap_in_loop: Callable[[], None] | None = None
        self._spawn: Callable[[], Any] = arbiter.spawn_worker
        self.watcher: ChangeDetector | None = None
        self.watch_disabled_reason: str | None = None
        self.watch_stats: dict[str, Any] = {"rollouts_requested": 0, "changes_ignored": 0}
        self.start_time = process_start_time(self.master_pid)
        worker_uid, worker_gid = int(arbiter.cfg.uid), int(arbiter.cfg.gid)
        self.worker_gid: int | None = worker_gid if worker_uid != os.geteuid() else None
        """Set under ``gunicorn --user``: releases are made readable by this group."""
        self._readers: dict[int, ReportReader] = {}
        self._spawn_fds: tuple[int, int, int | None] | None = None
        """While forking: the report pipe's two ends and the release descriptor (``--user``)."""
        self._starting: int | None = None
        self._internal_failures = 0
        self._errors_seen: set[tuple[str, str, str]] = set()
        self._publish_error = ""
        self.releases_dir: Path | None = None
        self.rule = SnapshotRule.build(settings.snapshot_exclude)
        self.damaged: dict[str, str] = {}
        self._next_release_check = 0.0
        self.deploy: dict[str, Any] | None = None
        self.last_deploy: dict[str, Any] | None = None
        self.next_deploy_id = 1
        self.deploy_acks: dict[str, dict[str, Any]] = {}
        self._deploy_release: Release | None = None
        self._deploy_participants: dict[int, str] = {}
        self._deploy_deadline: float | None = None
        self.blue_green = BlueGreenDriver(self)
        self.worker_failures: list[dict[str, Any]] = []
        """The last failed worker reports outside a rollout (a blue-green's old master reads them)."""
        self.worker_failure_count = 0
        self.worker_crash_count = 0
        """Workers that exited outside a rollout without recycling or a failed report."""
        self.canary: dict[str, Any] | None = None
        """The running (or last) canary rollout's record: its rollout id, deadline, verdict."""
        self.exports_metrics = False
        """The Prometheus export runs (``_prometheus``; set by ``install_controller``)."""
        self._in_progress: bool | None = None

    # -- installation -----------------------------------------------------------------------

    def install(self) -> None:
        """Snapshot the boot release and take over HUP, worker management and reaping.

        If anything fails here, hotpatch stays out of the way: no arbiter method is replaced but
        ``handle_hup``, which refuses rollouts with the reason (see the module docstring).
        """
        try:
            self._install()
        except Exception as exc:
            for name, original in self._originals.items():
                setattr(self.arbiter, name, original)
            self._originals.clear()
            self.known_good = self.spawn_release = None
            self.watcher = None
            self.disabled_reason = (
                f"hotpatch could not start in this master: {type(exc).__name__}: {exc}; "
                "gunicorn serves without rolling reloads, and SIGHUP is refused"
            )
            log.exception(
                "rollout.disabled", master_pid=self.arbiter.pid, reason=self.disabled_reason
            )
            self._override("handle_hup", self.contained("handle_hup", self.request_rollout, None))
            self.publish()

    def _install(self) -> None:
        self.state_dir = prepare_state_dir(state_dir_for(self.arbiter.pid, self.settings.state_dir))
        self.has_state_dir = True
        if self.settings.state_dir is None:  # the runtime directory: crashed masters' state goes
            stale = remove_stale_state_dirs(self.state_dir.parent, keep=self.state_dir)
            if stale:
                log.info("state.stale_removed", master_pid=self.arbiter.pid, directories=stale)
        self.roots = app_roots(self.app_dir)
        try:  # USR2 from `python -m gunicorn` would start a new master that dies at once
            fix_reexec_argv(self.arbiter)
        except Exception:  # gunicorn's re-exec stays as it was; a blue-green then says why
            log.exception("reexec.argv_fix_failed", master_pid=self.arbiter.pid)
        if self.arbiter.cfg.preload_app:
            self.disabled_reason = PRELOAD_REFUSAL
            log.error("rollout.disabled", master_pid=self.arbiter.pid, reason=PRELOAD_REFUSAL)
            if self.settings.watch:
                self.watch_disabled_reason = WATCH_PRELOAD_REFUSAL
                log.error(
                    "watch.disabled", master_pid=self.arbiter.pid, reason=WATCH_PRELOAD_REFUSAL
                )
            self._override("handle_hup", self.contained("handle_hup", self.request_rollout, None))
            self.publish()
            return
        self._prepare_releases()
        if self.settings.watch:  # baseline first: a save during the snapshot is not missed
            self._start_watching()
        release = self._new_release(0)
        self.releases[release.id] = release
        self.known_good = self.spawn_release = release
        wake = self.contained("signal handler", self._wake, None)
        self._override("handle_hup", self.contained("handle_hup", self.request_rollout, None))
        self._override("manage_workers", self._managed(self.arbiter.manage_workers))
        self._spawn = self._recorded(self.arbiter.spawn_worker)
        self._override("spawn_worker", self.contained("spawn_worker", self._spawn, None))
        handle_chld = self.arbiter.handle_chld
        if len(inspect.signature(handle_chld).parameters) == 2:
            # gunicorn <= 23 reaps inside the SIGCHLD handler, at any point of the master's
            # code: reap from the loop instead (before each rollout step), with the halt guard.
            signal.signal(signal.SIGCHLD, wake)
            self._reap_in_loop = self._guarded(self.arbiter.reap_workers)
        else:  # gunicorn 24+: the handler only queues, the loop calls handle_chld
            guarded = self.contained("handle_chld", self._guarded(handle_chld), None)
            self._override("handle_chld", guarded)
            if hasattr(self.arbiter, "handle_cld"):
                self._override("handle_cld", guarded)
        signal.signal(WAKE_SIGNAL, wake)
        signal.signal(signal.SIGIO, wake)  # report pipes signal SIGIO where F_SETSIG is missing
        signal.signal(signal.SIGALRM, wake)
        log.info(
            "rollout.enabled",
            master_pid=self.arbiter.pid,
            release=release.id,
            app_dir=str(self.app_dir),
            state_dir=str(self.state_dir),
            health_path=self.settings.health_path,
            worker_gid=self.worker_gid,
        )
        if self.watcher is not None:
            self._arm_timer(self.watcher.next_scan_at())
        self.publish()

    def _prepare_releases(self) -> None:
        """This master's releases directory (out of temp cleaners' reach); dead masters' removed."""
        root, warning = releases_root(self.settings.releases_dir)
        if warning is not None:
            log.warning("releases.location_degraded", master_pid=self.arbiter.pid, reason=warning)
        self.releases_dir = master_releases_dir(root, self.arbiter.pid)
        removed = remove_stale(root, keep=self.releases_dir)
        if removed:
            log.info("releases.stale_removed", master_pid=self.arbiter.pid, directories=removed)
        self.rule = SnapshotRule.build(
            self.settings.snapshot_exclude,
            exclude_paths=[os.path.realpath(self.state_dir), os.path.realpath(root)],
        )

    def _new_release(self, number: int, *, prefix: str = "r") -> Release:
        assert self.releases_dir is not None
        release = take_snapshot(
            self.app_dir, self.releases_dir, number=number, rule=self.rule, prefix=prefix
        )
        if self.worker_gid is not None:
            grant_release_access(release.path, gid=self.worker_gid)
        return release

    def release_problem(self, release: Release) -> str | None:
        """Why ``release`` cannot be used (damaged), or ``None``; checked now unless known."""
        if release.id not in self.damaged:
            problem = check_release(release)
            if problem is not None:
                self.mark_damaged(release.id, f"release {release.id} is damaged: {problem}")
        return self.damaged.get(release.id)

    def mark_damaged(self, release_id: str, reason: str) -> None:
        """Never spawn on ``release_id`` again; say so in the log and the published state."""
        if release_id in self.damaged:
            return
        self.damaged[release_id] = reason
        is_known_good = self.known_good is not None and self.known_good.id == release_id
        log.error(
            "release.damaged",
            master_pid=self.arbiter.pid,
            release=release_id,
            reason=reason,
            is_known_good=is_known_good,
            consequence=(
                "new workers cannot start until a rollout succeeds; the running workers serve"
                if is_known_good
                else "no worker is started on it"
            ),
        )
        self.publish()

    def _check_releases_in_use(self) -> None:
        now = time.monotonic()
        if now < self._next_release_check:
            return
        self._next_release_check = now + _RELEASE_CHECK_INTERVAL_S
        in_use = {r.id: r for r in (self.known_good, self.spawn_release) if r is not None}
        for rid in set(self.worker_release.values()):
            if rid in self.releases:
                in_use[rid] = self.releases[rid]
        for release in in_use.values():
            self.release_problem(release)

    def _override(self, name: str, fn: Callable[..., Any]) -> None:
        self._originals.setdefault(name, getattr(self.arbiter, name))
        setattr(self.arbiter, name, fn)

    def _wake(self, _signum: int, _frame: FrameType | None) -> None:
        self.arbiter.wakeup()  # signal-safe in every gunicorn version (queue put or pipe write)

    def plan_for_new_worker(self) -> SpawnPlan | None:
        """What the worker being forked runs (called in the child, from ``post_fork``).

        Also closes, in the child, the master's ends of the other workers' report pipes.
        """
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        release = self.spawn_release
        fds = self._spawn_fds
        if release is None or fds is None:
            return None
        master_end, report_fd, release_fd = fds
        with contextlib.suppress(OSError):
            os.close(master_end)
        release_dir = release.path if release_fd is None else Path(f"/proc/self/fd/{release_fd}")
        return SpawnPlan(
            release=release.id,
            release_dir=release_dir,
            app_dir=release.source,
            roots=self.roots,
            report_fd=report_fd,
            # a blue-green's new master, until promoted: a worker that fails exits unserved
            is_candidate=self.spawn_is_candidate or bool(getattr(self.arbiter, "master_pid", 0)),
            is_guarded=self.has_served,
            settings=self.settings,
            manifest=release.manifest,
            exports_metrics=self.exports_metrics,
        )

    # -- the boundary with gunicorn's loop --------------------------------------------------

    def contained(self, entry: str, fn: Callable[P, R], default: R) -> Callable[P, R]:
        """``fn``, but an exception from it is contained (``contain``) and ``default`` returned."""

        @functools.wraps(fn)
        def entry_point(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if os.getpid() != self.master_pid:  # a forked worker: gunicorn handles it
                    raise
                self.contain(entry, exc)
                return default

        return entry_point

    def contain(self, entry: str, exc: Exception) -> None:
        """hotpatch failed at ``entry``: log it, fail (and roll back) the rollout; never raise."""
        try:
            self._contain(entry, exc)
        except Exception:  # the last line of defence: the master loop must go on
            with contextlib.suppress(Exception):
                log.exception("controller.failed", entry="contain", master_pid=self.master_pid)

    def _contain(self, entry: str, exc: Exception) -> None:
        reason = f"hotpatch failed in the master ({entry}): {type(exc).__name__}: {exc}"
        signature = (entry, type(exc).__name__, str(exc)[:200])
        first = signature not in self._errors_seen
        self._errors_seen.add(signature)
        log.error(
            "controller.failed",
            master_pid=self.master_pid,
            entry=entry,
            error=f"{type(exc).__name__}: {exc}",
            rollout_id=self.rollout.rollout_id if self.rollout else self._starting,
            exc_info=exc if first else None,
        )
        rollout = self.rollout
        if rollout is None:
            if self._starting is not None:  # failed before any worker was touched
                rollout_id, self._starting = self._starting, None
                self.last_rollout = {
                    "id": rollout_id,
                    "outcome": "failed",
                    "stage": "internal",
                    "reason": reason,
                    "rolled_back": True,
                    "known_good": self.known_good.id if self.known_good else None,
                    "events": [],
                }
                log.error(
                    "rollout.failed",
                    master_pid=self.master_pid,
                    rollout_id=rollout_id,
                    stage="internal",
                    reason=reason,
                    rolled_back=True,
                )
            self.publish()
            return
        self._internal_failures += 1
        if rollout.is_finished:  # the decision was taken; only the bookkeeping after it failed
            self._close_finished(rollout, reason)
            return
        if self._internal_failures >= MAX_INTERNAL_FAILURES:
            self._abandon(rollout, reason)
            return
        rollout.abort(reason)
        self._log_failure()
        self._arm_timer(time.monotonic())  # drive the rollback at once
        self.publish()

    def _close_finished(self, rollout: Rollout, reason: str) -> None:
        """Record a finished rollout's own outcome when finishing it raised (nothing more)."""
        failure = rollout.failure
        target = self.releases.get(rollout.target)
        if rollout.outcome == "completed" and target is not None:
            self.known_good = self.spawn_release = target
        self.rollout = None
        self.candidates.clear()
        self._frozen = None
        self.spawn_is_candidate = False
        self.last_rollout = {
            "id": rollout.rollout_id,
            "outcome": rollout.outcome,
            "release": rollout.target,
            "known_good": self.known_good.id if self.known_good else None,
            "rolled_back": rollout.outcome == "rolled_back",
            "reason": failure.reason if failure else None,
            "stage": failure.stage if failure else None,
            "worker_pid": failure.pid if failure else None,
            "internal_error": reason,
            "events": self.rollout_events,
        }
        with contextlib.suppress(Exception):
            self._arm_timer(None)
        with contextlib.suppress(Exception):
            self._set_num_workers(self.size)
        self.publish()

    def _abandon(self, rollout: Rollout, reason: str) -> None:
        """The rollback cannot be driven: stop the new release's workers, let gunicorn respawn."""
        log.error(
            "rollout.abandoned",
            master_pid=self.master_pid,
            rollout_id=rollout.rollout_id,
            reason=reason,
            known_good=rollout.known_good,
        )
        self.rollout = None
        self.candidates.clear()
        self._frozen = None
        self.spawn_release = self.known_good
        self.spawn_is_candidate = False
        self.last_rollout = {
            "id": rollout.rollout_id,
            "outcome": "rollback_failed",
            "release": rollout.target,
            "known_good": self.known_good.id if self.known_good else None,
            "rolled_back": False,
            "stage": "internal",
            "reason": f"{reason}; the rollout was abandoned: workers not on the known-good "
            "release were stopped and gunicorn respawns known-good ones",
            "events": self.rollout_events,
        }
        with contextlib.suppress(Exception):
            self._arm_timer(None)
        with contextlib.suppress(Exception):
            self._set_num_workers(self.size)
        good = self.known_good.id if self.known_good else None
        for pid, rid in list(self.worker_release.items()):
            if rid != good:
                with contextlib.suppress(Exception):
                    self.arbiter.kill_worker(pid, signal.SIGTERM)
        self.pending = False
        self.publish()

    # -- wrapped arbiter methods ------------------------------------------------------------

    def _managed(self, manage: Callable[[], None]) -> Callable[[], None]:
        advance = self.contained("manage_workers", self._advance, None)

        def manage_workers() -> None:
            advance()
            manage()  # gunicorn's own: what it raises is gunicorn's, as without hotpatch

        return manage_workers

    def _advance(self) -> None:
        if self._reap_in_loop is not None:
            self._reap_in_loop()
        self.poll_sources_safely()
        try:
            self._check_releases_in_use()
        except Exception:  # a failed check is not a failed rollout: say so and go on
            log.exception("release.check_failed", master_pid=self.master_pid)
        self.serve_deploy_requests()
        self.tick()

    def _recorded(self, spawn: Callable[[], Any]) -> Callable[[], Any]:
        def spawn_worker() -> Any:
            before = set(self.arbiter.WORKERS)
            release = self.spawn_release
            if release is not None and self.release_problem(release) is not None:
                return None  # never a worker on a damaged release: the others keep serving
            read_fd, write_fd = open_report_pipe(self.master_pid)
            release_fd = None
            try:
                if release is not None and self.worker_gid is not None:
                    release_fd = os.open(
                        release.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                    )
                self._spawn_fds = (read_fd, write_fd, release_fd)
                result = spawn()
            except BaseException:
                if os.getpid() == self.master_pid:
                    os.close(read_fd)
                raise
            finally:
                if os.getpid() == self.master_pid:  # a worker keeps them (it leaves by SystemExit)
                    self._spawn_fds = None
                    os.close(write_fd)
                    if release_fd is not None:
                        os.close(release_fd)
            new = set(self.arbiter.WORKERS) - before
            if not new:
                os.close(read_fd)
            for pid in new:
                rid = release.id if release else "unknown"
                self.worker_release[pid] = rid
                self.worker_boot_release[pid] = rid
                self.worker_stage[pid] = "booting"
                self._readers[pid] = ReportReader(read_fd)
                if self.rollout is not None:
                    self.candidates.add(pid)
                    self.rollout.worker_spawned(pid, rid, time.monotonic())
                    self._event(
                        "worker.spawned",
                        worker_pid=pid,
                        release=rid,
                        is_candidate=self.spawn_is_candidate,
                    )
                else:
                    log.info("worker.spawned", worker_pid=pid, release=rid)
            return result

        return spawn_worker

    def _guarded(self, handle_chld: Callable[[], None]) -> Callable[[], None]:
        from gunicorn.errors import HaltServer  # type: ignore[import-untyped]

        def guarded() -> None:
            for _ in range(100):
                before = dict(self.arbiter.WORKERS)
                try:
                    handle_chld()
                    return
                except HaltServer as exc:
                    gone = [pid for pid in before if pid not in self.arbiter.WORKERS]
                    if not self.has_served:
                        raise
                    for pid in gone:
                        if pid in self.worker_release:
                            with contextlib.suppress(Exception):
                                before[pid].tmp.close()
                            log.error(
                                "worker.halt_prevented",
                                worker_pid=pid,
                                reason=getattr(exc, "reason", str(exc)),
                            )
                            self.child_exited(pid)

        return guarded

    # -- rollouts ---------------------------------------------------------------------------

    def request_rollout(self) -> None:
        """SIGHUP: start a rollout, or queue one (at most one pending)."""
        if self.disabled_reason is not None:
            log.error("rollout.refused", master_pid=self.arbiter.pid, reason=self.disabled_reason)
            rollout_id = self.next_rollout_id
            self.next_rollout_id += 1
            self.last_rollout = {
                "id": rollout_id,
                "outcome": "refused",
                "reason": self.disabled_reason,
                "rolled_back": False,
                "events": [],
            }
            self.publish()
            return
        if self.blue_green.is_active:  # gunicorn's documented revert: HUP to the old master
            ack = self.blue_green.switch_back(by="SIGHUP")
            log.info("bluegreen.hup_received", master_pid=self.master_pid, **ack)
            return
        if self.rollout is not None or self.deploy is not None:
            log.info(
                "rollout.queued",
                rollout_id=self.next_rollout_id,
                running_rollout_id=self.rollout.rollout_id if self.rollout else None,
                running_deploy_id=self.deploy["id"] if self.deploy else None,
                already_pending=self.pending,
            )
            self.pending = True
            self.publish()
            return
        self.start_rollout()

    def start_rollout(self, *, hold_s: float | None = None) -> None:
        """Snapshot the app directory and roll it out (with ``hold_s``: a canary rollout that
        holds after its first new worker for a verdict within ``hold_s`` seconds)."""
        assert self.known_good is not None
        rollout_id = self.next_rollout_id
        self.next_rollout_id += 1
        started = time.monotonic()
        self._starting = rollout_id  # an exception from here on fails this rollout (``contain``)
        try:
            release = self._new_release(rollout_id)
        except Exception as exc:  # anything: the rollout fails, the master keeps serving
            self._starting = None
            reason = f"{exc} (stage: snapshot)"
            if not isinstance(exc, SnapshotError):
                reason = f"{type(exc).__name__}: {exc} (stage: snapshot)"
            log.error("rollout.failed", rollout_id=rollout_id, stage="snapshot", reason=reason)
            self.last_rollout = {
                "id": rollout_id,
                "outcome": "failed",
                "stage": "snapshot",
                "reason": reason,
                "rolled_back": True,
                "known_good": self.known_good.id,
                "events": [],
            }
            self.publish()
            return
        self.releases[release.id] = release
        self.size = int(self.arbiter.num_workers)
        workers = {
            pid: self.worker_release.get(pid, self.known_good.id) for pid in self.arbiter.WORKERS
        }
        s = self.settings
        retire_s = s.retire_timeout_s or float(self.arbiter.cfg.graceful_timeout) + 5.0
        self.canary = None
        if hold_s is not None:
            self.canary = {"rollout_id": rollout_id, "hold_s": hold_s, "verdict": None}
        self.rollout = Rollout.start(
            rollout_id=rollout_id,
            target=release.id,
            known_good=self.known_good.id,
            workers=workers,
            size=self.size,
            now=started,
            hold_until=None if hold_s is None else started + hold_s,
            timeouts=Timeouts(
                boot_s=s.boot_timeout_s,
                health_s=s.health_timeout_s,
                settle_s=s.settle_s,
                retire_s=retire_s,
            ),
        )
        self.rollout_events = []
        self._failure_logged = False
        self._internal_failures = 0
        self._starting = None
        self._event(
            "rollout.started",
            release=release.id,
            known_good=self.known_good.id,
            workers=sorted(workers),
            size=self.size,
            files=release.files,
            app_dir=str(release.source),
        )
        self.tick()

    def tick(self) -> None:
        """Read worker reports, advance the rollout, publish the state. Called from the loop."""
        now = time.monotonic()
        for pid in list(self.worker_release):
            self._read_reports(pid, now)
        rollout = self.rollout
        if rollout is not None:
            self._track_resizes()
            for _ in range(4):
                actions = rollout.next_actions(time.monotonic())
                self._log_failure()
                if not actions:
                    break
                for action in actions:
                    self._execute(action)
                if rollout.is_finished:
                    break
            if rollout.is_finished:
                self._finish(rollout)
            else:
                self._freeze()
        if self.blue_green.is_active:
            self.contained("blue-green", self.blue_green.tick, None)()
        self._arm_timer(self._next_wakeup())
        self.publish()

    def _next_wakeup(self) -> float | None:
        """The earliest of the rollout's next deadline and the next source scan."""
        times = []
        if self.rollout is not None:
            times.append(self.rollout.next_deadline())
        if self._deploy_deadline is not None:
            times.append(self._deploy_deadline)
        times.append(self.blue_green.next_wakeup())
        if self.watcher is not None:
            times.append(self.watcher.next_scan_at())
        return min((t for t in times if t is not None), default=None)

    # -- watch mode -------------------------------------------------------------------------

    def _scan_root(self) -> str:
        """The app directory, resolved now (``current`` symlinks)."""
        return os.path.realpath(self.app_dir)

    def _start_watching(self) -> None:
        root = self._scan_root()
        started = time.monotonic()
        signature = scan_sources(root, rule=self.rule)
        scanned = time.monotonic()
        hashes = hash_sources(root, list(signature))
        self.watcher = ChangeDetector(
            signature, hashes, now=time.monotonic(), interval_s=self.settings.watch_interval_s
        )
        self.watch_stats.update(files=len(signature), scan_ms=round((scanned - started) * 1e3, 2))
        log.info(
            "watch.started",
            master_pid=self.arbiter.pid,
            app_dir=root,
            files=len(signature),
            interval_s=self.settings.watch_interval_s,
            scan_ms=self.watch_stats["scan_ms"],
            hash_ms=round((time.monotonic() - scanned) * 1e3, 2),
        )
        if self.arbiter.cfg.reload:
            log.warning(
                "watch.gunicorn_reload_detected",
                master_pid=self.arbiter.pid,
                advice=GUNICORN_RELOAD_WARNING,
            )

    def poll_sources_safely(self) -> None:
        """``poll_sources``, but a watch-mode bug must never take the master down: log, stop."""
        try:
            self.poll_sources()
        except Exception as exc:
            log.exception("watch.failed", master_pid=self.arbiter.pid, action="watching stopped")
            self.watcher = None
            self.watch_disabled_reason = f"watching failed: {type(exc).__name__}: {exc}"
            self.publish()

    def poll_sources(self) -> None:
        """Watch mode: scan the sources if a scan is due; request a rollout for new content."""
        watcher = self.watcher
        if watcher is None or not watcher.is_scan_due(time.monotonic()):
            return
        root = self._scan_root()
        started = time.monotonic()
        signature = scan_sources(root, rule=self.rule)
        now = time.monotonic()
        seen = watcher.observe(
            signature,
            now=now,
            scan_s=now - started,
            hash_of=lambda rel: hash_sources(root, [rel]).get(rel),
        )
        if not seen.is_batch:
            return
        if seen.unchanged:
            self.watch_stats["changes_ignored"] += 1
            self.watch_stats["last_ignored"] = sorted(seen.unchanged)
            log.debug(
                "watch.change_skipped", files=sorted(seen.unchanged), reason="content unchanged"
            )
        if seen.changed:
            self.watch_stats["rollouts_requested"] += 1
            self.watch_stats["last_changed"] = sorted(seen.changed)
            log.info(
                "watch.change_detected",
                master_pid=self.arbiter.pid,
                files=sorted(seen.changed),
                rollout_running=self.rollout is not None,
            )
            self.request_rollout()
        self.publish()

    def _execute(self, action: Action) -> None:
        rollout = self.rollout
        assert rollout is not None
        if isinstance(action, Spawn):
            release = self.releases[action.release]
            problem = self.release_problem(release)
            if problem is not None:
                rollout.spawn_failed(release.id, f"{problem} (stage: release)")
                return
            self.spawn_release = release
            self.spawn_is_candidate = True
            self._set_num_workers(len(self.arbiter.WORKERS) + 1)
            try:
                self._spawn()
            except Exception as exc:  # fork failed: EAGAIN, ENOMEM
                rollout.spawn_failed(release.id, f"cannot fork a worker: {exc}")
            finally:
                if os.getpid() == self.arbiter.pid:  # the child leaves through SystemExit
                    self.spawn_release = self.known_good
                    self.spawn_is_candidate = False
                    self._freeze()
        elif isinstance(action, Retire):
            self._event(
                "worker.retired", worker_pid=action.pid, release=self.worker_release.get(action.pid)
            )
            self._signal_worker(action.pid, signal.SIGTERM)
        elif isinstance(action, Kill):
            self._event(
                "worker.killed",
                worker_pid=action.pid,
                reason=action.reason,
                release=self.worker_release.get(action.pid),
            )
            self._signal_worker(action.pid, signal.SIGKILL)
        elif isinstance(action, Finish):
            pass

    def _signal_worker(self, pid: int, sig: int) -> None:
        self.arbiter.kill_worker(pid, sig)
        if pid not in self.arbiter.WORKERS:  # already gone (ESRCH): gunicorn forgot it
            self.child_exited(pid)

    def _finish(self, rollout: Rollout) -> None:
        duration = round(time.monotonic() - rollout.started_at, 3)
        target = self.releases[rollout.target]
        failure = rollout.failure
        if rollout.outcome == "completed":
            self.known_good = self.spawn_release = target
            self._event(
                "rollout.completed",
                release=target.id,
                duration_s=duration,
                workers=sorted(self.arbiter.WORKERS),
            )
        elif rollout.outcome == "rolled_back":
            self._event(
                "rollout.rolled_back",
                release=rollout.known_good,
                duration_s=duration,
                failed_release=target.id,
                reason=failure.reason if failure else None,
                workers=sorted(self.arbiter.WORKERS),
            )
        else:
            self._event(
                "rollout.rollback_failed",
                release=rollout.known_good,
                duration_s=duration,
                failed_release=target.id,
                reason=failure.reason if failure else None,
                level="error",
            )
        self.last_rollout = {
            "id": rollout.rollout_id,
            "outcome": rollout.outcome,
            "release": target.id,
            "known_good": self.known_good.id if self.known_good else None,
            "rolled_back": rollout.outcome == "rolled_back",
            "duration_s": duration,
            "reason": failure.reason if failure else None,
            "stage": failure.stage if failure else None,
            "worker_pid": failure.pid if failure else None,
            "error": failure.error if failure else None,
            "events": self.rollout_events,
            **self._canary_fields(rollout.rollout_id),
        }
        self.rollout = None
        self.candidates.clear()
        self._frozen = None
        self._arm_timer(None)
        self._set_num_workers(self.size)
        keep = {r for r in self.worker_release.values()}
        keep.update(self.worker_boot_release.values())
        keep.update(r.id for r in (self.known_good, self.spawn_release) if r is not None)
        if self.releases_dir is not None:
            for rid in prune_releases(self.releases_dir, keep):
                self.releases.pop(rid, None)
                self.damaged.pop(rid, None)  # gone on purpose now: nothing left to warn about
        outcome = {"completed": "deployed"}.get(str(rollout.outcome), str(rollout.outcome))
        strategy = "canary" if self._canary_fields(rollout.rollout_id) else "rolling"
        self._count("deploy_finished", strategy, outcome)
        if self.pending:
            self.pending = False
            self.publish()
            self.start_rollout()

    # -- deploys (requests from ``hotpatch deploy``) -----------------------------------------

    def serve_deploy_requests(self) -> None:
        """Answer the deploy requests waiting in the state directory; expire an abandoned deploy."""
        if not self.has_state_dir:
            return
        for token, request in take_requests(self.state_dir):
            if isinstance(request, str):
                ack: dict[str, Any] = {"ok": False, "reason": request}
            else:
                try:
                    ack = self._deploy_op(request)
                except Exception as exc:  # an answer, never an exception in gunicorn's loop
                    log.exception("deploy.request_failed", master_pid=self.master_pid)
                    ack = {"ok": False, "reason": f"internal error: {type(exc).__name__}: {exc}"}
            self.deploy_acks[token] = ack
            while len(self.deploy_acks) > _MAX_ACKS:
                self.deploy_acks.pop(next(iter(self.deploy_acks)))
        if self._deploy_deadline is not None and time.monotonic() >= self._deploy_deadline:
            self._expire_deploy()

    def _count(self, name: str, *args: Any) -> None:
        """Update a Prometheus metric (``_prometheus.<name>``); a failure is logged, never raised
        (the master's work goes on)."""
        if not self.exports_metrics:
            return
        try:
            from hotpatch.gunicorn import _prometheus

            getattr(_prometheus, name)(*args)
        except Exception:
            log.exception("metrics.update_failed", master_pid=self.master_pid, metric=name)

    def _canary_fields(self, rollout_id: int) -> dict[str, Any]:
        canary = self.canary
        if canary is None or canary.get("rollout_id") != rollout_id:
            return {}
        return {"strategy": "canary", "canary": dict(canary)}

    def _begin_canary(self, request: dict[str, Any]) -> dict[str, Any]:
        problem = self._begin_problem()
        if problem is not None:
            return {"ok": False, "reason": problem}
        hold_s = request.get("hold_s")
        if isinstance(hold_s, bool) or not isinstance(hold_s, (int, float)) or not hold_s > 0:
            return {"ok": False, "reason": "hold_s must be a positive number of seconds"}
        rollout_id = self.next_rollout_id
        self.start_rollout(hold_s=min(float(hold_s), MAX_DEPLOY_TIMEOUT_S))
        rollout = self.rollout
        if rollout is None or rollout.rollout_id != rollout_id:
            record = self.last_rollout or {}
            return {"ok": False, "reason": str(record.get("reason") or "the rollout did not start")}
        return {"ok": True, "rollout_id": rollout_id, "release": rollout.target}

    def _canary_verdict(self, request: dict[str, Any]) -> dict[str, Any]:
        rollout, canary = self.rollout, self.canary
        rollout_id = request.get("rollout_id")
        if rollout is None or canary is None or rollout.rollout_id != rollout_id:
            return {"ok": False, "reason": f"no canary rollout {rollout_id!r:.40} is running"}
        decision = request.get("decision")
        if decision not in ("pass", "fail"):
            return {"ok": False, "reason": f"unknown decision {decision!r:.40}"}
        reason = str(request.get("reason") or "")[:2000]
        figures = request.get("figures")
        now = time.monotonic()
        held = rollout.release_hold() if decision == "pass" else rollout.reject(reason, now)
        if not held:
            return {"ok": False, "reason": f"rollout {rollout_id} is {rollout.mode}, not holding"}
        canary["verdict"] = {
            "decision": decision,
            "reason": reason,
            "figures": flat_figures(figures) if isinstance(figures, dict) else {},
        }
        self._event(
            "canary.passed" if decision == "pass" else "canary.failed",
            release=rollout.target,
            reason=reason,
            level="info" if decision == "pass" else "warning",
        )
        self._log_failure()
        return {"ok": True}

    def _deploy_op(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "canary_begin":
            return self._begin_canary(request)
        if op == "canary_verdict":
            return self._canary_verdict(request)
        if op == "begin":
            return self._begin_deploy(request)
        if op == "blue_green":
            return self.blue_green.start(request)
        if op == "switch_back":
            return self.blue_green.switch_back(by="hotpatch deploy --switch-back")
        if op == "blue_green_done":
            return self.blue_green.adopt(request)
        deploy = self.deploy
        if deploy is None or request.get("deploy_id") != deploy["id"]:
            return {"ok": False, "reason": f"no deploy {request.get('deploy_id')!r:.40} is running"}
        if op == "switch":
            return self._switch_deploy()
        if op == "finish":
            return self._finish_deploy(request)
        return {"ok": False, "reason": f"unknown request {op!r:.40}"}

    def _begin_problem(self) -> str | None:
        """Why no deploy or canary may begin now (``_deploy.begin_problem``), or ``None``."""
        return begin_problem(
            disabled_reason=self.disabled_reason,
            rollout_id=self.rollout.rollout_id if self.rollout else None,
            deploy_id=self.deploy["id"] if self.deploy else None,
            workers={
                pid: (self.worker_release.get(pid), self._deploy_phase(pid))
                for pid in self.arbiter.WORKERS
            },
            known_good=self.known_good.id if self.known_good else None,
            size=self.size,
        )

    def _begin_deploy(self, request: dict[str, Any]) -> dict[str, Any]:
        problem = self._begin_problem()
        if problem is None and self.blue_green.is_active:
            problem = f"a blue-green switch is running ({self.blue_green.phase})"
        if problem is not None:
            return {"ok": False, "reason": problem}
        assert self.known_good is not None
        timeout = request.get("timeout_s")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            return {"ok": False, "reason": "timeout_s must be a positive number of seconds"}
        timeout = min(float(timeout), MAX_DEPLOY_TIMEOUT_S)
        deploy_id = self.next_deploy_id
        self.next_deploy_id += 1
        try:
            release = self._new_release(deploy_id, prefix="d")
        except Exception as exc:
            reason = f"{exc} (stage: snapshot)"
            log.error(
                "deploy.failed", master_pid=self.master_pid, deploy_id=deploy_id, reason=reason
            )
            return {"ok": False, "reason": reason}
        self.releases[release.id] = release
        python, other = changed_files(self.known_good.manifest, release.manifest)
        self._deploy_release = release
        self._deploy_participants = {pid: self.known_good.id for pid in self.arbiter.WORKERS}
        self._deploy_deadline = time.monotonic() + timeout + DEPLOY_GRACE_S
        strategy = str(request.get("strategy", ""))[:40]
        self.deploy = {
            "id": deploy_id,
            "strategy": strategy,
            "release": release.id,
            "known_good": self.known_good.id,
            "phase": "prepared",
            "workers": sorted(self._deploy_participants),
            "started": time.time(),
        }
        log.info(
            "deploy.started",
            master_pid=self.master_pid,
            deploy_id=deploy_id,
            release=release.id,
            known_good=self.known_good.id,
            strategy=strategy,
            workers=sorted(self._deploy_participants),
            changed=python + other,
        )
        self._arm_timer(self._next_wakeup())
        return {
            "ok": True,
            "deploy_id": deploy_id,
            "release": release.id,
            "release_dir": str(release.path),
            "known_good": self.known_good.id,
            "workers": sorted(self._deploy_participants),
            "changed_python": python[:200],
            "changed_other": other[:200],
            "changed_count": len(python) + len(other),
        }

    def _deploy_phase(self, pid: int) -> str:
        phase = self.worker_stage.get(pid, "booting")
        if phase == "ready" and pid not in self.listening:
            return "still opening its control socket"
        return phase

    def _switch_deploy(self) -> dict[str, Any]:
        deploy, release = self.deploy, self._deploy_release
        assert deploy is not None and release is not None
        if deploy["phase"] != "prepared":
            return {"ok": False, "reason": f"deploy {deploy['id']} is {deploy['phase']}"}
        problem = switch_problem(
            self._deploy_participants,
            {pid: self.worker_release.get(pid) for pid in self.arbiter.WORKERS},
        )
        if problem is None:
            problem = self.release_problem(release)
        if problem is not None:
            log.warning("deploy.switch_refused", master_pid=self.master_pid, reason=problem)
            return {"ok": False, "reason": problem}
        self.spawn_release = release
        deploy["phase"] = "committing"
        log.info("deploy.switched", master_pid=self.master_pid, deploy_id=deploy["id"])
        return {"ok": True}

    def _finish_deploy(self, request: dict[str, Any]) -> dict[str, Any]:
        deploy, release = self.deploy, self._deploy_release
        assert deploy is not None and release is not None
        outcome = request.get("outcome")
        if outcome not in _DEPLOY_OUTCOMES:
            return {"ok": False, "reason": f"unknown outcome {outcome!r:.40}"}
        if outcome == "deployed" and deploy["phase"] != "committing":
            return {"ok": False, "reason": f"deploy {deploy['id']} was never switched"}
        retire = [p for p in pids(request.get("retire") or []) if p in self._deploy_participants]
        reason = request.get("reason")
        self._end_deploy(
            str(outcome),
            reason=str(reason)[:2000] if reason else None,
            retire=retire,
            summary=request.get("summary") if isinstance(request.get("summary"), dict) else None,
        )
        return {"ok": True}

    def _expire_deploy(self) -> None:
        deploy = self.deploy
        if deploy is None:
            self._deploy_deadline = None
            return
        if deploy["phase"] == "prepared":
            reason = "the deploy's coordinator did not finish it in time; nothing was committed"
            self._end_deploy("expired", reason=reason, retire=[])
            return
        reason = (
            "the deploy's coordinator did not finish it in time after the commit began; which "
            "workers committed is unknown, so every worker is replaced by one on the known-good "
            "release"
        )
        self._end_deploy("expired", reason=reason, retire=sorted(self.arbiter.WORKERS))

    def _end_deploy(
        self,
        outcome: str,
        *,
        reason: str | None,
        retire: list[int],
        summary: dict[str, Any] | None = None,
    ) -> None:
        deploy, release = self.deploy, self._deploy_release
        assert deploy is not None and release is not None
        if outcome == "deployed":
            self.known_good = self.spawn_release = release
            for pid in self._deploy_participants:
                if pid in self.worker_release:
                    self.worker_release[pid] = release.id
        else:
            self.spawn_release = self.known_good
            retire = sorted(
                set(retire) | {p for p, r in self.worker_release.items() if r == release.id}
            )
        for pid in retire:
            if pid in self.arbiter.WORKERS:
                log.warning(
                    "deploy.worker_retired",
                    master_pid=self.master_pid,
                    deploy_id=deploy["id"],
                    worker_pid=pid,
                    release=self.worker_release.get(pid),
                )
                self._signal_worker(pid, signal.SIGTERM)
        self._count("deploy_finished", str(deploy.get("strategy") or "in-place"), outcome)
        started = deploy.get("started")
        self.last_deploy = {
            **deploy,
            "phase": "finished",
            "outcome": outcome,
            "reason": reason,
            "retired": retire,
            "known_good": self.known_good.id if self.known_good else None,
            "duration_s": round(time.time() - started, 3) if isinstance(started, float) else None,
            **({"summary": summary} if summary else {}),
        }
        level = "info" if outcome in ("deployed", "unchanged") else "warning"
        getattr(log, level)(
            "deploy.finished",
            master_pid=self.master_pid,
            deploy_id=deploy["id"],
            outcome=outcome,
            release=release.id,
            known_good=self.known_good.id if self.known_good else None,
            reason=reason,
            retired=retire,
        )
        self.deploy = None
        self._deploy_release = None
        self._deploy_participants = {}
        self._deploy_deadline = None
        keep = set(self.worker_release.values())
        keep.update(self.worker_boot_release.values())
        keep.update(r.id for r in (self.known_good, self.spawn_release) if r is not None)
        if self.releases_dir is not None:
            for rid in prune_releases(self.releases_dir, keep):
                self.releases.pop(rid, None)
                self.damaged.pop(rid, None)
        if self.pending and self.rollout is None:
            self.pending = False
            self.publish()
            self.start_rollout()

    def _log_failure(self) -> None:
        rollout = self.rollout
        if rollout is None or rollout.failure is None or self._failure_logged:
            return
        self._failure_logged = True
        f = rollout.failure
        self._event(
            "rollout.failed",
            release=f.release,
            worker_pid=f.pid,
            stage=f.stage,
            reason=f.reason,
            error=f.error or None,
            known_good=rollout.known_good,
            level="error",
        )

    def _track_resizes(self) -> None:
        """TTIN/TTOU during a rollout change the size used after it."""
        if self._frozen is not None and self.arbiter.num_workers != self._frozen:
            delta = int(self.arbiter.num_workers) - self._frozen
            self.size = max(1, self.size + delta)
            log.info("rollout.resize_deferred", size_after_rollout=self.size)
            self._frozen = int(self.arbiter.num_workers)

    def _freeze(self) -> None:
        self._set_num_workers(len(self.arbiter.WORKERS))
        self._frozen = len(self.arbiter.WORKERS)

    def _set_num_workers(self, value: int) -> None:
        if self.arbiter.num_workers != value:
            self.arbiter.num_workers = value

    @staticmethod
    def _arm_timer(deadline: float | None) -> None:
        if deadline is None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            return
        signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 0.005) + 0.005)

    # -- worker reports ---------------------------------------------------------------------

    def _read_reports(self, pid: int, now: float) -> None:
        reader = self._readers.get(pid)
        if reader is None:
            return
        reports = reader.read()
        for problem in reader.rejected:
            log.warning(
                "report.rejected", master_pid=self.master_pid, worker_pid=pid, reason=problem
            )
        for report in reports:
            release = self.worker_release.get(pid, "unknown")
            if report.release != release:
                log.warning(
                    "report.rejected",
                    master_pid=self.master_pid,
                    worker_pid=pid,
                    reason=f"reports release {report.release!r:.80}, but runs {release!r}",
                )
                continue
            self._on_stage(pid, release, report.stage, report, now)

    def _on_stage(self, pid: int, release: str, name: str, stage: StageReport, now: float) -> None:
        rollout = self.rollout
        if rollout is not None and pid not in self.candidates:
            rollout = None  # a worker that was serving before the rollout: nothing to decide
        if name in ("loaded", "healthy", "failed"):
            self.worker_stage[pid] = {"loaded": "loaded", "healthy": "ready"}.get(name, "failed")
        if name == "loaded":
            if self.known_good is not None and release == self.known_good.id:
                self.has_served = True
            if rollout is not None:
                rollout.worker_loaded(pid, now)
                self._event(
                    "worker.loaded",
                    worker_pid=pid,
                    release=release,
                    boot_s=round(stage.duration_s, 3),
                    level="debug",
                )
        elif name == "healthy":
            if rollout is not None:
                rollout.worker_healthy(pid, now)
                self._event(
                    "worker.healthy",
                    worker_pid=pid,
                    release=release,
                    check_s=round(stage.duration_s, 3),
                )
        elif name == "failed":
            if self.rollout is None:
                self.worker_failure_count += 1
                self.worker_failures = [
                    *self.worker_failures[-4:],
                    {"pid": pid, "stage": stage.failed_at, "reason": stage.reason[:1000]},
                ]
            if stage.failed_at == "release":
                self.mark_damaged(release, stage.reason)
            stage_name: FailStage = "health" if stage.failed_at == "health" else "load"
            if rollout is not None:
                rollout.worker_failed(pid, stage_name, stage.reason, stage.error, now)
            self._event(
                "worker.failed",
                worker_pid=pid,
                release=release,
                stage=stage_name,
                reason=stage.reason,
                level="warning",
            )
        elif name == "recycled":
            self.recycled.add(pid)
        elif name == "listening":
            self.listening.add(pid)

    def child_exited(self, pid: int) -> None:
        """A worker was reaped (``child_exit`` hook, or the halt guard)."""
        if pid not in self.worker_release:
            return
        self._read_reports(pid, time.monotonic())
        reader = self._readers.pop(pid, None)
        if reader is not None:
            reader.close()
        release = self.worker_release.pop(pid)
        self.worker_boot_release.pop(pid, None)
        stage = self.worker_stage.pop(pid, None)
        is_recycled = pid in self.recycled
        if not is_recycled and self.rollout is None and stage != "failed":
            self.worker_crash_count += 1
        self.recycled.discard(pid)
        self.listening.discard(pid)
        if self.rollout is not None:
            self.rollout.worker_exited(pid, time.monotonic(), is_recycled=is_recycled)
            self._event(
                "worker.exited",
                worker_pid=pid,
                release=release,
                is_recycled=is_recycled,
                level="debug",
            )

    # -- published state --------------------------------------------------------------------

    def _event(self, name: str, *, level: str = "info", **fields: Any) -> None:
        rollout = self.rollout
        rlog = log.bind(master_pid=self.arbiter.pid)
        if rollout is not None:
            rlog = rlog.bind(rollout_id=rollout.rollout_id)
            entry = {"event": name, "t": round(time.monotonic() - rollout.started_at, 3)}
            entry.update({k: v for k, v in fields.items() if k != "error"})
            if len(self.rollout_events) < _MAX_EVENTS:
                self.rollout_events.append(entry)
        getattr(rlog, level)(name, **fields)

    def snapshot_state(self) -> dict[str, Any]:
        """The JSON published in ``state.json``."""
        rollout = self.rollout
        workers = []
        for pid in sorted(self.arbiter.WORKERS):
            phase = self.worker_stage.get(pid, "booting")
            if rollout is not None and pid in rollout.workers:
                phase = rollout.workers[pid].phase
            workers.append(
                {
                    "pid": pid,
                    "release": self.worker_release.get(pid),
                    "phase": phase,
                    "listening": pid in self.listening,
                }
            )
        current = None
        if rollout is not None:
            current = {
                "id": rollout.rollout_id,
                "release": rollout.target,
                "known_good": rollout.known_good,
                "mode": rollout.mode,
                "events": self.rollout_events,
                **self._canary_fields(rollout.rollout_id),
            }
            canary = rollout.canary
            if canary is not None and "canary" in current:
                current["canary"] = {**current["canary"], "pid": canary.pid, "holding": True}
        return {
            "master_pid": self.arbiter.pid,
            "master_start_time": self.start_time,
            "master_uid": os.getuid(),
            "app_dir": str(self.app_dir),
            "known_good": self.known_good.id if self.known_good else None,
            "rolling": self.disabled_reason is None,
            "disabled_reason": self.disabled_reason,
            "size": self.size,
            "workers": workers,
            "next_rollout_id": self.next_rollout_id,
            "pending": self.pending,
            "rollout": current,
            "last_rollout": self.last_rollout,
            "watch": self._watch_state(),
            "releases_dir": str(self.releases_dir) if self.releases_dir else None,
            "damaged_releases": dict(self.damaged),
            "spawn_release": self.spawn_release.id if self.spawn_release else None,
            "deploy": self.deploy,
            "last_deploy": self.last_deploy,
            "next_deploy_id": self.next_deploy_id,
            "deploy_acks": self.deploy_acks,
            **self.blue_green.snapshot(),
            "parent_master_pid": getattr(self.arbiter, "master_pid", 0) or None,
            "worker_failures": self.worker_failures,
            "worker_failure_count": self.worker_failure_count,
            "worker_crash_count": self.worker_crash_count,
        }

    def _watch_state(self) -> dict[str, Any] | None:
        if self.watcher is None and self.watch_disabled_reason is None:
            return None
        return {
            "enabled": self.watcher is not None,
            "disabled_reason": self.watch_disabled_reason,
            "interval_s": self.settings.watch_interval_s,
            **self.watch_stats,
        }

    def publish(self) -> None:
        """Write ``state.json`` if the state changed; a failure is logged (once), not raised."""
        running = self.rollout is not None or self.deploy is not None
        if self.exports_metrics and running != self._in_progress:
            self._in_progress = running
            self._count("deploy_in_progress", running)
        if not self.has_state_dir:
            return
        state = self.snapshot_state()
        text = json.dumps(state, sort_keys=True, default=str)
        if text == self._published:
            return
        try:
            write_state(self.state_dir, state)
        except OSError as exc:
            if str(exc) != self._publish_error:
                self._publish_error = str(exc)
                log.error("state.publish_failed", master_pid=self.master_pid, error=str(exc))
            return
        self._published = text
        self._publish_error = ""

    def cleanup(self) -> None:
        """The master is exiting: stop the timer and remove the state directory."""
        with contextlib.suppress(Exception):
            self._arm_timer(None)
        with contextlib.suppress(Exception):
            self.blue_green._close()
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        if self.releases_dir is not None:
            shutil.rmtree(self.releases_dir, ignore_errors=True)
        if not self.has_state_dir:
            return
        if self.state_dir.is_dir() and self.state_dir.name.startswith("gunicorn-"):
            shutil.rmtree(self.state_dir, ignore_errors=True)
        elif self.state_dir.is_dir():
            for sub in ("releases", "reports", "requests"):
                shutil.rmtree(self.state_dir / sub, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.state_dir / "state.json").unlink()


_controller: Controller | None = None


def install_controller(arbiter: Any) -> Controller:
    """Create and install the controller for this master (``when_ready``).

    A ``HOTPATCH_*`` setting error stops gunicorn with one line and exit code 2
    (``exit_on_config_error``); any other failure leaves gunicorn serving without rollouts.
    """
    global _controller
    if _controller is not None and _controller.arbiter is arbiter:
        return _controller
    try:
        settings = load_settings(_environ_of(arbiter))
    except ConfigError as exc:
        exit_on_config_error(arbiter, exc)
    exports_metrics = False
    if settings.exports_metrics:  # before any worker is forked, and before any state is made
        from hotpatch.gunicorn import _prometheus

        try:
            _prometheus.start_master(
                arbiter.pid, port=settings.metrics_port, addr=settings.metrics_addr
            )
        except ConfigError as exc:
            exit_on_config_error(arbiter, exc)
        except Exception:  # never a reason not to serve: the app runs without metrics
            log.exception("metrics.disabled", master_pid=arbiter.pid)
        else:
            exports_metrics = True
    _controller = Controller(arbiter, settings)
    _controller.exports_metrics = exports_metrics
    _controller.install()
    return _controller


def check_settings(arbiter: Any) -> None:
    """Validate the ``HOTPATCH_*`` settings before gunicorn listens (``nworkers_changed``).

    gunicorn calls ``nworkers_changed`` first while it sets the arbiter up: before it logs, writes
    its pidfile or binds a socket. The values gunicorn's ``env`` setting will add count too.
    """
    try:
        environ = _environ_of(arbiter)
        settings = load_settings(environ)
        if settings.state_dir is not None:
            _check_state_dir_setting(settings.state_dir)
        elif environ.get(ENV_RUNTIME_DIR):
            _check_runtime_dir_setting()
        if settings.exports_metrics:
            from hotpatch.gunicorn import _prometheus

            _prometheus.check_multiproc_dir(environ)
    except ConfigError as exc:
        exit_on_config_error(arbiter, exc)


def _check_runtime_dir_setting() -> None:
    """An explicit ``HOTPATCH_RUNTIME_DIR`` must be usable (a default one planted by someone else
    is not a setting error: the master then serves without rollouts and says why)."""
    try:
        runtime_dir()
    except FileNotFoundError as exc:
        raise ConfigError(f"{ENV_RUNTIME_DIR}: {exc.filename}: does not exist") from None
    except PermissionError as exc:
        raise ConfigError(f"{ENV_RUNTIME_DIR}: {exc}") from None


def _check_state_dir_setting(path: Path) -> None:
    try:
        check_private_dir(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise ConfigError(
                f"HOTPATCH_STATE_DIR / configure(state_dir=...): {path}: its parent directory "
                "does not exist"
            ) from None
    except PermissionError as exc:  # InsecurePath names the path and the problem
        raise ConfigError(f"HOTPATCH_STATE_DIR / configure(state_dir=...): {exc}") from None


def exit_on_config_error(arbiter: Any, exc: ConfigError) -> NoReturn:
    """Print one line naming the setting and the problem; stop gunicorn with exit code 2."""
    print(f"hotpatch: {exc}", file=sys.stderr, flush=True)
    pidfile = getattr(arbiter, "pidfile", None)
    if pidfile is not None:
        with contextlib.suppress(Exception):
            pidfile.unlink()
    raise SystemExit(2)


def _environ_of(arbiter: Any) -> dict[str, str]:
    env = dict(os.environ)
    extra = getattr(getattr(arbiter, "cfg", None), "env", None)
    if isinstance(extra, dict):
        env.update({str(k): str(v) for k, v in extra.items()})
    return env


def run_contained(
    entry: str, fn: Callable[P, R], default: R, /, *args: P.args, **kwargs: P.kwargs
) -> R:
    """Call ``fn`` for gunicorn's master (a hook): an exception is contained, never raised.

    The same containment as ``Controller.contained`` (the controller's when there is one).
    """
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        controller = _controller
        if controller is not None:
            if os.getpid() != controller.master_pid:
                raise
            controller.contain(entry, exc)
        else:
            with contextlib.suppress(Exception):
                log.exception("controller.failed", entry=entry, master_pid=os.getpid())
        return default


def current_controller() -> Controller | None:
    """The controller of this master (or, in a worker, of the master that forked it)."""
    return _controller
