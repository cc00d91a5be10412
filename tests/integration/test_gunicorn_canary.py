"""``hotpatch deploy --strategy canary`` against real gunicorn masters (sync and gthread, 4 workers).

Each test serves ``tests/apps/canary_app.py`` under continuous client load, changes it on disk and
deploys with a short bake. A good release passes the judge and rolls to every worker; a release
whose new code answers 500 to one request in ten is failed by the judge on the canary's own
figures and rolled back, while the old workers never stop. Every failed request is counted: the
only ones allowed are the 500s the bad canary answers by design (counted and reported apart).
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.demo.harness import LoadGenerator, LoadStats, Site, wait_until
from hotpatch.gunicorn._canary import CanaryOptions
from hotpatch.gunicorn._coordinator import DeployResult, deploy

APPS = Path(__file__).resolve().parents[1] / "apps"
WORKERS = 4
ENV = {
    "HOTPATCH_HEALTH_PATH": "/healthz",
    "HOTPATCH_BOOT_TIMEOUT": "15",
    "HOTPATCH_HEALTH_TIMEOUT": "5",
    "HOTPATCH_SETTLE_TIME": "0.5",
}
CANARY_ERROR = "canary-error"
NOISE_FLOOR_S = 0.05
"""The good canary's latency floor here. On this 2-core machine shared by up to 8 sessions (load
average 10 to 30), a trivial app's in-worker latency is the scheduler's noise (median 4 to 6 ms in
sync workers), and a new process's median came out 2 ms (55%) above the old workers' once, with
p = 0.0002, for identical code. The latency rule itself is tested on controlled samples
(tests/unit/test_metrics_canary.py); these tests are about promotion, rollback and the error
judgement under real load."""


def write_app(directory: Path, version: str, variant: str = "good") -> None:
    source = (APPS / "canary_app.py").read_text(encoding="utf-8")
    source = source.replace("__VERSION__", version).replace("__VARIANT__", variant)
    tmp = directory / "app.py.tmp"
    tmp.write_text(source, encoding="utf-8")
    tmp.replace(directory / "app.py")


class CountingLoad(LoadGenerator):
    """The harness's client load, keeping every failure's kind (not only the first 20)."""

    def __init__(self, port: int, *, clients: int = 6) -> None:
        super().__init__(port, clients=clients)
        self.failures: dict[str, int] = {}

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            kind = None
            body = ""
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
                try:
                    conn.request("GET", "/", headers={"Connection": "close"})
                    response = conn.getresponse()
                    body = response.read().decode("utf-8", "replace")
                    if not 200 <= response.status < 300:
                        kind = f"HTTP {response.status} {body.split(' ', 1)[0]}"
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException) as exc:
                kind = type(exc).__name__
            done = time.monotonic()
            with self._lock:
                if kind is None:
                    self.stats.ok += 1
                    self.stats.latencies_s.append(done - started)
                    self.stats.completions.append(done)
                    version = body.split(" ", 1)[0]
                    self.stats.bodies[version] = self.stats.bodies.get(version, 0) + 1
                else:
                    self.stats.failed += 1
                    self.failures[kind] = self.failures.get(kind, 0) + 1
            if kind is not None and not kind.startswith("HTTP"):
                self._stop.wait(0.01)


class CanarySite(Site):
    def __init__(self, directory: Path, worker_class: str) -> None:
        super().__init__(directory, workers=WORKERS, env=ENV)
        self.worker_class = worker_class
        self.counting: CountingLoad | None = None

    def boot(self) -> None:
        write_app(self.dir, "v1")
        args: tuple[str, ...] = ("--worker-class", self.worker_class)
        if self.worker_class == "gthread":
            args += ("--threads", "4")
        self.start(extra_args=args)
        self.wait_settled(self.state()["known_good"])
        wait_until(
            lambda: all(w.get("listening") for w in self.workers()),
            timeout_s=30,
            what="every worker listening",
            describe=lambda: str(self.workers()),
        )

    def start_counting_load(self) -> CountingLoad:
        load = self.counting = CountingLoad(self.srv.port)
        load.start()
        wait_until(lambda: load.completed() > 20, timeout_s=15, what="client load running")
        return load

    def stop_counting_load(self) -> tuple[LoadStats, dict[str, int]]:
        assert self.counting is not None
        stats = self.counting.stop()
        failures = dict(self.counting.failures)
        self.counting = None
        return stats, failures

    def canary(self, **options: object) -> DeployResult:
        result = deploy(
            self.srv.pid,
            strategy="canary",
            timeout_s=120,
            canary=CanaryOptions(**options),  # type: ignore[arg-type]
        )
        print(json.dumps(result.as_dict(), indent=1, default=str))
        return result

    def close(self) -> None:
        if self.counting is not None:
            self.counting.stop()
        super().close()


@pytest.fixture(name="site", params=["sync", "gthread"])
def _site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[CanarySite]:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    site = CanarySite(app_dir, request.param)
    try:
        yield site
    finally:
        site.close()


def _events(record: dict[str, object]) -> list[str]:
    return [str(e.get("event")) for e in record.get("events") or [] if isinstance(e, dict)]  # type: ignore[attr-defined]


def test_a_good_canary_is_promoted_and_every_worker_rolls(site: CanarySite) -> None:
    site.boot()
    old = set(site.srv.worker_pids())
    site.start_counting_load()
    write_app(site.dir, "v2")

    result = site.canary(
        bake_s=3.0, min_samples=50, deadline_s=30.0, min_latency_shift_s=NOISE_FLOOR_S
    )

    assert result.outcome == "deployed", result.reason
    assert result.strategy == "canary"
    figures = result.canary or {}
    assert figures.get("decision") == "pass", figures
    assert figures["candidate_calls"] >= 50
    assert figures["baseline_calls"] >= 50
    assert figures["candidate_errors"] == 0
    assert figures["baseline_errors"] == 0
    record = result.record or {}
    events = _events(record)
    # the canary baked beside every old worker: none was retired before the verdict
    assert "canary.passed" in events, events
    assert "worker.retired" in events
    assert events.index("canary.passed") < events.index("worker.retired"), events
    known_good = site.state()["known_good"]
    assert known_good == result.release
    site.wait_settled(known_good, timeout_s=60)
    assert not old & set(site.srv.worker_pids()), "an old worker is still running"
    seen = site.versions_by_pid()
    assert set(seen.values()) == {"v2"}, seen
    stats, failures = site.stop_counting_load()
    print(f"load: {stats.ok} answered, failures {failures}")
    assert stats.ok > 0
    assert failures == {}, failures


def test_a_canary_failing_one_request_in_ten_is_rolled_back_by_the_judge(
    site: CanarySite,
) -> None:
    site.boot()
    known_good = site.state()["known_good"]
    old = set(site.srv.worker_pids())
    site.start_counting_load()
    write_app(site.dir, "v2", variant="bad")

    result = site.canary(bake_s=3.0, min_samples=50, deadline_s=30.0)

    assert result.outcome == "rolled_back", result.reason
    assert "stage: canary" in result.reason, result.reason
    assert "more errors than the old workers" in result.reason, result.reason
    figures = result.canary or {}
    assert figures.get("decision") == "fail", figures
    assert figures.get("reason") == "error_rate", figures
    assert figures["candidate_calls"] >= 50
    assert figures["candidate_errors"] >= 5
    assert figures["baseline_errors"] == 0
    assert figures["error_p_value"] < 0.01
    assert (result.record or {}).get("rolled_back") is True
    # the old workers never stopped; the canary is gone; known-good unchanged
    site.wait_settled(known_good, timeout_s=60)
    assert set(site.srv.worker_pids()) == old
    assert site.state()["known_good"] == known_good
    seen = site.versions_by_pid()
    assert set(seen.values()) == {"v1"}, seen
    stats, failures = site.stop_counting_load()
    by_design = failures.pop(f"HTTP 500 {CANARY_ERROR}", 0)
    print(
        f"load: {stats.ok} answered, {by_design} answered 500 by the bad canary by design, "
        f"other failures {failures}"
    )
    assert by_design > 0  # the clients did see the canary's errors (it served real traffic)
    assert failures == {}, failures
