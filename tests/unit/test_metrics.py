"""The request-recording middleware and its counts (``hotpatch.gunicorn._metrics``), no server.

The middleware must not change what the app does (an exception escapes unchanged, the iterable's
``close()`` runs exactly once) and must record the truth: the status class, escaped exceptions,
and the latency to the end of the response iterable (a streaming response included).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hotpatch.gunicorn._metrics import (
    RING_SIZE,
    Recorder,
    RecordingMiddleware,
    code_class,
    unwrap,
)


class Closing:
    """A response iterable that counts its ``close()`` calls."""

    def __init__(self, chunks: list[bytes], *, fail_at: int | None = None) -> None:
        self.chunks = chunks
        self.fail_at = fail_at
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        for i, chunk in enumerate(self.chunks):
            if i == self.fail_at:
                raise RuntimeError("broken stream")
            yield chunk

    def close(self) -> None:
        self.closed += 1


def make(app: Any, release: str = "r1") -> tuple[RecordingMiddleware, Recorder]:
    recorder = Recorder()
    return RecordingMiddleware(app, recorder=recorder, release_of=lambda: release), recorder


def serve(mw: Any, path: str = "/") -> tuple[list[str], bytes, Any]:
    """What a WSGI server does: call, iterate, close (once)."""
    seen: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        seen.append(status)
        return lambda data: None

    body = mw({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, start_response)
    try:
        data = b"".join(body)
    finally:
        if hasattr(body, "close"):
            body.close()
    return seen, data, body


def counts(recorder: Recorder, release: str = "r1") -> dict[str, Any]:
    return recorder.snapshot(since=0)["releases"][release]  # type: ignore[no-any-return]


def test_a_request_is_counted_by_status_class_with_its_latency() -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("404 Not Found", [])
        return [b"no"]

    mw, recorder = make(app)
    statuses, data, _ = serve(mw)
    assert statuses == ["404 Not Found"]
    assert data == b"no"
    c = counts(recorder)
    assert c["requests"] == 1
    assert c["classes"] == {"2xx": 0, "3xx": 0, "4xx": 1, "5xx": 0}
    assert c["errors"] == 0
    assert c["exceptions"] == 0
    assert len(c["latencies_s"]) == 1


def test_an_exception_escaping_the_app_is_counted_and_re_raised_unchanged() -> None:
    error = ValueError("app bug")

    def app(environ: Any, start_response: Any) -> list[bytes]:
        raise error

    mw, recorder = make(app)
    with pytest.raises(ValueError, match="app bug") as caught:
        mw({"PATH_INFO": "/"}, lambda *a: None)
    assert caught.value is error
    assert caught.value.__traceback__ is not None
    frames = []
    tb = caught.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert frames[-1] == "app"  # the original traceback, re-raised (not a new exception)
    c = counts(recorder)
    assert (c["requests"], c["exceptions"], c["errors"]) == (1, 1, 1)
    assert c["classes"]["5xx"] == 1  # what gunicorn answers when the app raised first


def test_an_exception_while_streaming_is_counted_and_the_iterable_closed_once() -> None:
    inner = Closing([b"a", b"b", b"c"], fail_at=1)

    def app(environ: Any, start_response: Any) -> Closing:
        start_response("200 OK", [])
        return inner

    mw, recorder = make(app)
    with pytest.raises(RuntimeError, match="broken stream"):
        serve(mw)
    assert inner.closed == 1
    c = counts(recorder)
    assert (c["requests"], c["exceptions"], c["errors"]) == (1, 1, 1)
    assert c["classes"]["2xx"] == 1


def test_close_reaches_the_app_exactly_once_however_often_the_server_calls_it() -> None:
    inner = Closing([b"x"])

    def app(environ: Any, start_response: Any) -> Closing:
        start_response("200 OK", [])
        return inner

    mw, recorder = make(app)
    _, _, body = serve(mw)
    body.close()
    body.close()
    assert inner.closed == 1
    assert counts(recorder)["requests"] == 1


def test_close_once_when_the_server_stops_iterating_early_and_the_body_is_collected() -> None:
    inner = Closing([b"x", b"y", b"z"])

    def app(environ: Any, start_response: Any) -> Closing:
        start_response("200 OK", [])
        return inner

    mw, recorder = make(app)
    body = mw({"PATH_INFO": "/"}, lambda *a: None)
    iterator = iter(body)
    assert next(iterator) == b"x"
    body.close()  # the client went away: the server closes without finishing
    del iterator, body
    assert inner.closed == 1
    assert counts(recorder)["requests"] == 1


def test_a_generator_app_is_closed_and_its_finally_runs() -> None:
    ran: list[str] = []

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        try:
            yield b"1"
            yield b"2"
        finally:
            ran.append("finally")

    mw, recorder = make(app)
    body = mw({"PATH_INFO": "/"}, lambda *a: None)
    assert next(iter(body)) == b"1"
    body.close()
    assert ran == ["finally"]
    assert counts(recorder)["requests"] == 1


def test_the_latency_of_a_streaming_response_runs_to_its_last_chunk() -> None:
    release_second = threading.Event()

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"first"
        release_second.wait(5)
        yield b"second"

    mw, recorder = make(app)
    body = mw({"PATH_INFO": "/"}, lambda *a: None)
    it = iter(body)
    assert next(it) == b"first"
    started = time.perf_counter()
    time.sleep(0.05)  # the stream is still open: this time is part of the request
    release_second.set()
    assert list(it) == [b"second"]
    waited = time.perf_counter() - started
    body.close()
    (latency,) = counts(recorder)["latencies_s"]
    assert latency >= waited - 1e-6 >= 0.05 - 1e-6


def test_a_second_start_response_with_exc_info_sets_the_recorded_status() -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        try:
            raise KeyError("late")
        except KeyError:
            start_response("503 Service Unavailable", [], sys.exc_info())
        return [b"sorry"]

    seen: list[tuple[str, bool]] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        seen.append((status, exc_info is not None))

    mw, recorder = make(app)
    body = mw({"PATH_INFO": "/"}, start_response)
    b"".join(body)
    body.close()  # type: ignore[attr-defined]
    assert seen == [("200 OK", False), ("503 Service Unavailable", True)]
    c = counts(recorder)
    assert c["classes"]["5xx"] == 1
    assert c["errors"] == 1
    assert c["exceptions"] == 0


def test_counts_follow_the_release_the_worker_runs_at_each_request() -> None:
    release = ["r1"]

    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b""]

    recorder = Recorder()
    mw = RecordingMiddleware(app, recorder=recorder, release_of=lambda: release[0])
    serve(mw)
    release[0] = "d2"  # an in-place deploy moved the worker
    serve(mw)
    serve(mw)
    releases = recorder.snapshot()["releases"]
    assert releases["r1"]["requests"] == 1
    assert releases["d2"]["requests"] == 2


def test_the_metrics_path_is_answered_by_the_middleware_and_not_counted() -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        raise AssertionError("the app must not see the metrics path")

    def metrics(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"metrics"]

    recorder = Recorder()
    mw = RecordingMiddleware(
        app,
        recorder=recorder,
        release_of=lambda: "r1",
        metrics_path="/metrics",
        serve_metrics=metrics,
    )
    _, data, _ = serve(mw, "/metrics")
    assert data == b"metrics"
    assert recorder.snapshot()["releases"] == {}


def test_a_failing_sink_never_breaks_the_response() -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    def sink(*args: Any) -> None:
        raise OSError("disk full")

    recorder = Recorder()
    mw = RecordingMiddleware(app, recorder=recorder, release_of=lambda: "r1", sink=sink)
    _, data, _ = serve(mw)
    assert data == b"ok"
    assert counts(recorder)["requests"] == 1


def test_unwrap_gives_the_app_to_health_probes() -> None:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        return []

    mw, _ = make(app)
    assert unwrap(mw) is app
    assert unwrap(app) is app


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("200 OK", "2xx"),
        ("302 Found", "3xx"),
        ("499 Client Closed", "4xx"),
        ("503 Busy", "5xx"),
        (None, "5xx"),
        ("", "5xx"),
        ("abc", "5xx"),
        ("99", "5xx"),
    ],
)
def test_code_class(status: str | None, expected: str) -> None:
    assert code_class(status) == expected


def test_snapshot_since_returns_only_new_latencies_and_says_what_was_missed() -> None:
    recorder = Recorder()
    for i in range(10):
        recorder.record("r1", "2xx", exception=False, latency_s=i / 1000)
    first = recorder.snapshot(since=0)["releases"]["r1"]
    assert first["seq"] == 10
    assert first["latencies_s"] == [i / 1000 for i in range(10)]
    for i in range(10, 13):
        recorder.record("r1", "2xx", exception=False, latency_s=i / 1000)
    later = recorder.snapshot(since=10)["releases"]["r1"]
    assert later["latencies_s"] == [0.01, 0.011, 0.012]
    assert later["missed"] == 0
    # more requests than the ring keeps: the newest are returned, the others counted as missed
    for _ in range(RING_SIZE + 5):
        recorder.record("r1", "2xx", exception=False, latency_s=0.5)
    overflow = recorder.snapshot(since=13)["releases"]["r1"]
    assert len(overflow["latencies_s"]) == RING_SIZE
    assert overflow["missed"] == 5
    # a reader ahead of the worker (its first reading) gets no latencies, only the counts
    ahead = recorder.snapshot(since=2**62)["releases"]["r1"]
    assert ahead["latencies_s"] == []
    assert ahead["missed"] == 0


def test_recording_is_consistent_under_threads() -> None:
    recorder = Recorder()

    def hammer() -> None:
        for _ in range(2000):
            recorder.record("r1", "5xx", exception=True, latency_s=0.001)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    c = recorder.snapshot(since=2**62)["releases"]["r1"]
    assert (c["requests"], c["errors"], c["exceptions"], c["classes"]["5xx"]) == (8000,) * 4


# -- settings and the Prometheus export's checks ----------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HOTPATCH_METRICS_PORT": "0"}, "expected a TCP port"),
        ({"HOTPATCH_METRICS_PORT": "65536"}, "expected a TCP port"),
        ({"HOTPATCH_METRICS_PORT": "http"}, "expected a TCP port"),
        ({"HOTPATCH_METRICS_PORT": "9.5"}, "expected a TCP port"),
        ({"HOTPATCH_METRICS_PATH": "metrics"}, "the metrics path must start with '/'"),
        ({"HOTPATCH_METRICS_PATH": "/me trics"}, "must not contain spaces"),
        ({"HOTPATCH_METRICS_ADDR": "1.2.3.4 x"}, "expected an address"),
    ],
)
def test_bad_metrics_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    from hotpatch.errors import ConfigError
    from hotpatch.gunicorn._settings import load_settings

    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(env)
    assert next(iter(env)) in str(caught.value)


def test_metrics_settings_are_read_and_off_by_default() -> None:
    from hotpatch.gunicorn._settings import load_settings

    assert not load_settings({}).exports_metrics
    settings = load_settings({"HOTPATCH_METRICS_PORT": "9102", "HOTPATCH_METRICS_PATH": "/m"})
    assert (settings.metrics_port, settings.metrics_path, settings.metrics_addr) == (
        9102,
        "/m",
        "127.0.0.1",
    )
    assert settings.exports_metrics


def test_the_missing_extra_is_a_clear_setting_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from hotpatch.errors import ConfigError
    from hotpatch.gunicorn import _prometheus

    monkeypatch.setattr(_prometheus, "is_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'hotpatch\[prometheus\]'"):
        _prometheus.check_multiproc_dir({})


def test_a_multiprocess_directory_open_to_others_is_refused(tmp_path: Any) -> None:
    from hotpatch.errors import ConfigError
    from hotpatch.gunicorn import _prometheus

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="PROMETHEUS_MULTIPROC_DIR") as caught:
        _prometheus.check_multiproc_dir({"PROMETHEUS_MULTIPROC_DIR": str(shared)})
    assert str(shared) in str(caught.value)
    with pytest.raises(ConfigError, match="does not exist"):
        _prometheus.check_multiproc_dir({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "none")})
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    _prometheus.check_multiproc_dir({"PROMETHEUS_MULTIPROC_DIR": str(private)})


def test_a_scrape_leaves_out_files_a_worker_is_creating_or_left_broken(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker creates its file empty and sizes it afterwards (prometheus/client_python#1199);
    a worker killed mid-write leaves a cut file. Neither may fail the scrape of every metric."""
    import struct
    import subprocess

    from prometheus_client.parser import text_string_to_metric_families

    from hotpatch.gunicorn import _prometheus

    directory = tmp_path / "metrics"
    directory.mkdir(mode=0o700)
    code = (
        "from prometheus_client import Counter; "
        "Counter('hotpatch_requests_total', 'h', ['release']).labels('r1').inc(7)"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert [p.name for p in directory.iterdir()]  # the worker's real file
    (directory / "counter_999999.db").touch()  # a worker being created: 0 bytes
    cut = struct.pack("i", 4096) + b"\0" * 4 + struct.pack("i", 900) + b"junk"
    (directory / "histogram_999998.db").write_bytes(cut)  # says 4096 bytes used, has 16
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))

    answered: list[str] = []
    body = b"".join(_prometheus.serve_metrics({}, lambda status, headers: answered.append(status)))
    assert answered == ["200 OK"]
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert values[("hotpatch_requests_total", (("release", "r1"),))] == 7


