"""Worker side: verify and pin the release, report the app load, health-check the app, report.

Runs in a freshly forked worker: ``prepare_worker`` from ``post_fork`` (before gunicorn imports the
app), ``check_worker`` from ``post_worker_init`` (after it, before the first request),
``note_worker_exit`` from ``worker_exit``.

After its checks, ``check_worker`` also makes the worker reachable through the control channel
(``hotpatch.control.listen_release``), with no code in the app: the worker patches the modules
whose files lie in its release's snapshot directory (the app's own code, never the standard
library or installed packages), and takes part in in-place deploys (docs/deploy.md). Its deploy
health check is the same probe as at boot (``health_problem``; in a uvicorn worker, the ASGI
probe on the serving loop, whose thread also runs the commit: ``_asgi``). When a deploy commits, the
worker moves ``sys.path`` to the new release (``_switched``) and reports it from then on.

The loaded WSGI app is wrapped in ``_metrics.RecordingMiddleware`` (requests, status classes,
exceptions, latency, per release), read through the control socket's ``stats`` request (the
canary judge) and, with the Prometheus settings, exported (``_prometheus``). Health probes call
the app inside it: they are not counted.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from hotpatch._log import get_logger
from hotpatch.gunicorn._asgi import (
    Probe,
    _is_uvicorn_worker,
    commit_thread,
    guard_asgi_worker,
    lifelong_frames,
    serves_asgi,
    serving_probe,
)
from hotpatch.gunicorn._diagnose import describe_exception
from hotpatch.gunicorn._metrics import (
    ASGIRecordingMiddleware,
    Recorder,
    RecordingMiddleware,
    unwrap,
)
from hotpatch.gunicorn._releases import Manifest, pin_worker, verify_release
from hotpatch.gunicorn._settings import Settings
from hotpatch.gunicorn._state import WAKE_SIGNAL, StageReport, send_report
from hotpatch.health import is_asgi_app, probe_wsgi

log = get_logger(__name__)

EXIT_LOAD_FAILED = 70
"""A rollout candidate that cannot load the app exits with this (never gunicorn's 3 or 4, which
would halt the master)."""
EXIT_HEALTH_FAILED = 71


@dataclass(frozen=True)
class SpawnPlan:
    """What the master decided for the worker it is forking (read in the child after fork).

    Attributes:
        release: the release id.
        release_dir: its snapshot.
        app_dir: the app directory the snapshot was taken from.
        roots: the spellings of ``app_dir`` on ``sys.path``.
        report_fd: the write end of this worker's report pipe (inherited through the fork).
        is_candidate: a rollout candidate: a failed load or check exits (with ``EXIT_*``) instead
            of serving; outside rollouts the checks only log.
        is_guarded: a failed load exits with ``EXIT_LOAD_FAILED`` rather than gunicorn's codes
            (set once the server has a known-good release that served).
        settings: the rollout settings.
        manifest: what the release must hold; verified (every byte) before the worker pins
            itself to it. Empty: not verified (a plan made without a snapshot).
        exports_metrics: the master runs the Prometheus export (``_prometheus``): count into it.
    """

    release: str
    release_dir: Path
    app_dir: Path
    roots: tuple[Path, ...]
    report_fd: int
    is_candidate: bool
    is_guarded: bool
    settings: Settings = field(default_factory=Settings)
    manifest: Manifest = field(default_factory=dict, repr=False)
    exports_metrics: bool = False


@dataclass
class _WorkerState:
    plan: SpawnPlan
    pid: int
    listener: Any = None
    recorder: Recorder = field(default_factory=Recorder)
    earlier: list[str] = field(default_factory=list)
    """The releases this worker ran before its in-place deploys (the last one first undone)."""


_current: _WorkerState | None = None


def prepare_worker(worker: Any, plan: SpawnPlan) -> None:
    """Pin this worker to ``plan.release`` and watch its app load (``post_fork``)."""
    global _current
    # The master's handlers must not run here; until gunicorn installs the worker's own (just
    # before it imports the app), a stop signal simply ends this not yet serving process.
    for sig in (
        WAKE_SIGNAL,
        signal.SIGIO,
        signal.SIGALRM,
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGHUP,
    ):
        signal.signal(sig, signal.SIG_DFL)
    _current = _WorkerState(plan, worker.pid)
    if plan.manifest:
        started = time.monotonic()
        problem = verify_release(plan.release_dir, plan.manifest)
        if problem is not None:  # never load from anywhere else: leave before the app import
            reason = f"release {plan.release} is damaged: {problem} (stage: release)"
            log.error("release.damaged", worker_pid=worker.pid, release=plan.release, reason=reason)
            _publish(
                StageReport(
                    "failed",
                    failed_at="release",
                    reason=reason,
                    error=reason,
                    duration_s=time.monotonic() - started,
                )
            )
            raise SystemExit(EXIT_LOAD_FAILED)
    purged = pin_worker(plan.release_dir, plan.roots)
    if purged:
        log.debug("release.modules_purged", worker_pid=worker.pid, modules=purged)
    load = worker.load_wsgi
    app_module = _app_module(worker)

    def load_wsgi() -> None:
        started = time.monotonic()
        try:
            load()
        except SystemExit as exc:
            if exc.code in (0, None):
                raise
            _fail_load(exc, app_module, started)
        except Exception as exc:
            _fail_load(exc, app_module, started)
        _record_requests(worker)
        _publish(StageReport("loaded", duration_s=time.monotonic() - started))

    worker.load_wsgi = load_wsgi


def _record_requests(worker: Any) -> None:
    """Wrap the loaded app in the recording middleware (its ASGI form under uvicorn workers)."""
    state = _require()
    if isinstance(worker.wsgi, (RecordingMiddleware, ASGIRecordingMiddleware)):
        return
    middleware: type[RecordingMiddleware] | type[ASGIRecordingMiddleware] = RecordingMiddleware
    if serves_asgi(worker):
        if not (_is_uvicorn_worker(worker) and is_asgi_app(worker.wsgi)):
            return  # a mismatch the health check refuses: nothing to record
        middleware = ASGIRecordingMiddleware
    sink = metrics_path = serve_metrics = None
    settings = state.plan.settings
    if state.plan.exports_metrics:
        try:
            from hotpatch.gunicorn import _prometheus

            sink = _prometheus.worker_sink(worker.pid)
            _prometheus.serving_release(None, state.plan.release)
            if settings.metrics_path is not None:
                metrics_path, serve_metrics = settings.metrics_path, _prometheus.serve_metrics
        except Exception:  # never a reason not to serve: the counts for the canary go on
            sink = metrics_path = serve_metrics = None
            log.exception("metrics.unavailable", worker_pid=worker.pid)
    worker.wsgi = middleware(
        worker.wsgi,
        recorder=state.recorder,
        release_of=lambda: state.plan.release,
        sink=sink,
        metrics_path=metrics_path,
        serve_metrics=serve_metrics,
    )


def _fail_load(exc: BaseException, app_module: str | None, started: float) -> NoReturn:
    state = _require()
    reason, error = describe_exception(
        exc,
        stage="load",
        release_dir=state.plan.release_dir,
        app_dir=state.plan.app_dir,
        app_module=app_module,
    )
    _publish(
        StageReport(
            "failed",
            failed_at="load",
            reason=reason,
            error=error,
            duration_s=time.monotonic() - started,
        )
    )
    if state.plan.is_guarded or state.plan.is_candidate:
        raise SystemExit(EXIT_LOAD_FAILED) from None
    raise exc


def _fail_startup(exc: BaseException, started: float) -> int | None:
    """Report a failed ASGI lifespan startup; the exit code a guarded worker leaves with."""
    state = _require()
    reason, error = describe_exception(
        exc,
        stage="lifespan startup",
        release_dir=state.plan.release_dir,
        app_dir=state.plan.app_dir,
    )
    report = StageReport("failed", failed_at="load", reason=reason, error=error)
    _publish(replace(report, duration_s=time.monotonic() - started))
    return EXIT_LOAD_FAILED if state.plan.is_guarded or state.plan.is_candidate else None


def check_worker(worker: Any) -> None:
    """Health-check this worker's loaded app (``post_worker_init``).

    A rollout candidate that fails exits with ``EXIT_HEALTH_FAILED`` before taking any request.
    An ASGI app is checked later, in the worker's event loop after its lifespan startup
    (``_asgi``).
    """
    state = _current
    if state is None:
        return
    if serves_asgi(worker):
        guard_asgi_worker(
            worker,
            check=lambda probe: _check(worker, state, probe),
            on_startup_failed=_fail_startup,
            timeout_s=state.plan.settings.health_timeout_s,
        )
        return
    _check(worker, state, probe_wsgi)


def _check(worker: Any, state: _WorkerState, probe: Probe) -> None:
    settings = state.plan.settings
    started = time.monotonic()
    port = _listen_port(worker)
    path = settings.health_path or "/"
    error = _run_with_deadline(
        lambda: _run_checks(worker, settings, port, probe), settings.health_timeout_s
    )
    duration = time.monotonic() - started
    if error is None:
        _publish(StageReport("healthy", duration_s=duration))
        _listen_in_background(worker)
        return
    if isinstance(error, TimeoutError):
        reason = (
            f"GET {path} and the checks did not finish within "
            f"{settings.health_timeout_s:g} s (stage: health)"
        )
        text = reason
    elif isinstance(error, HealthCheckFailed):
        reason = f"{error} (stage: health)"
        text = f"{error}\nresponse body: {error.body[:2000].decode('utf-8', 'replace')}"
    else:
        reason, text = describe_exception(
            error,
            stage="health",
            release_dir=state.plan.release_dir,
            app_dir=state.plan.app_dir,
        )
    _publish(
        StageReport("failed", failed_at="health", reason=reason, error=text, duration_s=duration)
    )
    if state.plan.is_candidate:
        raise SystemExit(EXIT_HEALTH_FAILED)
    log.error(
        "health_check.failed", worker_pid=worker.pid, release=state.plan.release, reason=reason
    )
    _listen_in_background(worker)


def _listen_in_background(worker: Any) -> None:
    """Open the control socket without delaying the first request (importing the engine takes
    a while); the master is told when it is open, and deploys wait for it."""

    def run() -> None:
        if start_listening(worker):
            _publish(StageReport("listening"))

    threading.Thread(target=run, name="hotpatch-listen", daemon=True).start()


def _run_checks(worker: Any, settings: Settings, port: int, probe: Probe = probe_wsgi) -> None:
    path = settings.health_path or "/"
    app = unwrap(worker.wsgi)
    result = probe(app, path, port=port)
    if settings.health_path is not None and not result.is_success:
        message = f"GET {path} answered {result.status}, expected 2xx"
        raise HealthCheckFailed(message, result.body)
    if settings.health_path is None and result.is_server_error:
        raise HealthCheckFailed(f"GET {path} answered {result.status}", result.body)
    for check in settings.checks:
        if check(app) is False:
            raise HealthCheckFailed(f"check {_name(check)} returned False", b"")


def health_problem(worker: Any) -> str | None:
    """This worker's health checks now (the boot probe and the user's checks): the problem, or
    ``None`` when healthy. Used by in-place deploys after the commit (phase 3)."""
    state = _require()
    settings = state.plan.settings
    probe = serving_probe(settings.health_timeout_s) if serves_asgi(worker) else probe_wsgi
    error = _run_with_deadline(
        lambda: _run_checks(worker, settings, _listen_port(worker), probe),
        settings.health_timeout_s,
    )
    if error is None:
        return None
    if isinstance(error, TimeoutError):
        return (
            f"GET {settings.health_path or '/'} and the checks did not finish within "
            f"{settings.health_timeout_s:g} s (stage: health)"
        )
    if isinstance(error, HealthCheckFailed):
        return f"{error} (stage: health)"
    reason, _ = describe_exception(
        error, stage="health", release_dir=state.plan.release_dir, app_dir=state.plan.app_dir
    )
    return reason


def start_listening(worker: Any) -> bool:
    """Make this worker reachable through its control socket (patch, status, deploy sessions).

    Returns whether it listens. A failure (an unsafe runtime directory) is logged; the worker
    serves as before, and deploys are refused while it does not listen.
    """
    state = _current
    if state is None:
        return False
    if state.listener is not None:
        return True
    try:
        from hotpatch.control.server import listen_release
        from hotpatch.control.session import ReleaseHooks

        state.listener = listen_release(
            ReleaseHooks(
                release=state.plan.release,
                release_dir=str(state.plan.release_dir),
                health=lambda: health_problem(worker),
                switched=_switched,
                stats=lambda since: state.recorder.snapshot(since=since),
                commit_thread=commit_thread if serves_asgi(worker) else None,
                lifelong=lifelong_frames if serves_asgi(worker) else None,
            )
        )
    except Exception as exc:  # never a reason not to serve
        log.warning(
            "deploy.unavailable",
            worker_pid=state.pid,
            reason=f"the control socket could not be opened: {type(exc).__name__}: {exc}",
        )
        return False
    return True


def _switched(release: str, release_dir: str) -> None:
    """A deploy committed (or rolled back): import from ``release_dir``, report ``release``."""
    state = _require()
    is_undo = bool(state.earlier) and state.earlier[-1] == release
    if is_undo:
        state.earlier.pop()
    else:
        state.earlier.append(state.plan.release)
    if state.plan.exports_metrics:
        try:
            from hotpatch.gunicorn import _prometheus

            _prometheus.patched("rolled_back" if is_undo else "applied")
            _prometheus.serving_release(state.plan.release, release)
        except Exception:  # a metric must never stop a deploy's switch
            log.exception("metrics.update_failed", worker_pid=state.pid)
    old = str(state.plan.release_dir).rstrip("/")

    def move(entries: list[str]) -> None:
        entries[:] = [
            release_dir + e[len(old) :] if e == old or e.startswith(old + "/") else e
            for e in entries
        ]

    move(sys.path)
    # A package's submodule imported later (a Django template library, a lazy import) is found
    # through the package's own __path__, not sys.path: it must come from the new release too.
    for module in list(sys.modules.values()):
        path = getattr(module, "__path__", None)
        if type(path) is list and all(isinstance(e, str) for e in path):
            move(path)
    importlib.invalidate_caches()
    sys.path_importer_cache.clear()
    state.plan = replace(state.plan, release=release, release_dir=Path(release_dir))


def note_worker_exit(worker: Any) -> None:
    """Tell the master a worker leaves because of ``max_requests`` (not a crash)."""
    state = _current
    if state is None or not getattr(worker, "booted", False):
        return
    max_requests = getattr(worker, "max_requests", 0)
    if max_requests and getattr(worker, "nr", 0) >= max_requests:
        _publish(StageReport("recycled"))


class HealthCheckFailed(Exception):
    """The health probe or a user check said no."""

    def __init__(self, message: str, body: bytes) -> None:
        super().__init__(message)
        self.body = body


def _run_with_deadline(fn: Callable[[], None], timeout_s: float) -> BaseException | None:
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # reported to the master, never lost
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target, name="hotpatch-health", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return TimeoutError(f"health check did not finish within {timeout_s:g} s")
    return outcome[0]


def _publish(stage: StageReport) -> None:
    state = _require()
    report = replace(stage, release=state.plan.release)
    try:
        send_report(state.plan.report_fd, report)
    except OSError as exc:  # the master is gone or stopped reading this worker: nothing to tell
        log.warning("report.unsent", worker_pid=state.pid, stage=stage.stage, error=str(exc))


def _require() -> _WorkerState:
    if _current is None:  # pragma: no cover - only called after prepare_worker
        raise RuntimeError("hotpatch: worker state used before post_fork")
    return _current


def _app_module(worker: Any) -> str | None:
    uri = getattr(getattr(worker, "app", None), "app_uri", None)
    return uri.split(":", 1)[0] if isinstance(uri, str) else None


def _listen_port(worker: Any) -> int:
    for listener in getattr(worker, "sockets", ()):
        try:
            name = listener.getsockname()
        except OSError:
            continue
        if isinstance(name, tuple) and len(name) >= 2:
            return int(name[1])
    return 80


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
