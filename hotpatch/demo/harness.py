"""Running gunicorn under load from Python: used by the demo, the integration tests, the benchmark.

``GunicornServer`` starts a master in its own session on a pre-bound 127.0.0.1 socket (``fd://``,
so there is no free-port race) and stops the whole process group (TERM, then KILL).
``LoadGenerator`` runs client threads that count every request, its latency and its outcome.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


def wait_until(
    predicate: Callable[[], object],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.02,
    describe: Callable[[], str] | None = None,
) -> None:
    """Poll ``predicate`` until it is truthy.

    Raises:
        TimeoutError: it was not, ``timeout_s`` seconds on (the message says what was awaited).
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            extra = f"\n{describe()}" if describe is not None else ""
            raise TimeoutError(f"waited {timeout_s:g} s for {what}{extra}")
        time.sleep(interval_s)


class GunicornServer:
    """A gunicorn master started in a new session, with its output captured to a file.

    Args:
        app: the WSGI app spec (``app:app``).
        cwd: the app directory.
        workers: how many workers.
        config: ``-c`` value (default ``python:hotpatch.gunicorn``; ``None`` for none).
        extra_args: more gunicorn arguments.
        env: extra environment variables.
        python: the interpreter.
        pass_socket: bind the socket here and hand it over (``fd://``, no port race); when
            False, gunicorn binds a port found free here (it then closes the socket when it
            stops, as in production, so clients are refused rather than left waiting).
    """

    def __init__(
        self,
        app: str,
        *,
        cwd: Path,
        workers: int = 4,
        config: str | None = "python:hotpatch.gunicorn",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        pass_socket: bool = True,
    ) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = int(self.sock.getsockname()[1])
        bind = f"fd://{self.sock.fileno()}"
        if not pass_socket:
            self.sock.close()
            bind = f"127.0.0.1:{self.port}"
        self.cwd = cwd
        fd, name = tempfile.mkstemp(prefix="gunicorn-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self._log: IO[bytes] = self.log_path.open("wb")
        args = [
            python,
            "-m",
            "gunicorn",
            "--bind",
            bind,
            "--workers",
            str(workers),
            "--graceful-timeout",
            "10",
        ]
        if python == sys.executable and _has_control_socket():
            args.append("--no-control-socket")  # newer gunicorn: one per-user socket path, shared
        if config:
            args += ["-c", config]
        args += [*extra_args, app]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            pass_fds=[self.sock.fileno()] if pass_socket else [],
            start_new_session=True,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def output(self) -> str:
        """Everything the master and its workers printed so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def worker_pids(self) -> list[int]:
        """The master's live children (from /proc; no gunicorn internals)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == self.pid and fields[0] != "Z":
                pids.append(int(entry.name))
        return sorted(pids)

    def get(self, path: str = "/", *, timeout_s: float = 10.0) -> tuple[int, str]:
        """One request; returns (status, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            response = conn.getresponse()
            return response.status, response.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def wait_serving(self, *, workers: int, timeout_s: float = 30.0) -> None:
        """Wait until ``workers`` workers run and a request is answered."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.output()}")
            if len(self.worker_pids()) < workers:
                return False
            with contextlib.suppress(OSError):
                return self.get("/", timeout_s=2.0)[0] == 200
            return False

        wait_until(
            ready,
            timeout_s=timeout_s,
            what=f"gunicorn serving with {workers} workers",
            describe=self.output,
        )

    def stop(self, *, term_timeout_s: float = 15.0, kill_timeout_s: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left; reap the master."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=term_timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=kill_timeout_s)
        self.sock.close()
        self._log.close()

    def close_log(self) -> None:
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def _has_control_socket() -> bool:
    try:
        from gunicorn.config import Config  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover
        return False
    return "control_socket_disable" in Config().settings


@dataclass
class LoadStats:
    """What the clients saw."""

    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    completions: list[float] = field(default_factory=list)
    """``time.monotonic()`` of every completed (2xx) request."""
    bodies: dict[str, int] = field(default_factory=dict)
    answers: list[tuple[float, str]] = field(default_factory=list)
    """``(completion time, first word of the body)`` of every completed request."""

    def longest_gap_s(self, start: float, end: float) -> float:
        """The longest stretch in [start, end] with no completed request."""
        times = sorted(t for t in self.completions if start <= t <= end)
        points = [start, *times, end]
        return max((b - a for a, b in itertools.pairwise(points)), default=end - start)

    def percentile_s(self, q: float) -> float:
        if not self.latencies_s:
            return 0.0
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LoadGenerator:
    """Client threads sending ``GET /`` in a loop, each on a new connection.

    A request fails when the connection is refused or reset, when it takes longer than
    ``timeout_s``, or when the status is not 2xx.
    """

    def __init__(
        self, port: int, *, clients: int = 6, timeout_s: float = 10.0, path: str = "/"
    ) -> None:
        self.port = port
        self.clients = clients
        self.timeout_s = timeout_s
        self.path = path
        self.stats = LoadStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> LoadGenerator:
        for i in range(self.clients):
            t = threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> LoadStats:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)
        self._threads.clear()
        return self.stats

    def completed(self) -> int:
        with self._lock:
            return self.stats.ok

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            error = None
            body = ""
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
                try:
                    conn.request("GET", self.path, headers={"Connection": "close"})
                    response = conn.getresponse()
                    body = response.read().decode("utf-8", "replace")
                    if not 200 <= response.status < 300:
                        error = f"HTTP {response.status}: {body[:200]!r}"
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException) as exc:
                error = f"{type(exc).__name__}: {exc}"
            done = time.monotonic()
            version = body.split(" ", 1)[0] if body else ""
            with self._lock:
                if error is None:
                    self.stats.ok += 1
                    self.stats.latencies_s.append(done - started)
                    self.stats.completions.append(done)
                    self.stats.bodies[version] = self.stats.bodies.get(version, 0) + 1
                    self.stats.answers.append((done, version))
                else:
                    self.stats.failed += 1
                    if len(self.stats.errors) < 20:
                        self.stats.errors.append(error)
            if error is not None:
                self._stop.wait(0.01)  # a refused connection fails at once: do not spin