def test_importing_the_hooks_and_the_middleware_imports_no_prometheus_client() -> None:
    import subprocess

    code = (
        "import sys, hotpatch.gunicorn, hotpatch.gunicorn._metrics, hotpatch.gunicorn._canary, "
        "hotpatch.gunicorn._prometheus; print('prometheus_client' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


# -- the ASGI form ----------------------------------------------------------------------------


def asgi_serve(mw: Any, path: str = "/") -> list[dict[str, Any]]:
    import asyncio

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(mw({"type": "http", "path": path, "method": "GET"}, receive, send))
    return sent


def test_asgi_requests_are_counted_by_status_class() -> None:
    from hotpatch.gunicorn._metrics import ASGIRecordingMiddleware
    from hotpatch.health import is_asgi_app

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 302, "headers": []})
        await send({"type": "http.response.body", "body": b"moved"})

    recorder = Recorder()
    mw = ASGIRecordingMiddleware(app, recorder=recorder, release_of=lambda: "r1")
    assert is_asgi_app(mw)  # uvicorn's interface="auto" still sees an ASGI 3 app
    sent = asgi_serve(mw)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    c = counts(recorder)
    assert (c["requests"], c["classes"]["3xx"], c["errors"]) == (1, 1, 0)
    assert unwrap(mw) is app


