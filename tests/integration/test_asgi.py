"""FastAPI under gunicorn with uvicorn workers: rollouts, rollbacks, known-good respawn, watch mode.

Each test starts a real gunicorn master (``-k uvicorn_worker.UvicornWorker``, hotpatch's hooks)
in its own session on a pre-bound 127.0.0.1 socket, runs client threads that count every request,
changes ``app.py`` on disk and checks: zero failed requests, the outcome and its reason, which
version answers, that the master is alive, and that each worker ran its lifespan startup once.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotpatch.demo.harness import GunicornServer, assert_no_failures, wait_until
from hotpatch.demo.harness import Site as BaseSite
from hotpatch.gunicorn._client import read_state, wait_for_rollout
from hotpatch.gunicorn._coordinator import deploy

pytest.importorskip("uvicorn_worker", reason="the asgi extra (uvicorn-worker) is not installed")
pytest.importorskip("fastapi", reason="fastapi is not installed (the test extra installs it)")

APPS = Path(__file__).resolve().parents[1] / "apps"
WORKERS = 2
ENV = {
    "HOTPATCH_HEALTH_PATH": "/healthz",
    # FastAPI takes seconds to import on a loaded 2-core machine: generous deadlines against hangs.
    "HOTPATCH_BOOT_TIMEOUT": "60",
    "HOTPATCH_HEALTH_TIMEOUT": "4",
    "HOTPATCH_SETTLE_TIME": "0.5",
}
ROLLOUT_TIMEOUT_S = 180


def write_app(directory: Path, variant: str, version: str) -> None:
    source = (APPS / variant).read_text(encoding="utf-8").replace("__VERSION__", version)
    tmp = directory / ".app.py.tmp-save"
    tmp.write_text(source, encoding="utf-8")
    tmp.replace(directory / "app.py")


class Site(BaseSite):
    """One gunicorn master with uvicorn workers serving ``app.py`` from a directory, plus load."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, workers=WORKERS, env=ENV)
        self.startups = directory.parent / f"{directory.name}-startups"

    def start(  # type: ignore[override]
        self,
        *,
        env: dict[str, str] | None = None,
        variant: str = "asgi_good.py",
        worker_class: str = "uvicorn_worker.UvicornWorker",
    ) -> GunicornServer:
        write_app(self.dir, variant, "v1")
        self.server = GunicornServer(
            "app:app",
            cwd=self.dir,
            workers=self.worker_count,
            extra_args=("--worker-class", worker_class),
            env={**self.env, "HOTPATCH_TEST_STARTUPS": str(self.startups), **(env or {})},
        )
        self.server.wait_serving(workers=self.worker_count, timeout_s=120)
        wait_until(
            lambda: read_state(self.srv.pid) is not None,
            timeout_s=30,
            what="state.json",
            describe=self.srv.output,
        )
        return self.server

    def rollout(self, *, timeout_s: float = ROLLOUT_TIMEOUT_S) -> dict[str, Any]:
        return super().rollout(timeout_s=timeout_s)

    def startup_pids(self) -> list[int]:
        """The pid of every lifespan startup that ran, in order (one line each)."""
        if not self.startups.exists():
            return []
        return [int(line) for line in self.startups.read_text().split()]

    def assert_one_startup_per_worker(self) -> None:
        pids = self.startup_pids()
        assert len(pids) == len(set(pids)), f"a worker ran its lifespan startup twice: {pids}"
        assert set(self.srv.worker_pids()) <= set(pids), (self.srv.worker_pids(), pids)


@pytest.fixture(name="site")
def _site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path / "app")
    site.dir.mkdir()
    try:
        yield site
    finally:
        site.close()


def test_good_rollout_puts_every_uvicorn_worker_on_the_new_version(site: Site) -> None:
    site.start()
    site.start_load()
    write_app(site.dir, "asgi_good.py", "v2")
    record = site.rollout()
    stats = site.stop_load()
    assert record["outcome"] == "completed", record
    site.wait_settled(record["release"], timeout_s=60)
    assert set(site.versions_by_pid().values()) == {"v2"}
    assert_no_failures(stats)
    assert stats.bodies.get("version=v2", 0) > 0
    events = [e["event"] for e in record["events"]]
    assert events.count("worker.healthy") == WORKERS
    assert events.count("worker.retired") == WORKERS
    assert events[-1] == "rollout.completed"
    # The health path depends on the lifespan startup (app.state and the lifespan state), so it
    # ran before the probe; and uvicorn ran it once per worker, not a second time for hotpatch.
    site.assert_one_startup_per_worker()
    assert len(site.startup_pids()) == 2 * WORKERS


