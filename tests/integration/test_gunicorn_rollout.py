"""Rolling reloads with real gunicorn masters on 127.0.0.1, under client load.

Each test starts gunicorn (4 workers, hotpatch's hooks) in its own session on a pre-bound socket,
runs client threads that count every request, changes ``app.py`` on disk, triggers a rollout and
checks: zero failed requests, the outcome, which version answers, and that the master is alive.
After a rollback, a SIGKILLed worker must come back on the old version although the broken code is
still on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.demo.harness import GunicornServer, assert_no_failures, wait_until
from hotpatch.demo.harness import Site as BaseSite
from hotpatch.gunicorn._client import start_rollout, wait_for_rollout

APPS = Path(__file__).resolve().parents[1] / "apps"
WORKERS = 4
ENV = {
    "HOTPATCH_HEALTH_PATH": "/healthz",
    "HOTPATCH_BOOT_TIMEOUT": "5",
    "HOTPATCH_HEALTH_TIMEOUT": "2",
    "HOTPATCH_SETTLE_TIME": "0.5",
}


def write_app(directory: Path, variant: str, version: str) -> None:
    source = (APPS / variant).read_text(encoding="utf-8").replace("__VERSION__", version)
    tmp = directory / "app.py.tmp"
    tmp.write_text(source, encoding="utf-8")
    tmp.replace(directory / "app.py")


class Site(BaseSite):
    """One gunicorn master serving ``app.py`` from a temporary directory, plus client load."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, workers=WORKERS, env=ENV)

    def start(  # type: ignore[override]
        self,
        *,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        version: str = "v1",
    ) -> GunicornServer:
        write_app(self.dir, "good.py", version)
        return super().start(extra_args=extra_args, env=env)


@pytest.fixture(name="site")
def _site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path)
    try:
        yield site
    finally:
        site.close()


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_good_rollout_puts_every_worker_on_the_new_version(site: Site, worker_class: str) -> None:
    extra = ("--worker-class", worker_class, "--threads", "2") if worker_class == "gthread" else ()
    site.start(extra_args=extra)
    site.start_load()
    write_app(site.dir, "good.py", "v2")
    record = site.rollout()
    stats = site.stop_load()
    assert record["outcome"] == "completed", record
    site.wait_settled(record["release"])
    assert set(site.versions_by_pid().values()) == {"v2"}
    assert_no_failures(stats)
    assert stats.bodies.get("version=v2", 0) > 0
    events = [e["event"] for e in record["events"]]
    assert events[0] == "rollout.started"
    assert events.count("worker.healthy") == WORKERS
    assert events.count("worker.retired") == WORKERS
    assert events[-1] == "rollout.completed"


BAD_RELEASES = [
    pytest.param("syntax_error.py.txt", "app.py:6: SyntaxError", id="syntax-error"),
    pytest.param("import_error.py", "app.py:8: RuntimeError: cannot connect", id="import-error"),
    pytest.param("missing_attr.py", "Failed to find attribute 'app'", id="missing-app-attribute"),
    pytest.param("health_500.py", "GET /healthz answered 500", id="health-500"),
    pytest.param("health_hang.py", "did not finish within 2 s", id="health-hangs"),
    pytest.param("hang_at_import.py", "did not load the app within 5 s", id="import-hangs"),
    pytest.param(
        "crash_after_check.py", "exited after passing its health check", id="crash-after-check"
    ),
    pytest.param("fail_on_third.py", "the third worker cannot start", id="third-worker-fails"),
]


@pytest.mark.parametrize(("variant", "reason"), BAD_RELEASES)
def test_bad_rollout_is_rolled_back(site: Site, variant: str, reason: str, tmp_path: Path) -> None:
    site.start(env={"HOTPATCH_TEST_COUNTER": str(tmp_path / "boot-count")})
    known_good = site.state()["known_good"]  # type: ignore[index]
    site.start_load()
    write_app(site.dir, variant, "v2")
    record = site.rollout()
    site.wait_settled(known_good)
    stats = site.stop_load()
    assert record["outcome"] == "rolled_back", record
    assert reason in record["reason"], record
    assert record["known_good"] == known_good
    assert_no_failures(stats)
    site.assert_master_alive()
    assert set(site.versions_by_pid().values()) == {"v1"}
    events = [e["event"] for e in record["events"]]
    assert "rollout.failed" in events and events[-1] == "rollout.rolled_back"
    # The broken code is still on disk; a worker started now must run the known-good release.
    site.kill_one_worker_and_check("v1", known_good)
    site.assert_master_alive()


