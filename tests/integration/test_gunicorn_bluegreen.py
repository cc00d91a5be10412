"""``hotpatch deploy --strategy blue-green`` against real gunicorn masters under load.

Each test starts gunicorn (sync or gthread, 4 workers, a pidfile) with hotpatch's hooks on a
pre-bound socket, runs client threads that count every request, writes a new ``app.py`` and
asks for a blue-green switch: gunicorn's re-exec starts a second master on the same socket, the
old master stops its workers once every new worker is healthy, keeps a short window, then quits.
The tests check the outcome, which code answers, which masters run, the pidfile, that no request
failed, and they stop every master they caused to exist (the new one is tracked by its pid and
start time, and it stays in the first master's process group, which the harness stops too).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotpatch.demo.harness import GunicornServer, assert_no_failures, wait_until
from hotpatch.demo.harness import Site as BaseSite
from hotpatch.gunicorn._client import is_alive, read_state
from hotpatch.gunicorn._coordinator import DeployResult, deploy
from hotpatch.gunicorn._state import process_start_time

WORKERS = 4
ENV = {
    "HOTPATCH_HEALTH_PATH": "/healthz",
    "HOTPATCH_BOOT_TIMEOUT": "10",
    "HOTPATCH_HEALTH_TIMEOUT": "5",
    "HOTPATCH_SETTLE_TIME": "0.5",
}
APP = """
import os

VERSION = "{version}" + os.environ.get("NOTE", "")


def app(environ, start_response):
    status = "200 OK"
    body = f"version={{VERSION}} pid={{os.getpid()}}\\n".encode()
    if environ.get("PATH_INFO") == "/healthz":
        body = b"ok\\n"
        if {unhealthy}:
            status, body = "500 Internal Server Error", b"this release is broken\\n"
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


CONFIG = """
from pathlib import Path

import hotpatch.gunicorn

hotpatch.gunicorn.install(globals())
_here = Path(__file__).parent
raw_env = ["NOTE=" + (_here / "note.txt").read_text().strip()]
preload_app = (_here / "preload.txt").read_text().strip() == "yes"
"""


ASGI_APP = """
import os

VERSION = "{version}" + os.environ.get("NOTE", "")


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({{"type": "lifespan.startup.complete"}})
            elif message["type"] == "lifespan.shutdown":
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    status, body = 200, f"version={{VERSION}} pid={{os.getpid()}}\\n".encode()
    if scope["path"] == "/healthz":
        body = b"ok\\n"
        if {unhealthy}:
            status, body = 500, b"this release is broken\\n"
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({{"type": "http.response.start", "status": status, "headers": headers}})
    await send({{"type": "http.response.body", "body": body}})
"""
UVICORN = "uvicorn_worker.UvicornWorker"


def write_app(
    directory: Path, version: str, *, unhealthy: bool = False, asgi: bool = False
) -> None:
    tmp = directory / "app.py.tmp"
    template = ASGI_APP if asgi else APP
    tmp.write_text(template.format(version=version, unhealthy=unhealthy), encoding="utf-8")
    tmp.replace(directory / "app.py")


