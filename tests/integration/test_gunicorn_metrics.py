"""The Prometheus export (``hotpatch[prometheus]``) under real gunicorn, scraped over HTTP.

The metrics are read the way Prometheus reads them: an HTTP GET of the WSGI path every worker
answers and of the master's port, parsed with ``prometheus_client.parser``. The counters must
match the requests the test sent, per release, across all 4 workers (multiprocess mode). Without
the settings nothing is imported and nothing served; an unsafe ``PROMETHEUS_MULTIPROC_DIR`` stops
gunicorn before it serves, with the reason.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hotpatch.demo.harness import Site, wait_until
from hotpatch.gunicorn._coordinator import deploy

APPS = Path(__file__).resolve().parents[1] / "apps"
WORKERS = 4
ENV = {
    "HOTPATCH_HEALTH_PATH": "/healthz",
    "HOTPATCH_BOOT_TIMEOUT": "15",
    "HOTPATCH_HEALTH_TIMEOUT": "5",
    "HOTPATCH_SETTLE_TIME": "0.2",
}


def write_app(directory: Path, version: str) -> None:
    source = (APPS / "canary_app.py").read_text(encoding="utf-8")
    source = source.replace("__VERSION__", version).replace("__VARIANT__", "good")
    tmp = directory / "app.py.tmp"
    tmp.write_text(source, encoding="utf-8")
    tmp.replace(directory / "app.py")


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def fetch(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return (
            response.status,
            response.getheader("Content-Type") or "",
            response.read().decode("utf-8", "replace"),
        )
    finally:
        conn.close()


def scrape(port: int) -> str:
    """A scrape as Prometheus makes it: a failed one fails the test with what was answered."""
    status, _content_type, text = fetch(port, "/metrics")
    assert status == 200, (status, text[:2000])
    return text


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    try:
        return [
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]
    except ValueError as exc:
        raise AssertionError(f"not the exposition format ({exc}):\n{text[:2000]}") from exc


def total(text: str, name: str, **labels: str) -> float:
    return sum(
        value
        for sample, have, value in samples(text)
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )


@pytest.fixture(name="site", params=["sync", "gthread"])
def _site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "v1")
    site = Site(app_dir, workers=WORKERS, env=ENV)
    site.worker_class = request.param  # type: ignore[attr-defined]
    try:
        yield site
    finally:
        site.close()


def start(site: Site, **env: str) -> None:
    args: tuple[str, ...] = ("--worker-class", site.worker_class)  # type: ignore[attr-defined]
    if site.worker_class == "gthread":  # type: ignore[attr-defined]
        args += ("--threads", "4")
    site.start(extra_args=args, env=env)
    site.wait_settled(site.state()["known_good"])


def test_scraped_counters_match_the_requests_sent_across_every_worker(site: Site) -> None:
    port = free_port()
    start(site, HOTPATCH_METRICS_PATH="/metrics", HOTPATCH_METRICS_PORT=str(port))
    release = site.state()["known_good"]
    pids = {str(p) for p in site.srv.worker_pids()}

    status, content_type, _ = fetch(site.srv.port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    # The baseline is taken once the requests before it are fully counted: a request is
    # recorded after its answer went out, its counter and its histogram in two writes, and a
    # scrape between them (after the harness's last health probe) reads one without the other.
    # Two scrapes in a row that agree with each other and within themselves make the baseline.
    base: dict[str, float] = {}

    def settled() -> bool:
        text = scrape(site.srv.port)
        answered = total(text, "hotpatch_requests_total", release=release)
        ok = total(text, "hotpatch_requests_total", release=release, code_class="2xx")
        count = total(text, "hotpatch_request_duration_seconds_count", release=release)
        stable = base == {"ok": ok, "count": count}
        base.update(ok=ok, count=count)
        return stable and answered == count

    wait_until(settled, timeout_s=20, what="the requests before the test counted")
    base_ok, base_count = base["ok"], base["count"]

    sent = 240
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: site.srv.get("/")[0], range(sent)))
    assert answers == [200] * sent
    for _ in range(3):
        assert site.srv.get("/raise")[0] == 500

    def counted() -> bool:
        text = scrape(site.srv.port)  # the scrape itself is never counted
        ok = total(text, "hotpatch_requests_total", release=release, code_class="2xx")
        errors = total(text, "hotpatch_requests_total", release=release, code_class="5xx")
        timed = total(text, "hotpatch_request_duration_seconds_count", release=release)
        return ok - base_ok == sent and errors == 3 and timed == base_count + sent + 3

    wait_until(counted, timeout_s=20, what=f"{sent} requests and 3 errors counted")

    for text in (scrape(site.srv.port), scrape(port)):
        assert total(text, "hotpatch_requests_total", release=release, code_class="2xx") == (
            base_ok + sent
        )
        assert total(text, "hotpatch_request_exceptions_total", release=release) == 3
        assert (
            total(text, "hotpatch_request_duration_seconds_count", release=release)
            == base_count + sent + 3
        )
        workers = {
            labels["worker"]
            for name, labels, value in samples(text)
            if name == "hotpatch_requests_total" and value > 0
        }
        assert workers <= pids, (workers, pids)
        assert len(workers) >= 2  # the load reached several workers: the files were merged
        assert total(text, "hotpatch_release_info", release=release) == 1
        assert total(text, "hotpatch_deploy_in_progress") == 0

    # a rolling deploy: counted by strategy and outcome; requests after it under the new release
    write_app(site.dir, "v2")
    record = site.rollout(timeout_s=90)
    assert record["outcome"] == "completed", record
    new = record["release"]
    site.wait_settled(new, timeout_s=60)
    for _ in range(20):
        assert site.srv.get("/")[0] == 200

    def rolled() -> bool:
        text = scrape(port)
        return (
            total(text, "hotpatch_requests_total", release=new, code_class="2xx") >= 20
            and total(text, "hotpatch_deploys_total", strategy="rolling", outcome="deployed") == 1
        )

    wait_until(rolled, timeout_s=20, what="the rollout and the new release's requests counted")
    text = scrape(port)
    assert total(text, "hotpatch_release_info", release=new) == 1
    assert total(text, "hotpatch_release_info", release=release) == 0  # its workers are gone
    assert total(text, "hotpatch_deploy_in_progress") == 0

    # an in-place deploy: every worker counts its patch, and serves the new release from then on
    wait_until(
        lambda: all(w.get("listening") for w in site.workers()),
        timeout_s=60,
        what="every worker listening",
    )
    write_app(site.dir, "v3")
    result = deploy(site.srv.pid, strategy="in-place", timeout_s=90)
    assert result.outcome == "deployed", result.reason
    patched = str(result.release)

    def patched_counted() -> bool:
        text = scrape(port)
        return (
            total(text, "hotpatch_patches_total", outcome="applied") == WORKERS
            and total(text, "hotpatch_deploys_total", strategy="in-place", outcome="deployed") == 1
        )

    wait_until(patched_counted, timeout_s=20, what="4 patches and the deploy counted")
    text = scrape(port)
    assert total(text, "hotpatch_release_info", release=patched) == 1
    assert total(text, "hotpatch_release_info", release=new) == 0


def test_without_the_settings_nothing_is_imported_or_served(site: Site) -> None:
    start(site)
    for status, body in (site.srv.get("/imported") for _ in range(12)):
        assert status == 200
        assert body.strip() == "prometheus_client=False"
    status, body = site.srv.get("/metrics")
    assert status == 200
    assert body.startswith("version=v1")  # the app's own answer: no metrics path


@pytest.mark.parametrize("kind", ["open", "link"])
def test_an_unsafe_multiprocess_directory_stops_gunicorn_before_it_serves(
    tmp_path: Path, kind: str
) -> None:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "v1")
    target = tmp_path / "metrics"
    target.mkdir(mode=0o700)
    if kind == "open":
        target.chmod(0o755)  # what prometheus-client's docs suggest; readable by all
        given = target
    else:
        given = tmp_path / "metrics-link"
        given.symlink_to(target)
    env = {
        **os.environ,
        **ENV,
        "PROMETHEUS_MULTIPROC_DIR": str(given),
        "HOTPATCH_METRICS_PATH": "/metrics",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            "127.0.0.1:0",
            "-c",
            "python:hotpatch.gunicorn",
            "app:app",
        ],
        cwd=app_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        start_new_session=True,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "PROMETHEUS_MULTIPROC_DIR" in proc.stderr
    assert str(given) in proc.stderr
    assert not any(target.iterdir())  # nothing written there


def test_uvicorn_workers_record_requests_for_stats_and_prometheus(tmp_path: Path) -> None:
    """The ASGI form of the middleware under real uvicorn workers (FastAPI): the ``stats``
    request and a scrape of the metrics path both count the requests sent."""
    pytest.importorskip("uvicorn_worker", reason="the asgi extra is not installed")
    pytest.importorskip("fastapi", reason="fastapi is not installed (the test extra has it)")
    from hotpatch.control.client import send_request

    app_dir = tmp_path / "app"
    app_dir.mkdir()
    source = (APPS / "asgi_good.py").read_text(encoding="utf-8").replace("__VERSION__", "v1")
    (app_dir / "app.py").write_text(source, encoding="utf-8")
    env = {**ENV, "HOTPATCH_BOOT_TIMEOUT": "60", "HOTPATCH_METRICS_PATH": "/metrics"}
    site = Site(app_dir, workers=2, env=env)
    try:
        server = site.start(extra_args=("--worker-class", "uvicorn_worker.UvicornWorker"))
        release = site.state()["known_good"]
        site.wait_settled(release, timeout_s=120)
        wait_until(
            lambda: all(w.get("listening") for w in site.workers()),
            timeout_s=60,
            what="every worker listening",
        )
        pids = server.worker_pids()

        def stats_total() -> int:
            total_requests = 0
            for pid in pids:
                answer = send_request(pid, "stats", since=2**62, timeout_s=10)
                assert answer["outcome"] == "stats", answer
                assert answer["stats_v"] == 1
                total_requests += answer["releases"].get(release, {}).get("requests", 0)
            return total_requests

        before_stats = stats_total()
        before_scrape = total(scrape(server.port), "hotpatch_requests_total", release=release)
        sent = 60
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(lambda _: server.get("/")[0], range(sent)))
        assert answers == [200] * sent
        wait_until(
            lambda: stats_total() - before_stats == sent,
            timeout_s=20,
            what=f"{sent} requests in the workers' stats",
        )
        wait_until(
            lambda: (
                total(scrape(server.port), "hotpatch_requests_total", release=release)
                - before_scrape
                == sent
            ),
            timeout_s=20,
            what=f"{sent} requests scraped",
        )
    finally:
        site.close()
