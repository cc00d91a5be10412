"""``hotpatch deploy`` (in place, and canary) against gunicorn with 4 uvicorn workers, under load.

The app (``tests/apps/asgi_deploy_app.py``) is raw ASGI with a lifespan, so the workers boot
fast. In place: every worker guards the change (phase 1), commits it on its serving event loop
between two coroutine steps (phase 2), probes ``/healthz`` on that loop with the lifespan state
(phase 3); a refusal or a failure anywhere leaves or puts every worker back on the old code; no
worker restarts. Requests are suspended inside the coroutine a deploy replaces all the time: one
resumed on old code after the commit would answer ``...-mixed``, and none may. Canary: one new
uvicorn worker is judged on its real traffic against the old ones. Every request is counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.demo.harness import assert_no_failures, wait_until
from hotpatch.gunicorn._coordinator import DeployResult, deploy
from tests.integration.test_gunicorn_canary import CANARY_ERROR, NOISE_FLOOR_S, CanarySite

pytest.importorskip("uvicorn_worker", reason="the asgi extra (uvicorn-worker) is not installed")

APPS = Path(__file__).resolve().parents[1] / "apps"
WORKERS = 4
ENV = {
    "HOTPATCH_HEALTH_PATH": "/healthz",
    "HOTPATCH_BOOT_TIMEOUT": "30",
    "HOTPATCH_HEALTH_TIMEOUT": "5",
    "HOTPATCH_SETTLE_TIME": "0.5",
}


def write_app(directory: Path, version: str, variant: str = "good") -> None:
    source = (APPS / "asgi_deploy_app.py").read_text(encoding="utf-8")
    source = source.replace("__VERSION__", version).replace("__VARIANT__", variant)
    tmp = directory / "app.py.tmp"
    tmp.write_text(source, encoding="utf-8")
    tmp.replace(directory / "app.py")


class Site(CanarySite):
    """4 uvicorn workers serving the ASGI deploy app, with hotpatch's hooks."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, "uvicorn_worker.UvicornWorker")
        self.env.update(ENV)
        self.target = directory.parent / f"{directory.name}-target"
        self.target.write_text("0", encoding="ascii")
        self.env["DEPLOY_TARGET"] = str(self.target)

    def boot(self) -> None:
        write_app(self.dir, "v1")
        self.start(extra_args=("--worker-class", self.worker_class))
        self.wait_deployable(self.state()["known_good"])

    def wait_deployable(self, release: str) -> None:
        """Every worker ready on ``release``, its control socket open."""
        self.wait_settled(release, timeout_s=60)
        wait_until(
            lambda: all(w.get("listening") for w in self.workers()),
            timeout_s=60,
            what="every worker listening",
            describe=lambda: str(self.workers()),
        )

    def deploy(self, **options: object) -> DeployResult:
        result = deploy(self.srv.pid, timeout_s=60, **options)  # type: ignore[arg-type]
        print(result.as_dict())
        return result


@pytest.fixture(name="site")
def _site(tmp_path: Path) -> Iterator[Site]:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    site = Site(app_dir)
    try:
        yield site
    finally:
        site.close()


