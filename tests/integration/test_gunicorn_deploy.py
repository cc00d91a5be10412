"""``hotpatch deploy`` against real gunicorn masters (sync and gthread, 4 workers) under load.

Each test starts gunicorn with hotpatch's hooks on a pre-bound socket, runs client threads that
count every request, changes ``app.py`` on disk and deploys: in place (every worker patches
itself, all or nothing), or rolling (auto's fallback). It checks the outcome, which version
every worker answers, whether worker pids changed, zero failed requests, and what a worker
started later (recycled by ``max_requests``, or spawned in the middle of a deploy) runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.demo.harness import Site as BaseSite
from hotpatch.demo.harness import assert_no_failures, wait_until
from hotpatch.gunicorn._coordinator import DeployResult, deploy

APPS = Path(__file__).resolve().parents[1] / "apps"
WORKERS = 4
ENV = {
    "HOTPATCH_HEALTH_PATH": "/healthz",
    "HOTPATCH_BOOT_TIMEOUT": "10",
    "HOTPATCH_HEALTH_TIMEOUT": "5",
    "HOTPATCH_SETTLE_TIME": "0.5",
}
HELPER = "def helper():  # __HELPER__\n    return VERSION\n"


def write_app(directory: Path, version: str, variant: str = "good") -> None:
    source = (APPS / "deploy_app.py").read_text(encoding="utf-8")
    source = source.replace("__VERSION__", version).replace("__VARIANT__", variant)
    if variant == "incompatible":
        assert HELPER in source
        source = source.replace(HELPER, "")
    write_source(directory, source)


def write_source(directory: Path, source: str) -> None:
    tmp = directory / "app.py.tmp"
    tmp.write_text(source, encoding="utf-8")
    tmp.replace(directory / "app.py")


class Site(BaseSite):
    """One gunicorn master serving the deploy app from a temporary directory, plus client load."""

    def __init__(self, directory: Path, worker_class: str) -> None:
        self.target = directory.parent / f"{directory.name}-target"
        self.target.write_text("0", encoding="ascii")
        super().__init__(directory, workers=WORKERS, env={**ENV, "DEPLOY_TARGET": str(self.target)})
        self.worker_class = worker_class

    def boot(self, *extra: str, app_source: str | None = None) -> None:
        if app_source is None:
            write_app(self.dir, "v1")
        else:
            write_source(self.dir, app_source)
        args = ("--worker-class", self.worker_class, *extra)
        if self.worker_class == "gthread":
            args += ("--threads", "4")
        self.start(extra_args=args)
        self.wait_deployable()

    def wait_deployable(self) -> None:
        """Every worker ready on the known-good release, with its control socket open."""
        self.wait_settled(self.state()["known_good"])
        wait_until(
            lambda: all(w.get("listening") for w in self.workers()),
            timeout_s=20,
            what="every worker listening",
            describe=lambda: str(self.workers()),
        )

    def deploy(self, **options: object) -> DeployResult:
        events: list[dict[str, object]] = []
        result = deploy(self.srv.pid, timeout_s=60, on_event=events.append, **options)  # type: ignore[arg-type]
        print(json.dumps(result.as_dict(), indent=1, default=str))
        return result

    def aim_at(self, pid: int) -> None:
        self.target.write_text(str(pid), encoding="ascii")


@pytest.fixture(name="site", params=["sync", "gthread"])
def _site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    site = Site(app_dir, request.param)
    try:
        yield site
    finally:
        site.close()


def every_worker_answers(site: Site, version: str) -> None:
    def answered() -> bool:
        pids = set(site.srv.worker_pids())
        seen = site.versions_by_pid()
        still_running = pids & set(site.srv.worker_pids())  # max_requests may recycle some
        return still_running <= set(seen) and set(seen.values()) == {version}

    wait_until(answered, timeout_s=20, what=f"every worker answering {version}")


TWO_MODULE_APP = """
import os

from textutil import {names}


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/healthz":
        body = b"ok"
    else:
        body = f"version={{{version}}} pid={{os.getpid()}}".encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