def children(pid: int) -> list[int]:
    """The live children of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


class Site(BaseSite):
    """A gunicorn master with a pidfile, serving ``app.py`` from a temporary directory."""

    def __init__(self, directory: Path, worker_class: str) -> None:
        self.asgi = worker_class == UVICORN
        # uvicorn workers import more at boot: the ASGI tests' boot deadline
        env = {**ENV, "HOTPATCH_BOOT_TIMEOUT": "60"} if self.asgi else ENV
        super().__init__(directory, workers=WORKERS, env=env)
        self.worker_class = worker_class
        self.pidfile = directory.parent / "gunicorn.pid"
        self.new_masters: dict[int, int | None] = {}
        """Every second master a test caused: pid -> start time (only those are signalled)."""

    def boot(self, *, config: str = "python:hotpatch.gunicorn") -> None:
        write_app(self.dir, "v1", asgi=self.asgi)
        args = ["--worker-class", self.worker_class, "--pid", str(self.pidfile)]
        if self.worker_class == "gthread":
            args += ["--threads", "4"]
        # gunicorn binds the port itself: its re-exec cannot carry an inherited fd:// socket
        # (the port was free a moment ago; a clash would fail the start, never pass a test)
        self.server = GunicornServer(
            "app:app",
            cwd=self.dir,
            workers=WORKERS,
            config=config,
            extra_args=args,
            env=self.env,
            pass_socket=False,
        )
        self.server.wait_serving(workers=WORKERS)
        wait_until(self.state, timeout_s=10, what="state.json", describe=self.srv.output)
        self.wait_settled(self.state()["known_good"])

    def deploy(self, **options: Any) -> DeployResult:
        result = deploy(self.srv.pid, strategy="blue-green", timeout_s=60, **options)
        print(json.dumps(result.as_dict(), indent=1, default=str))
        new = (result.blue_green or {}).get("new_master_pid")
        if isinstance(new, int):
            self.track(new)
        return result

    def track(self, pid: int) -> None:
        self.new_masters.setdefault(pid, process_start_time(pid))

    def cli(self, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "hotpatch", "deploy", *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        print(done.stdout, done.stderr)
        return done

    def answers(self, count: int = 40) -> set[str]:
        """The versions ``count`` real requests get."""
        seen = set()
        for _ in range(count):
            status, body = self.srv.get("/")
            assert status == 200, body
            seen.add(body.split()[0].split("=")[1])
        return seen

    def pidfile_pid(self) -> int | None:
        """The pid in the pidfile (``None`` while gunicorn renames it: unlink, then create)."""
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def old_record(self) -> dict[str, Any]:
        state = self.state()
        return state.get("blue_green") or state.get("last_blue_green") or {}

    def close(self) -> None:
        try:
            super().close()
        finally:
            for pid, start in self.new_masters.items():  # normally gone with the process group
                if start is not None and is_alive(pid, start):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


@pytest.fixture(name="site", params=["sync", "gthread"])
def _site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    site = Site(app_dir, request.param)
    try:
        yield site
    finally:
        site.close()


def test_blue_green_good_switches_every_answer_to_the_new_master(site: Site) -> None:
    site.boot()
    old_pid = site.srv.pid
    old_workers = site.srv.worker_pids()
    site.start_load()
    write_app(site.dir, "v2")
    events: list[dict[str, Any]] = []
    result = site.deploy(keep_old_s=2, on_event=events.append)
    stats = site.stop_load()
    assert result.outcome == "deployed", result.reason
    assert result.blue_green is not None
    new_pid = result.blue_green["new_master_pid"]
    kinds = [e["event"] for e in events]
    for kind in (
        "bluegreen.started",
        "bluegreen.healthy",
        "bluegreen.old_workers_stopping",
        "bluegreen.old_workers_stopped",
        "bluegreen.window_opened",
        "bluegreen.old_master_quit",
    ):
        assert kind in kinds, kinds
    assert next(e for e in events if e["event"] == "bluegreen.healthy")["ready"] == WORKERS
    wait_until(lambda: site.srv.proc.poll() is not None, timeout_s=10, what="old master gone")
    assert not any(is_alive(p) for p in old_workers)
    assert is_alive(new_pid)
    new_workers = children(new_pid)
    assert len(new_workers) == WORKERS and not set(new_workers) & set(old_workers)
    assert site.answers() == {"v2"}
    assert_no_failures(stats)
    # gunicorn 27: the new master wrote <pidfile>.2, and renames it once promoted
    wait_until(
        lambda: site.pidfile_pid() == new_pid,
        timeout_s=10,
        what="the pidfile naming the new master",
    )
    assert not Path(f"{site.pidfile}.2").exists()
    wait_until(  # promoted: gunicorn forgot its parent, and the state says so
        lambda: (read_state(new_pid) or {}).get("parent_master_pid", 0) is None,
        timeout_s=10,
        what="the new master's state after its promotion",
    )
    state = read_state(new_pid)
    assert state is not None
    assert state["blue_green_origin"]["old_master_pid"] == old_pid
    assert read_state(old_pid) is None


def test_blue_green_bad_new_set_never_healthy_keeps_the_old_workers(site: Site) -> None:
    site.boot()
    old_pid = site.srv.pid
    old_workers = site.srv.worker_pids()
    site.start_load()
    write_app(site.dir, "v2", unhealthy=True)
    done = site.cli("--pid", str(old_pid), "--strategy", "blue-green", "--keep-old", "2")
    stats = site.stop_load()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "blue-green: new master started, pid" in done.stdout
    assert "REFUSED (blue-green): the old workers kept serving" in done.stderr
    assert "failed at health" in done.stderr and "/healthz" in done.stderr
    record = site.old_record()
    assert record["outcome"] == "refused"
    new_pid = record["new_master_pid"]
    site.track(new_pid)
    assert not is_alive(new_pid)
    assert site.srv.proc.poll() is None  # the old master serves on
    assert site.srv.worker_pids() == old_workers  # its workers never stopped
    assert site.answers() == {"v1"}
    assert site.state()["blue_green"] is None
    assert_no_failures(stats)
    assert site.pidfile_pid() == old_pid


def test_switch_back_inside_the_window_brings_the_old_code_back(site: Site) -> None:
    site.boot()
    old_pid = site.srv.pid
    known_good = site.state()["known_good"]
    site.start_load()
    write_app(site.dir, "v2")
    started = site.deploy(keep_old_s=120, wait=False)
    assert started.outcome == "started", started.reason
    new_pid = started.blue_green["new_master_pid"] if started.blue_green else 0
    wait_until(
        lambda: site.old_record().get("phase") == "window",
        timeout_s=60,
        what="the switch-back window",
        describe=lambda: f"{site.old_record()}\n{site.srv.output()[-3000:]}",
    )
    assert site.answers() == {"v2"}
    assert site.srv.worker_pids() == [new_pid]  # the old master's only child: the new master
    # the pidfile still names the old master; the new master's pid is found through it too
    which = ["--pidfile", str(site.pidfile)]
    if site.worker_class == "gthread":
        which = ["--pid", str(new_pid)]
    done = site.cli(*which, "--switch-back")
    stats = site.stop_load()
    assert done.returncode == 0, done.stdout + done.stderr
    if site.worker_class == "gthread":
        assert f"switching back through its old master {old_pid}" in done.stdout
    assert f"OK: switched back: the old master {old_pid} serves the old code again" in done.stdout
    assert not is_alive(new_pid)
    assert site.srv.proc.poll() is None
    site.wait_settled(known_good)
    assert site.answers() == {"v1"}
    record = site.old_record()
    assert record["outcome"] == "switched_back"
    assert "hotpatch deploy --switch-back" in record["reason"]
    assert_no_failures(stats)


# The worker class does not enter this path (the masters, their config and exit), and the suite
# runs within CI's budget: sync only; the good, bad and switch-back cases run on both classes.
@pytest.mark.parametrize("site", ["sync"], indirect=True)
def test_the_new_master_dying_in_the_window_switches_back_by_itself(site: Site) -> None:
    site.boot()
    known_good = site.state()["known_good"]
    site.start_load()
    write_app(site.dir, "v2")
    started = site.deploy(keep_old_s=120, wait=False)
    new_pid = started.blue_green["new_master_pid"] if started.blue_green else 0
    wait_until(
        lambda: site.old_record().get("phase") == "window",
        timeout_s=60,
        what="the switch-back window",
    )
    new_workers = children(new_pid)
    assert len(new_workers) == WORKERS
    os.kill(new_pid, signal.SIGKILL)  # our own (tracked) second master
    wait_until(
        lambda: site.old_record().get("phase") == "finished",
        timeout_s=60,
        what="the switch-back",
        describe=lambda: f"{site.old_record()}\n{site.srv.output()[-3000:]}",
    )
    record = site.old_record()
    assert record["outcome"] == "switched_back", record
    assert f"the new master {new_pid} exited" in record["reason"]
    # its orphaned workers would serve the new code until each noticed its parent was gone
    # (up to gunicorn's timeout, 30 s); the old master stops them once its own are back
    stopped = [e for e in record["events"] if e["event"] == "bluegreen.orphans_stopped"]
    assert stopped and sorted(stopped[0]["workers"]) == new_workers, record["events"]
    wait_until(
        lambda: not any(is_alive(p) for p in new_workers),
        timeout_s=10,
        what="the dead new master's workers gone",
    )
    site.wait_settled(known_good)
    assert site.answers() == {"v1"}
    stats = site.stop_load()
    assert_no_failures(stats)


def config_file(site: Site, *, note: str, preload: bool) -> Path:
    """A gunicorn config file that the new master reads again: ``raw_env`` and ``preload_app``
    come from files next to it."""
    conf = site.dir.parent / "gunicorn_conf.py"
    conf.write_text(CONFIG, encoding="utf-8")
    (site.dir.parent / "note.txt").write_text(note, encoding="utf-8")
    (site.dir.parent / "preload.txt").write_text("yes" if preload else "no", encoding="utf-8")
    return conf


# The worker class does not enter this path (the masters, their config and exit), and the suite
# runs within CI's budget: sync only; the good, bad and switch-back cases run on both classes.
@pytest.mark.parametrize("site", ["sync"], indirect=True)
def test_blue_green_carries_a_change_of_the_gunicorn_config(site: Site) -> None:
    """What a rolling reload cannot carry: the new master reads its config file again."""
    conf = config_file(site, note="-a", preload=False)
    site.boot(config=str(conf))
    assert site.answers() == {"v1-a"}
    site.start_load()
    write_app(site.dir, "v2")
    (site.dir.parent / "note.txt").write_text("-b", encoding="utf-8")
    result = site.deploy(keep_old_s=1)
    stats = site.stop_load()
    assert result.outcome == "deployed", result.reason
    assert site.answers() == {"v2-b"}
    assert_no_failures(stats)


# The worker class does not enter this path (the masters, their config and exit), and the suite
# runs within CI's budget: sync only; the good, bad and switch-back cases run on both classes.
@pytest.mark.parametrize("site", ["sync"], indirect=True)
def test_a_new_config_that_turns_preload_on_is_refused_and_the_old_workers_serve(
    site: Site,
) -> None:
    """With ``preload_app`` the new master runs without hotpatch's controller: its workers'
    health cannot be known, so the switch is refused at once, not after the timeout."""
    conf = config_file(site, note="-a", preload=False)
    site.boot(config=str(conf))
    old_workers = site.srv.worker_pids()
    site.start_load()
    write_app(site.dir, "v2")
    (site.dir.parent / "preload.txt").write_text("yes", encoding="utf-8")
    result = site.deploy(keep_old_s=1)
    stats = site.stop_load()
    assert result.outcome == "refused", result.reason
    assert "without hotpatch's controller" in result.reason and "preload_app" in result.reason
    assert result.duration_s < 50  # not the 60 s timeout (a generous bound against a hang)
    assert site.srv.worker_pids() == old_workers
    assert site.answers() == {"v1-a"}
    assert_no_failures(stats)


def test_blue_green_under_uvicorn_workers_refuses_a_bad_set_then_switches(tmp_path: Path) -> None:
    """The ASGI form (issue 12): a new set that fails its ASGI health probe is stopped while the
    old uvicorn workers serve on; a good one then takes over; no request fails."""
    pytest.importorskip("uvicorn_worker", reason="the asgi extra is not installed")
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    site = Site(app_dir, UVICORN)
    try:
        site.boot()
        old_workers = site.srv.worker_pids()
        site.start_load()
        write_app(site.dir, "v2", unhealthy=True, asgi=True)
        refused = site.deploy(keep_old_s=1)
        assert refused.outcome == "refused", refused.reason
        assert "/healthz" in refused.reason
        assert site.srv.worker_pids() == old_workers and site.answers() == {"v1"}
        write_app(site.dir, "v3", asgi=True)
        result = site.deploy(keep_old_s=1)
        stats = site.stop_load()
        assert result.outcome == "deployed", result.reason
        wait_until(lambda: site.srv.proc.poll() is not None, timeout_s=30, what="old master gone")
        assert not any(is_alive(p) for p in old_workers)
        assert site.answers() == {"v3"}
        assert_no_failures(stats)
    finally:
        site.close()