def test_in_place_deploys_into_uvicorn_workers_all_or_nothing(site: Site) -> None:
    """One server, deploys in turn: refused in one worker (nothing changes anywhere), unhealthy in
    one worker (every worker rolls back), good (every worker runs it, no worker restarts), then a
    change to the running lifespan (refused in place; ``auto`` rolls). No request fails, no
    request mixes old and new code."""
    site.boot()
    before = site.srv.worker_pids()
    known_good = site.state()["known_good"]
    site.start_load()

    site.target.write_text(str(before[1]), encoding="ascii")
    write_app(site.dir, "v2", "refuse_one")
    refused = site.deploy(strategy="in-place")
    assert refused.outcome == "refused", refused.reason
    assert f"worker {before[1]}" in refused.reason and "refuses to load" in refused.reason
    assert [e for e in refused.events if e.get("phase") in ("commit", "health")] == []
    assert set(site.versions_by_pid().values()) == {"v1"}

    site.target.write_text(str(before[2]), encoding="ascii")
    write_app(site.dir, "v3", "unhealthy_one")
    unhealthy = site.deploy(strategy="in-place")
    assert unhealthy.outcome == "rolled_back", unhealthy.reason
    assert f"worker {before[2]}" in unhealthy.reason and "500" in unhealthy.reason
    committed = {e["worker_pid"] for e in unhealthy.events if e.get("outcome") == "committed"}
    assert committed == set(before)  # every worker committed, then every worker rolled back
    rolled = {e["worker_pid"] for e in unhealthy.events if e.get("outcome") == "rolled_back"}
    assert rolled == set(before)
    assert set(site.versions_by_pid().values()) == {"v1"}
    assert site.state()["known_good"] == known_good

    write_app(site.dir, "v4")
    good = site.deploy(strategy="in-place")
    assert good.outcome == "deployed", good.reason
    assert good.strategy == "in-place"
    phases = {(e["worker_pid"], e["phase"]) for e in good.events if e["event"] == "worker.phase"}
    assert phases == {(p, ph) for p in before for ph in ("prepare", "commit", "health", "confirm")}
    seen = site.versions_by_pid()
    assert set(seen.values()) == {"v4"} and set(seen) == set(before), seen
    assert good.to_last_commit_s is not None
    print(f"time from the deploy's start to the last commit: {good.to_last_commit_s:.3f} s")
    assert site.srv.worker_pids() == before  # no worker restarted
    assert site.state()["known_good"] == good.release
    assert {w["release"] for w in site.workers()} == {good.release}
    # Every commit and rollback ran on the worker's event loop, as one step of it: the unhealthy
    # deploy's commit and rollback, and the good deploy's commit (the loop ran at least these).
    pauses = loop_pauses(site.srv.output())
    assert all(len(pauses.get(pid, [])) >= 3 for pid in before), pauses
    worst = max((p for found in pauses.values() for p in found), key=lambda p: p[0])
    print(f"longest event-loop pause for a commit: {worst[0]:.4f} s wall, {worst[1]:.4f} s CPU")

    # The lifespan stays suspended (waiting for the shutdown) for the worker's life, so a change
    # to its code never reaches a safe point: phase 1 refuses it in every worker, naming it, and
    # auto ships it with a rolling reload.
    source = (site.dir / "app.py").read_text(encoding="utf-8")
    shutdown = '            await send({"type": "lifespan.shutdown.complete"})'
    assert shutdown in source
    changed = source.replace("v4", "v5").replace(shutdown, f"            pass\n{shutdown}")
    (site.dir / "app.py.tmp").write_text(changed, encoding="utf-8")
    (site.dir / "app.py.tmp").replace(site.dir / "app.py")
    lifespan = site.deploy(strategy="in-place")
    assert lifespan.outcome == "refused", lifespan.reason
    assert "lifespan() is suspended for the life of this worker" in lifespan.reason
    assert "stage: safepoint" in lifespan.reason
    assert [e for e in lifespan.events if e.get("phase") in ("commit", "health")] == []
    assert site.srv.worker_pids() == before
    rolled = site.deploy(strategy="auto")
    assert (rolled.outcome, rolled.strategy) == ("deployed", "rolling"), rolled.reason
    assert "lifespan() is suspended" in rolled.reason
    stats = site.stop_load()

    assert not set(site.srv.worker_pids()) & set(before)
    assert set(site.versions_by_pid().values()) == {"v5"}
    assert_no_failures(stats)
    assert not [v for v in stats.bodies if "mixed" in v], stats.bodies
    assert stats.bodies.get("version=v4", 0) > 0
    site.assert_master_alive()


def loop_pauses(output: str) -> dict[int, list[tuple[float, float]]]:
    """worker pid -> (wall, CPU) seconds of each ``event_loop.paused`` event in gunicorn's log."""
    found: dict[int, list[tuple[float, float]]] = {}
    for match in re.finditer(
        r"\[(\d+)\] \[INFO\] event_loop\.paused .*?paused_s=([\d.e-]+) cpu_s=([\d.e-]+)", output
    ):
        pid, wall, cpu = int(match[1]), float(match[2]), float(match[3])
        found.setdefault(pid, []).append((wall, cpu))
    return found


def test_canary_in_uvicorn_workers_promotes_a_good_release_and_rolls_back_a_bad_one(
    site: Site,
) -> None:
    site.boot()
    old = set(site.srv.worker_pids())
    site.start_counting_load()

    write_app(site.dir, "v2")
    good = site.canary(
        bake_s=1.0, min_samples=50, deadline_s=30.0, min_latency_shift_s=NOISE_FLOOR_S
    )
    assert (good.outcome, good.strategy) == ("deployed", "canary"), good.reason
    figures = good.canary or {}
    assert figures.get("decision") == "pass", figures
    assert figures["candidate_calls"] >= 50 and figures["baseline_calls"] >= 50
    site.wait_deployable(good.release)
    promoted = set(site.srv.worker_pids())
    assert not old & promoted, "an old worker is still running"
    assert set(site.versions_by_pid().values()) == {"v2"}

    write_app(site.dir, "v3", "bad")
    bad = site.canary(bake_s=1.0, min_samples=50, deadline_s=30.0)
    assert bad.outcome == "rolled_back", bad.reason
    figures = bad.canary or {}
    assert (figures.get("decision"), figures.get("reason")) == ("fail", "error_rate"), figures
    assert figures["candidate_errors"] >= 5 and figures["baseline_errors"] == 0
    site.wait_settled(good.release, timeout_s=60)
    assert set(site.srv.worker_pids()) == promoted
    assert site.state()["known_good"] == good.release
    assert set(site.versions_by_pid().values()) == {"v2"}

    stats, failures = site.stop_counting_load()
    by_design = failures.pop(f"HTTP 500 {CANARY_ERROR}", 0)
    print(f"load: {stats.ok} answered, {by_design} 500s by the bad canary, others {failures}")
    assert by_design > 0
    assert failures == {}, failures