def test_auto_deploys_a_fastapi_change_in_place_in_uvicorn_workers(site: Site) -> None:
    """A changed FastAPI path operation is hot-patchable: ``auto`` picks in-place, every uvicorn
    worker commits it on its event loop, the route table (which holds the endpoint function)
    runs the new code, no worker restarts and no lifespan startup runs again."""
    site.start()
    wait_until(
        lambda: all(w.get("listening") for w in site.workers()),
        timeout_s=60,
        what="every worker's control socket",
        describe=site.srv.output,
    )
    before = site.srv.worker_pids()
    site.start_load()
    write_app(site.dir, "asgi_good.py", "v2")
    result = deploy(site.srv.pid, strategy="auto", timeout_s=ROLLOUT_TIMEOUT_S)
    stats = site.stop_load()
    assert (result.outcome, result.strategy) == ("deployed", "in-place"), result
    assert site.srv.worker_pids() == before
    assert set(site.versions_by_pid().values()) == {"v2"}
    assert_no_failures(stats)
    site.assert_one_startup_per_worker()
    assert len(site.startup_pids()) == WORKERS


BAD_RELEASES = [
    pytest.param("asgi_health_500.py", "GET /healthz answered 500", id="health-500"),
    pytest.param(
        "asgi_import_error.py",
        "app.py:11: RuntimeError: cannot connect to the database",
        id="import-error",
    ),
    pytest.param(
        "asgi_startup_error.py",
        "app.py:15: RuntimeError: lifespan: cannot open the connection pool "
        "(stage: lifespan startup)",
        id="lifespan-startup-raises",
    ),
    pytest.param(
        "asgi_startup_hang.py",
        "lifespan startup did not finish within 4 s (stage: lifespan startup)",
        id="lifespan-startup-hangs",
    ),
    pytest.param("asgi_health_hang.py", "did not finish within 4 s", id="health-hangs"),
    pytest.param(
        "asgi_startup_failed_message.py",
        "LifespanStartupFailed: the app answered lifespan.startup.failed: database unreachable "
        "(stage: lifespan startup)",
        id="lifespan-startup-failed-message",
    ),
]


@pytest.mark.parametrize(("variant", "reason"), BAD_RELEASES)
def test_bad_asgi_release_is_rolled_back(site: Site, variant: str, reason: str) -> None:
    site.start()
    known_good = site.state()["known_good"]
    site.start_load()
    write_app(site.dir, variant, "v2")
    record = site.rollout()
    site.wait_settled(known_good, timeout_s=60)
    stats = site.stop_load()
    assert record["outcome"] == "rolled_back", record
    assert reason in record["reason"], record
    assert record["known_good"] == known_good
    assert_no_failures(stats)
    site.assert_master_alive()
    assert set(site.versions_by_pid().values()) == {"v1"}
    assert "gunicorn.errors.HaltServer" not in site.srv.output()
    # The broken code is still on disk; a worker started now must run the known-good release.
    site.kill_one_worker_and_check("v1", known_good, timeout_s=120)
    site.assert_master_alive()
    site.assert_one_startup_per_worker()


def test_watch_mode_rolls_out_a_saved_file_and_refuses_a_broken_startup(site: Site) -> None:
    site.start(env={"HOTPATCH_WATCH": "1", "HOTPATCH_WATCH_INTERVAL": "0.25"})
    known_good = site.state()["known_good"]
    site.start_load()
    first = int(site.state()["next_rollout_id"])
    write_app(site.dir, "asgi_startup_error.py", "v2")  # no SIGHUP: the save alone
    refused = wait_for_rollout(site.srv.pid, first, timeout_s=ROLLOUT_TIMEOUT_S)
    assert refused["outcome"] == "rolled_back", refused
    assert "(stage: lifespan startup)" in refused["reason"], refused
    site.wait_settled(known_good, timeout_s=60)
    write_app(site.dir, "asgi_good.py", "v3")
    record = wait_for_rollout(site.srv.pid, first + 1, timeout_s=ROLLOUT_TIMEOUT_S)
    stats = site.stop_load()
    assert record["outcome"] == "completed", record
    site.wait_settled(record["release"], timeout_s=60)
    assert set(site.versions_by_pid().values()) == {"v3"}
    assert_no_failures(stats)
    site.assert_master_alive()


@pytest.mark.parametrize(
    "worker_class",
    [
        pytest.param("uvicorn_worker.UvicornWorker", id="lifespan-auto-unsupported"),
        pytest.param("asgi_workers.NoLifespanWorker", id="lifespan-off"),
    ],
)
def test_an_app_without_lifespan_is_probed_before_it_serves(site: Site, worker_class: str) -> None:
    shutil.copy(APPS / "asgi_workers.py", site.dir / "asgi_workers.py")
    site.start(variant="asgi_raw.py", worker_class=worker_class)
    site.start_load()
    write_app(site.dir, "asgi_raw.py", "v2")
    good = site.rollout()
    assert good["outcome"] == "completed", good
    write_app(site.dir, "asgi_raw.py", "v3-sick")
    bad = site.rollout()
    site.wait_settled(good["release"], timeout_s=60)
    stats = site.stop_load()
    assert bad["outcome"] == "rolled_back", bad
    assert "GET /healthz answered 500" in bad["reason"], bad
    assert set(site.versions_by_pid().values()) == {"v2"}
    assert_no_failures(stats)
    site.assert_master_alive()


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fastapi_app"