class Site:
    """A gunicorn master with hotpatch's hooks serving ``app:app`` from a directory, plus load.

    The directory must hold ``app.py`` before ``start``. Integration tests subclass it.
    """

    def __init__(self, directory: Path, *, workers: int, env: Mapping[str, str]) -> None:
        self.dir = directory
        self.worker_count = workers
        self.env = dict(env)
        self.server: GunicornServer | None = None
        self.load: LoadGenerator | None = None

    @property
    def srv(self) -> GunicornServer:
        assert self.server is not None, "the site was not started"
        return self.server

    def start(
        self,
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        workers: int | None = None,
    ) -> GunicornServer:
        from hotpatch.gunicorn._client import read_state

        self.worker_count = workers or self.worker_count
        self.server = GunicornServer(
            "app:app",
            cwd=self.dir,
            workers=self.worker_count,
            extra_args=tuple(extra_args),
            env={**self.env, **(env or {})},
        )
        self.server.wait_serving(workers=self.worker_count)
        wait_until(
            lambda: read_state(self.srv.pid) is not None,
            timeout_s=10,
            what="state.json",
            describe=self.srv.output,
        )
        return self.server

    def state(self) -> dict[str, Any]:
        """The master's published state (empty before it publishes any)."""
        from hotpatch.gunicorn._client import read_state

        return read_state(self.srv.pid) or {}

    def workers(self) -> list[dict[str, Any]]:
        return list(self.state().get("workers") or [])

    def start_load(self, *, clients: int = 6) -> LoadGenerator:
        load = self.load = LoadGenerator(self.srv.port, clients=clients).start()
        wait_until(lambda: load.completed() > 20, timeout_s=10, what="client load running")
        return load

    def stop_load(self) -> LoadStats:
        assert self.load is not None, "no load running"
        stats = self.load.stop()
        self.load = None
        return stats

    def wait_settled(self, release: str, *, timeout_s: float = 20) -> None:
        """Wait until exactly the configured workers, all ready on ``release``, and no others."""

        def settled() -> bool:
            workers = self.workers()
            return (
                len(workers) == self.worker_count
                and all(w["release"] == release and w["phase"] == "ready" for w in workers)
                and sorted(w["pid"] for w in workers) == self.srv.worker_pids()
            )

        wait_until(
            settled,
            timeout_s=timeout_s,
            what=f"{self.worker_count} ready workers on {release}",
            describe=lambda: f"{self.workers()}\n{self.srv.output()[-4000:]}",
        )

    def assert_master_alive(self) -> None:
        assert self.srv.proc.poll() is None, f"master exited:\n{self.srv.output()}"

    def rollout(self, *, timeout_s: float = 60) -> dict[str, Any]:
        """Start a rollout (``hotpatch rollout``'s way) and wait for the master's record of it."""
        from hotpatch.gunicorn._client import start_rollout, wait_for_rollout

        rollout_id = start_rollout(self.srv.pid)
        return wait_for_rollout(self.srv.pid, rollout_id, timeout_s=timeout_s)

    def versions_by_pid(self, *, timeout_s: float = 30.0) -> dict[int, str]:
        """pid -> version, from real requests, until every worker of the call's start answered
        or is gone (bounded).

        The app answers ``version=<v> pid=<pid>``. Requests go 8 at a time: one at a time, the
        kernel may hand every connection to the same idle worker (a gthread worker especially),
        and a worker never reached would never be checked. A worker that exits meanwhile
        (``max_requests``) need not answer; its successors' answers are in the result too. At
        the deadline the workers seen so far are returned (the caller's assertion says what is
        missing).
        """
        from concurrent.futures import ThreadPoolExecutor

        seen: dict[int, str] = {}
        waiting = set(self.srv.worker_pids())
        deadline = time.monotonic() + timeout_s
        with ThreadPoolExecutor(max_workers=8) as pool:
            while time.monotonic() < deadline:
                waiting &= set(self.srv.worker_pids())  # gone: nothing to ask
                if waiting <= set(seen):
                    break
                for status, body in pool.map(lambda _: self.srv.get("/"), range(8)):
                    assert status == 200, body
                    version, pid = body.split()
                    seen[int(pid.split("=")[1])] = version.split("=")[1]
        return seen

    def kill_one_worker_and_check(
        self, expected_version: str, release: str, *, timeout_s: float = 60
    ) -> None:
        """SIGKILL a worker; its replacement must boot ``release`` and answer ``expected_version``."""
        victim = self.workers()[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: victim not in [w["pid"] for w in self.workers()],
            timeout_s=timeout_s,
            what=f"worker {victim} reaped",
        )
        self.wait_settled(release, timeout_s=timeout_s)
        newcomer = max(w["pid"] for w in self.workers())
        seen = self.versions_by_pid(timeout_s=timeout_s)
        assert newcomer in seen, f"no answer from new worker {newcomer}: {seen}"
        assert set(seen.values()) == {expected_version}, seen

    def close(self) -> None:
        """Stop the load and the master (its whole process group); print its output."""
        if self.load is not None:
            self.load.stop()
        if self.server is not None:
            self.server.stop()
            print(f"---- gunicorn output (master {self.server.pid}) ----")
            print(self.server.output()[-30000:])
            self.server.close_log()


def assert_no_failures(stats: LoadStats) -> None:
    """Every request of the load was answered with a 2xx."""
    assert stats.ok > 0, "no request was answered"
    assert stats.failed == 0, f"{stats.failed} failed requests: {stats.errors}"