def test_an_asgi_exception_is_counted_and_re_raised_unchanged() -> None:
    from hotpatch.gunicorn._metrics import ASGIRecordingMiddleware

    error = LookupError("asgi bug")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise error

    recorder = Recorder()
    mw = ASGIRecordingMiddleware(app, recorder=recorder, release_of=lambda: "r1")
    with pytest.raises(LookupError) as caught:
        asgi_serve(mw)
    assert caught.value is error
    c = counts(recorder)
    assert (c["requests"], c["exceptions"], c["errors"], c["classes"]["2xx"]) == (1, 1, 1, 1)


def test_asgi_streaming_latency_runs_to_the_last_body_and_other_scopes_pass() -> None:
    import asyncio

    from hotpatch.gunicorn._metrics import ASGIRecordingMiddleware

    scopes: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope["type"])
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await asyncio.sleep(0.05)  # the stream is open: part of the request's time
        await send({"type": "http.response.body", "body": b"b"})

    recorder = Recorder()
    mw = ASGIRecordingMiddleware(app, recorder=recorder, release_of=lambda: "r1")
    asgi_serve(mw)
    asyncio.run(mw({"type": "lifespan"}, None, None))
    assert scopes == ["http", "lifespan"]
    (latency,) = counts(recorder)["latencies_s"]
    assert latency >= 0.05
    assert counts(recorder)["requests"] == 1  # the lifespan scope is not a request