def test_the_fastapi_example_ships_a_change_and_refuses_its_broken_one(tmp_path: Path) -> None:
    """examples/fastapi_app/README.md, under load: its config, a change shipped in place, one
    that needs a rolling reload (a new route), and its broken change (refused in place because it
    changes the running lifespan, then rolled back by the rolling reload ``auto`` falls back to)."""
    site = Site(tmp_path / "example")
    shutil.copytree(EXAMPLE, site.dir)
    source = (site.dir / "app.py").read_text(encoding="utf-8")
    assert 'VERSION = "1"' in source and "pool = Pool()  #" in source
    server = site.server = GunicornServer(
        "app:app",
        cwd=site.dir,
        workers=WORKERS,
        config="gunicorn.conf.py",  # its health_path and health_timeout_s; generous boot deadline
        env={"HOTPATCH_BOOT_TIMEOUT": "60", "HOTPATCH_SETTLE_TIME": "0.5"},
    )

    def deployable() -> None:
        wait_until(
            lambda: (
                len(site.workers()) == WORKERS and all(w.get("listening") for w in site.workers())
            ),
            timeout_s=60,
            what="every worker's control socket",
            describe=site.srv.output,
        )

    try:
        server.wait_serving(workers=WORKERS, timeout_s=120)
        wait_until(lambda: read_state(server.pid) is not None, timeout_s=30, what="state.json")
        assert server.get("/healthz") == (200, "ok\n")
        deployable()
        before = server.worker_pids()
        site.start_load()
        source = source.replace('VERSION = "1"', 'VERSION = "2"')
        (site.dir / "app.py").write_text(source)
        in_place = deploy(server.pid, strategy="auto", timeout_s=ROLLOUT_TIMEOUT_S)
        assert (in_place.outcome, in_place.strategy) == ("deployed", "in-place"), in_place
        assert server.worker_pids() == before
        route = '@app.get("/about", response_class=PlainTextResponse)\n'
        source += f'\n\n{route}async def about() -> str:\n    return "a FastAPI example\\n"\n'
        (site.dir / "app.py").write_text(source)
        rolled = deploy(server.pid, strategy="auto", timeout_s=ROLLOUT_TIMEOUT_S)
        assert (rolled.outcome, rolled.strategy) == ("deployed", "rolling"), rolled
        assert "the decorator of the new about registers it on app" in rolled.reason
        site.wait_settled(rolled.release, timeout_s=60)
        deployable()
        assert server.get("/about") == (200, "a FastAPI example\n")
        broken = source.replace("pool = Pool()  #", "pool = await connect()  #")
        (site.dir / "app.py").write_text(broken)
        refused = deploy(server.pid, strategy="auto", timeout_s=ROLLOUT_TIMEOUT_S)
        site.wait_settled(rolled.release, timeout_s=60)
        stats = site.stop_load()
        assert (refused.outcome, refused.strategy) == ("rolled_back", "rolling"), refused
        assert "lifespan() is suspended for the life of this worker" in str(refused.events)
        assert "app.py:29: NameError: name 'connect' is not defined" in refused.reason
        assert "(stage: lifespan startup)" in refused.reason
        assert set(site.versions_by_pid().values()) == {"2"}
        assert_no_failures(stats)
    finally:
        site.close()


def _server_side_inode(port: int, client_port: int | None) -> int | None:
    """The inode of the 127.0.0.1 server socket on ``port``: the listening one (``None``), or
    the server's end of the connection from ``client_port``."""
    remote = "00000000:0000" if client_port is None else f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[2] == remote and int(fields[9]):
            return int(fields[9])
    return None


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def test_a_retiring_worker_answers_a_connection_it_accepted_before_the_request_arrived(
    site: Site,
) -> None:
    """uvicorn's shutdown closes accepted, not yet read connections (a reset under load).

    The order made deterministic: the worker accepts a connection, is told to stop, has closed
    its listening socket (it stopped accepting), and only then the request is sent.
    """
    site.worker_count = 1
    site.start()
    worker = site.srv.worker_pids()[0]
    listening = _server_side_inode(site.srv.port, None)
    assert listening in _socket_inodes(worker)
    client = socket.create_connection(("127.0.0.1", site.srv.port), timeout=30)
    try:
        client_port = client.getsockname()[1]
        wait_until(
            lambda: (
                (_server_side_inode(site.srv.port, client_port) or -1) in _socket_inodes(worker)
            ),
            timeout_s=10,
            what=f"worker {worker} accepted the connection",
        )
        os.kill(worker, signal.SIGTERM)
        wait_until(
            lambda: listening not in _socket_inodes(worker),
            timeout_s=10,
            what=f"worker {worker} closed its listening socket",
        )
        client.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    finally:
        client.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert answer.endswith(f"version=v1 pid={worker}\n".encode()), answer