"""


def test_in_place_deploys_a_change_whose_modules_import_each_others_new_names(
    site: Site,
) -> None:
    """``app`` imports a function that ``textutil`` only gains in the same change: phase 1 guards
    the change as one (as a restart would load it), not each module against the live other."""
    (site.dir / "textutil.py").write_text('def label():\n    return "v1"\n', encoding="utf-8")
    site.boot(app_source=TWO_MODULE_APP.format(names="label", version="label()"))
    before = site.srv.worker_pids()
    site.start_load()
    (site.dir / "textutil.py").write_text(
        'def label():\n    return "v"\n\n\ndef suffix():\n    return "2"\n', encoding="utf-8"
    )
    write_source(
        site.dir, TWO_MODULE_APP.format(names="label, suffix", version="label() + suffix()")
    )
    result = site.deploy(strategy="in-place")
    stats = site.stop_load()
    assert (result.outcome, result.strategy) == ("deployed", "in-place"), result.reason
    assert site.srv.worker_pids() == before  # no worker restarted
    every_worker_answers(site, "v2")
    assert_no_failures(stats)


def test_in_place_good_patches_every_worker_without_a_restart(site: Site) -> None:
    site.boot()
    before = site.srv.worker_pids()
    site.start_load()
    write_app(site.dir, "v2")
    result = site.deploy(strategy="in-place")
    stats = site.stop_load()
    assert result.outcome == "deployed", result.reason
    assert result.strategy == "in-place"
    assert site.srv.worker_pids() == before  # no worker restarted
    assert set(site.versions_by_pid().values()) == {"v2"}
    assert len(site.versions_by_pid()) == WORKERS
    assert_no_failures(stats)
    phases = {(e["worker_pid"], e["phase"]) for e in result.events if e["event"] == "worker.phase"}
    assert phases == {(p, ph) for p in before for ph in ("prepare", "commit", "health", "confirm")}
    assert result.to_last_commit_s is not None
    print(f"time from the deploy's start to the last commit: {result.to_last_commit_s:.3f} s")
    state = site.state()
    assert state["known_good"] == result.release
    assert state["last_deploy"]["outcome"] == "deployed"
    assert {w["release"] for w in state["workers"]} == {result.release}
    site.assert_master_alive()


def test_a_phase_one_refusal_in_one_worker_changes_nothing_anywhere(site: Site) -> None:
    site.boot()
    before = site.srv.worker_pids()
    known_good = site.state()["known_good"]
    site.aim_at(before[1])
    site.start_load()
    write_app(site.dir, "v2", "refuse_one")
    result = site.deploy(strategy="in-place")
    stats = site.stop_load()
    assert result.outcome == "refused"
    assert f"worker {before[1]}" in result.reason and "refuses to load" in result.reason
    assert "stage" in result.reason or "execute" in result.reason
    commits = [e for e in result.events if e.get("phase") in ("commit", "health", "confirm")]
    assert commits == []  # nothing was committed anywhere
    assert site.srv.worker_pids() == before
    assert set(site.versions_by_pid().values()) == {"v1"}
    assert site.state()["known_good"] == known_good
    assert site.state()["spawn_release"] == known_good
    assert_no_failures(stats)


def test_a_health_failure_in_one_worker_rolls_every_worker_back(site: Site) -> None:
    site.boot()
    before = site.srv.worker_pids()
    known_good = site.state()["known_good"]
    site.aim_at(before[2])
    site.start_load()
    write_app(site.dir, "v2", "unhealthy_one")
    result = site.deploy(strategy="in-place")
    stats = site.stop_load()
    assert result.outcome == "rolled_back", result.reason
    assert f"worker {before[2]}" in result.reason and "500" in result.reason
    committed = {e["worker_pid"] for e in result.events if e.get("outcome") == "committed"}
    assert committed == set(before)  # all committed, then all rolled back
    rolled = {e["worker_pid"] for e in result.events if e.get("outcome") == "rolled_back"}
    assert rolled == set(before)
    assert site.srv.worker_pids() == before
    assert set(site.versions_by_pid().values()) == {"v1"}
    assert site.state()["known_good"] == known_good
    assert_no_failures(stats)


def test_auto_chooses_rolling_for_a_change_that_is_not_hot_patchable(site: Site) -> None:
    site.boot()
    before = site.srv.worker_pids()
    site.start_load()
    write_app(site.dir, "v2", "incompatible")
    result = site.deploy(strategy="auto")
    stats = site.stop_load()
    assert result.outcome == "deployed", result.reason
    assert result.strategy == "rolling"
    assert "in-place refused" in result.reason and "helper" in result.reason
    assert any(e["event"] == "deploy.fallback" for e in result.events)
    assert not set(site.srv.worker_pids()) & set(before)  # every worker was replaced
    every_worker_answers(site, "v2")
    assert_no_failures(stats)


@pytest.mark.parametrize("outcome", ["deployed", "rolled_back"])
def test_a_worker_recycled_after_a_deploy_runs_the_deployed_code(site: Site, outcome: str) -> None:
    site.boot("--max-requests", "40")
    before = site.srv.worker_pids()
    site.aim_at(before[0])
    write_app(site.dir, "v2", "good" if outcome == "deployed" else "unhealthy_one")
    result = site.deploy(strategy="in-place")
    assert result.outcome == outcome, result.reason
    expected = "v2" if outcome == "deployed" else "v1"
    site.start_load()  # max_requests recycles every worker within a few hundred requests
    wait_until(
        lambda: not set(site.srv.worker_pids()) & set(before),
        timeout_s=60,
        what="every worker recycled by max_requests",
    )
    stats = site.stop_load()
    every_worker_answers(site, expected)
    assert_no_failures(stats)


def kill_and_wait_respawn(site: Site) -> int:
    victim = site.srv.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: victim not in site.srv.worker_pids() and len(site.srv.worker_pids()) == WORKERS,
        timeout_s=20,
        what=f"worker {victim} replaced",
    )
    return victim


def test_a_worker_spawned_before_the_switch_makes_the_deploy_refuse(site: Site) -> None:
    site.boot()
    write_app(site.dir, "v2")
    result = site.deploy(
        strategy="in-place",
        between_phases=lambda phase: kill_and_wait_respawn(site) if phase == "prepared" else None,
    )
    assert result.outcome == "refused"
    assert "during the deploy" in result.reason
    every_worker_answers(site, "v1")


def test_a_worker_spawned_after_the_switch_follows_the_deploy(site: Site) -> None:
    site.boot()
    known_good = site.state()["known_good"]
    write_app(site.dir, "v2")
    killed: list[int] = []

    def between(phase: str) -> None:
        if phase == "committed":
            killed.append(kill_and_wait_respawn(site))

    result = site.deploy(strategy="in-place", between_phases=between)
    # The killed worker cannot answer phase 3: every worker rolls back, and the worker spawned
    # after the switch (which booted the new release) is retired by the master.
    assert result.outcome == "rolled_back", result.reason
    assert f"worker {killed[0]}" in result.reason
    site.wait_settled(known_good)
    every_worker_answers(site, "v1")


@pytest.mark.parametrize("site", ["sync"], indirect=True)  # one worker class shows it
def test_the_command_line_reports_phases_and_exit_codes(site: Site) -> None:
    site.boot()
    write_app(site.dir, "v2")
    cmd = [sys.executable, "-m", "hotpatch", "deploy", "--pid", str(site.srv.pid)]
    done = subprocess.run(
        [*cmd, "--strategy", "in-place"], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "OK: deployed in place" in done.stdout
    for pid in site.srv.worker_pids():
        assert f"worker {pid}  commit   committed" in done.stdout
    write_app(site.dir, "v2")
    done = subprocess.run(
        [*cmd, "--json"], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outcome"] == "unchanged"
    site.aim_at(site.srv.worker_pids()[0])
    write_app(site.dir, "v3", "refuse_one")
    done = subprocess.run(
        [*cmd, "--strategy", "in-place", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert json.loads(done.stdout)["outcome"] == "refused"
    status = subprocess.run(
        [sys.executable, "-m", "hotpatch", "status", "--pid", str(site.srv.pid)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert "last deploy 3: refused" in status.stdout
    assert "patched: app" in status.stdout
    done = subprocess.run(
        [sys.executable, "-m", "hotpatch", "deploy", "--pid", "1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "hotpatch deploy:" in done.stderr


@pytest.mark.parametrize("site", ["sync"], indirect=True)  # one worker class shows it
def test_a_changed_file_that_is_not_python_is_refused_in_place_and_rolled_by_auto(
    site: Site,
) -> None:
    (site.dir / "page.html").write_text("<p>v1</p>", encoding="utf-8")
    site.boot()
    before = site.srv.worker_pids()
    site.start_load()
    (site.dir / "page.html").write_text("<p>v2</p>", encoding="utf-8")
    write_app(site.dir, "v2")
    refused = site.deploy(strategy="in-place")
    assert refused.outcome == "refused"
    assert "page.html" in refused.reason and "Python modules only" in refused.reason
    assert site.srv.worker_pids() == before
    assert set(site.versions_by_pid().values()) == {"v1"}
    site.wait_deployable()
    rolled = site.deploy(strategy="auto", wait=False)
    assert rolled.outcome == "started" and rolled.strategy == "rolling"
    assert "page.html" in rolled.reason
    wait_until(
        lambda: (site.state().get("last_rollout") or {}).get("outcome") == "completed",
        timeout_s=90,
        what="the rolling reload started by auto",
    )
    stats = site.stop_load()
    every_worker_answers(site, "v2")
    assert_no_failures(stats)


@pytest.mark.parametrize("site", ["sync"], indirect=True)  # one worker class shows it
def test_a_worker_that_outlasts_the_coordinator_is_rolled_back_and_retired(site: Site) -> None:
    site.boot()
    before = site.srv.worker_pids()
    known_good = site.state()["known_good"]
    slow = before[3]
    site.aim_at(slow)
    site.start_load()
    write_app(site.dir, "v2", "slow_health_one")
    result = deploy(site.srv.pid, strategy="in-place", timeout_s=2.5)
    print(result.as_dict())
    assert result.outcome == "rolled_back", result.reason
    assert f"workers {slow} could not be rolled back in place and were retired" in result.reason
    health = {
        e["worker_pid"]: e["outcome"]
        for e in result.events
        if e["event"] == "worker.phase" and e["phase"] == "health"
    }
    assert health[slow] == "unknown"
    assert "the request started in process" in result.reason  # a running step, not a queued one
    wait_until(
        lambda: slow not in site.srv.worker_pids() and len(site.srv.worker_pids()) == WORKERS,
        timeout_s=30,
        what=f"worker {slow} retired and replaced",
    )
    site.wait_settled(known_good)
    stats = site.stop_load()
    every_worker_answers(site, "v1")
    assert set(before) - {slow} <= set(site.srv.worker_pids())  # the others were not restarted
    assert_no_failures(stats)
