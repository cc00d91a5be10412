"""The Prometheus export (``hotpatch[prometheus]``): the same numbers the canary judge reads.

The problem: a gunicorn server is several processes, and a Prometheus counter lives in one. The
prometheus-client answer is its multiprocess mode: every process writes its values to memory-mapped
files in one directory (``PROMETHEUS_MULTIPROC_DIR``) and a scrape merges them; the directory must
be set before ``prometheus_client`` is first imported, must start empty, and a dead worker's live
gauges must be dropped (``mark_process_dead``). The directory is also an attack surface: a server
running as root that writes its metrics into a directory another user prepared (or links into
one) hands that user its files. And an app that asked for nothing must get nothing: no import, no
files, no port.

The mechanism: only when ``HOTPATCH_METRICS_PATH`` or ``HOTPATCH_METRICS_PORT`` is set does the
master call ``start_master`` (from ``when_ready``, before any worker is forked): it takes the
directory the environment names only if it is private to this uid (``rundir.check_private_dir``:
owner, mode 0700, not a link), or else creates ``prometheus-<master pid>`` in hotpatch's runtime
directory; it removes the ``*.db`` files a previous run left, sets the variable, imports
prometheus-client (a clear error if the extra is missing) and defines the metrics below. Workers
inherit all of it through ``fork``; each feeds ``hotpatch_requests_total``,
``hotpatch_request_exceptions_total`` and ``hotpatch_request_duration_seconds`` from the recording
middleware (``worker_sink``), and sets ``hotpatch_release_info`` for the release it serves. The
master counts deploys, rollbacks and the deploy in progress, and calls ``mark_process_dead`` in
``child_exit``. A scrape is answered by each worker's middleware at ``HOTPATCH_METRICS_PATH``, or by
a thread of the master on ``HOTPATCH_METRICS_ADDR:HOTPATCH_METRICS_PORT`` (``127.0.0.1`` by default).

Metric names are fixed (docs/metrics.md; Kubernetes docs and an Argo Rollouts AnalysisTemplate
depend on them).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hotpatch._log import get_logger
from hotpatch.errors import ConfigError
from hotpatch.rundir import check_private_dir, private_dir, runtime_dir

log = get_logger(__name__)

ENV_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
MISSING_EXTRA = (
    "HOTPATCH_METRICS_PATH / HOTPATCH_METRICS_PORT need prometheus-client: "
    "pip install 'hotpatch[prometheus]'"
)
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

_metrics: dict[str, Any] = {}


def is_installed() -> bool:
    """Whether prometheus-client can be imported (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("prometheus_client") is not None


def check_multiproc_dir(environ: dict[str, str]) -> None:
    """Refuse a ``PROMETHEUS_MULTIPROC_DIR`` that is not private to this uid (settings check).

    Raises:
        ConfigError: the extra is missing, or the directory is a link, someone else's, or open.
    """
    if not is_installed():
        raise ConfigError(MISSING_EXTRA)
    given = environ.get(ENV_MULTIPROC_DIR)
    if given:
        try:
            check_private_dir(given)
        except FileNotFoundError:
            raise ConfigError(f"{ENV_MULTIPROC_DIR}: {given}: does not exist") from None
        except PermissionError as exc:  # InsecurePath says what is wrong
            raise ConfigError(f"{ENV_MULTIPROC_DIR}: {exc}") from None


def start_master(master_pid: int, *, port: int | None, addr: str) -> Path:
    """Prepare the multiprocess directory, define the metrics, serve ``port`` (the master).

    Returns the directory. Raises ``ConfigError`` for anything the user must fix (the extra is
    missing, an unsafe directory, a port that cannot be bound).
    """
    check_multiproc_dir(dict(os.environ))
    given = os.environ.get(ENV_MULTIPROC_DIR)
    directory = (
        check_private_dir(given)
        if given
        else private_dir(runtime_dir(), f"prometheus-{master_pid}")
    )
    removed = _remove_db_files(directory)
    os.environ[ENV_MULTIPROC_DIR] = str(directory)
    _define()
    if port is not None:
        from prometheus_client import start_http_server

        try:
            start_http_server(port, addr=addr, registry=_scrape_registry())
        except OSError as exc:
            raise ConfigError(
                f"HOTPATCH_METRICS_PORT: cannot serve metrics on {addr}:{port}: {exc}"
            ) from None
    log.info(
        "metrics.started",
        master_pid=master_pid,
        directory=str(directory),
        port=port,
        addr=addr if port is not None else None,
        stale_files_removed=removed,
    )
    return directory


def _remove_db_files(directory: Path) -> int:
    """Remove the regular ``*.db`` files a previous run left (never through a link)."""
    removed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.endswith(".db"):
                continue
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                os.unlink(entry.path)
                removed += 1
    return removed


def _define() -> None:
    if _metrics:
        return
    from prometheus_client import Counter, Gauge, Histogram

    _metrics.update(
        requests=Counter(
            "hotpatch_requests_total",
            "Requests answered, by release, worker pid and status class",
            ["release", "worker", "code_class"],
        ),
        exceptions=Counter(
            "hotpatch_request_exceptions_total",
            "Requests in which an exception escaped the app",
            ["release", "worker"],
        ),
        duration=Histogram(
            "hotpatch_request_duration_seconds",
            "Time to the end of the response (streaming included), by release",
            ["release"],
            buckets=LATENCY_BUCKETS_S,
        ),
        release_info=Gauge(
            "hotpatch_release_info",
            "1 for each release a live worker serves",
            ["release"],
            multiprocess_mode="livemax",
        ),
        patches=Counter(
            "hotpatch_patches_total",
            "In-place patches in workers, by outcome (applied, rolled_back)",
            ["outcome"],
        ),
        rollbacks=Counter(
            "hotpatch_rollbacks_total",
            "Server rollbacks (rollout, canary, in-place), by outcome",
            ["outcome"],
        ),
        deploys=Counter(
            "hotpatch_deploys_total",
            "Deploys and rollouts, by strategy and outcome",
            ["strategy", "outcome"],
        ),
        in_progress=Gauge(
            "hotpatch_deploy_in_progress",
            "1 while a deploy or rollout runs",
            multiprocess_mode="livemax",
        ),
    )
    _metrics["in_progress"].set(0)


class _ReadableFilesCollector:
    """prometheus-client's multiprocess merge over the files that can be read whole right now.

    ``MultiProcessCollector`` fails the whole scrape on one file it cannot read, and a gunicorn
    server makes such files in normal operation: a worker creates its file empty and sizes it
    afterwards (a scrape in between raises ``struct.error``; prometheus/client_python#1199, and a
    worker killed in that window leaves the empty file for good), and a file can be cut or
    corrupted by a worker killed mid-write. Each file is read whole first; one that is missing,
    empty or unparsable is left out of this scrape (an empty one has no values yet; the others
    are logged), and the rest is merged as prometheus-client merges it.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterable[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        readable = [path for path in self._files() if _readable(path)]
        merged: Iterable[Any] = MultiProcessCollector.merge(readable, accumulate=True)  # type: ignore[no-untyped-call]
        return merged

    def _files(self) -> list[str]:
        with os.scandir(self.path) as entries:
            return [
                entry.path
                for entry in entries
                if entry.name.endswith(".db") and entry.is_file(follow_symlinks=False)
            ]


def _readable(path: str) -> bool:
    """Whether ``path`` is a whole multiprocess file: its header and every entry parse."""
    import json
    import struct

    from prometheus_client.mmap_dict import MmapedDict

    try:
        if os.stat(path, follow_symlinks=False).st_size == 0:
            return False  # being created: no values yet
        for key, _value, _timestamp, _pos in MmapedDict.read_all_values_from_file(path):  # type: ignore[no-untyped-call]
            json.loads(key)
    except FileNotFoundError:
        return False  # a dead worker's live gauge, removed by mark_process_dead
    except (OSError, struct.error, RuntimeError, ValueError) as exc:
        log.warning("metrics.file_unreadable", path=path, error=f"{type(exc).__name__}: {exc}")
        return False
    return True


def _scrape_registry() -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(_ReadableFilesCollector(os.environ[ENV_MULTIPROC_DIR]))
    return registry


def serve_metrics(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The WSGI answer at ``HOTPATCH_METRICS_PATH``: every process's metrics, merged.

    A scrape that fails anyway answers 503 with the reason (Prometheus records a failed scrape),
    never an exception into the worker.
    """
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    try:
        body = generate_latest(_scrape_registry())
    except Exception as exc:  # the scraper gets the reason, the worker goes on
        log.warning("metrics.scrape_failed", error=f"{type(exc).__name__}: {exc}")
        reason = f"metrics unavailable: {type(exc).__name__}\n".encode()
        start_response(
            "503 Service Unavailable",
            [("Content-Type", "text/plain"), ("Content-Length", str(len(reason)))],
        )
        return [reason]
    start_response(
        "200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))]
    )
    return [body]


def worker_sink(worker_pid: int) -> Callable[[str, str, bool, float], None]:
    """The middleware's sink in worker ``worker_pid``: counts each request into the metrics."""
    _define()
    worker = str(worker_pid)
    requests, exceptions, duration = (
        _metrics["requests"],
        _metrics["exceptions"],
        _metrics["duration"],
    )
    children: dict[tuple[str, str], Any] = {}
    per_release: dict[str, tuple[Any, Any]] = {}

    def sink(release: str, code_class: str, exception: bool, latency_s: float) -> None:
        child = children.get((release, code_class))
        if child is None:
            child = children[(release, code_class)] = requests.labels(release, worker, code_class)
        child.inc()
        pair = per_release.get(release)
        if pair is None:
            pair = per_release[release] = (
                duration.labels(release),
                exceptions.labels(release, worker),
            )
        pair[0].observe(latency_s)
        if exception:
            pair[1].inc()

    return sink


def serving_release(old: str | None, new: str) -> None:
    """This worker serves ``new`` now (and no longer ``old``)."""
    if not _metrics:
        return
    if old is not None and old != new:
        _metrics["release_info"].labels(old).set(0)
    _metrics["release_info"].labels(new).set(1)


def patched(outcome: str) -> None:
    """An in-place patch was applied in this worker (or rolled back)."""
    if _metrics:
        _metrics["patches"].labels(outcome).inc()


def deploy_finished(strategy: str, outcome: str) -> None:
    """The master finished a deploy or rollout (and, if it rolled back, a rollback)."""
    if not _metrics:
        return
    _metrics["deploys"].labels(strategy, outcome).inc()
    if outcome in ("rolled_back", "rollback_failed", "expired"):
        _metrics["rollbacks"].labels(outcome).inc()


def deploy_in_progress(running: bool) -> None:
    """Set the in-progress gauge (the master)."""
    if _metrics:
        _metrics["in_progress"].set(1 if running else 0)


def worker_exited(pid: int) -> None:
    """``child_exit``: drop the dead worker's live gauges."""
    if not _metrics:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