def test_asgi_no_response_counts_as_5xx_and_the_metrics_path_is_served() -> None:
    from hotpatch.gunicorn._metrics import ASGIRecordingMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    def metrics(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"m 1\n"]

    recorder = Recorder()
    mw = ASGIRecordingMiddleware(
        app, recorder=recorder, release_of=lambda: "r1", metrics_path="/m", serve_metrics=metrics
    )
    asgi_serve(mw)
    assert counts(recorder)["classes"]["5xx"] == 1
    sent = asgi_serve(mw, "/m")
    assert sent[0]["status"] == 200
    assert sent[0]["headers"] == [(b"content-type", b"text/plain")]
    assert sent[1]["body"] == b"m 1\n"
    assert counts(recorder)["requests"] == 1


def test_the_servers_file_wrapper_is_kept_for_sendfile_and_recorded_at_close() -> None:
    class FileWrapper:  # as gunicorn's: close set on the instance when the file has one
        def __init__(self, filelike: Any) -> None:
            self.filelike = filelike
            self.close = filelike.close

        def __iter__(self) -> Iterator[bytes]:
            yield self.filelike.read()

    class File:
        closed = 0

        def read(self) -> bytes:
            return b"data"

        def close(self) -> None:
            File.closed += 1

    def app(environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](File())

    mw, recorder = make(app)
    result = mw({"PATH_INFO": "/", "wsgi.file_wrapper": FileWrapper}, lambda *a: None)
    assert isinstance(result, FileWrapper)  # the server can still sendfile() it
    assert counts_or_none(recorder) is None  # not finished before the server closes it
    result.close()
    assert File.closed == 1
    assert counts(recorder)["requests"] == 1


def counts_or_none(recorder: Recorder) -> Any:
    return recorder.snapshot()["releases"].get("r1")


def test_a_metrics_port_in_use_is_a_setting_error_and_the_directory_is_private(
    tmp_path: Any,
) -> None:
    import json
    import socket
    import subprocess

    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code = f"""
import json, os, stat
from hotpatch.errors import ConfigError
from hotpatch.gunicorn import _prometheus
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
try:
    _prometheus.start_master(4242, port={port}, addr="127.0.0.1")
    out = {{"error": None}}
except ConfigError as exc:
    out = {{"error": str(exc)}}
d = os.environ["PROMETHEUS_MULTIPROC_DIR"]
st = os.lstat(d)
out.update(dir=d, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid)
print(json.dumps(out))
"""
        env = {**os.environ, "HOTPATCH_RUNTIME_DIR": str(runtime)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env=env,
        )
    out = json.loads(proc.stdout)
    assert "cannot serve metrics on 127.0.0.1:" in out["error"]
    assert out["dir"] == str(runtime / "prometheus-4242")
    assert out["mode"] == 0o700
    assert out["uid"] == os.getuid()