def test_two_rollouts_in_a_row_and_a_queued_one(site: Site) -> None:
    site.start()
    site.start_load()
    write_app(site.dir, "good.py", "v2")
    assert site.rollout()["outcome"] == "completed"
    write_app(site.dir, "good.py", "v3")
    first = start_rollout(site.srv.pid)
    wait_until(
        lambda: (site.state() or {}).get("rollout") is not None,
        timeout_s=10,
        what="rollout running",
    )
    write_app(site.dir, "good.py", "v4")
    second = start_rollout(site.srv.pid)  # arrives during the first: queued
    assert wait_for_rollout(site.srv.pid, first, timeout_s=60)["outcome"] == "completed"
    record = wait_for_rollout(site.srv.pid, second, timeout_s=60)
    stats = site.stop_load()
    assert record["outcome"] == "completed", record
    site.wait_settled(record["release"])
    assert set(site.versions_by_pid().values()) == {"v4"}
    assert_no_failures(stats)
    assert "rollout.queued" in site.srv.output()


def test_fixed_code_after_a_rollback_rolls_out(site: Site) -> None:
    site.start()
    site.start_load()
    write_app(site.dir, "import_error.py", "v2")
    assert site.rollout()["outcome"] == "rolled_back"
    write_app(site.dir, "good.py", "v3")
    record = site.rollout()
    stats = site.stop_load()
    assert record["outcome"] == "completed", record
    site.wait_settled(record["release"])
    assert set(site.versions_by_pid().values()) == {"v3"}
    assert_no_failures(stats)
    site.kill_one_worker_and_check("v3", record["release"])


def test_cli_rollout_and_status(site: Site) -> None:
    site.start()
    site.start_load()
    write_app(site.dir, "good.py", "v2")
    cli = [sys.executable, "-m", "hotpatch", "--log-format", "json"]
    done = subprocess.run(
        [*cli, "rollout", "--pid", str(site.srv.pid), "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "worker" in done.stdout and "healthy" in done.stdout and "OK: rollout" in done.stdout
    write_app(site.dir, "health_500.py", "v3")
    failed = subprocess.run(
        [*cli, "rollout", "--pid", str(site.srv.pid), "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    stats = site.stop_load()
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "GET /healthz answered 500" in failed.stderr
    status = subprocess.run(
        [*cli, "status", "--pid", str(site.srv.pid)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    assert "last rollout 2: rolled_back" in status.stdout
    assert status.stdout.count("ready") == WORKERS
    assert_no_failures(stats)
    assert set(site.versions_by_pid().values()) == {"v2"}


def test_preload_app_refuses_rolling(site: Site) -> None:
    site.start(extra_args=("--preload",))
    state = site.state()
    assert state is not None and state["rolling"] is False
    assert "preload_app" in state["disabled_reason"]
    write_app(site.dir, "good.py", "v2")
    record = site.rollout(timeout_s=20)
    assert record["outcome"] == "refused"
    assert set(site.versions_by_pid().values()) == {"v1"}
    assert "rollout.disabled" in site.srv.output()


def test_term_during_a_rollout_leaves_no_worker_behind(site: Site) -> None:
    site.start(env={"HOTPATCH_BOOT_TIMEOUT": "30"})
    write_app(site.dir, "hang_at_import.py", "v2")
    start_rollout(site.srv.pid)
    wait_until(
        lambda: len(site.srv.worker_pids()) == WORKERS + 1,
        timeout_s=10,
        what="the new worker booting",
        describe=site.srv.output,
    )
    children = site.srv.worker_pids()
    os.kill(site.srv.pid, signal.SIGTERM)
    site.srv.proc.wait(timeout=30)
    wait_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in children),
        timeout_s=15,
        what="every worker gone",
    )
