"""The in-process half of ``hotpatch demo``: an embedded app patched while it serves.

A small threaded HTTP server runs in this process while client threads send requests and count every
failure. Under that load the demo applies a good patch, offers three bad ones (a syntax error, an
exception at import, a version answering 500: each refused before going live), one whose health
check fails (applied, then rolled back), rolls back through the history, and prints a summary.
"""

from __future__ import annotations

import http.client
import importlib
import importlib.util
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from hotpatch.engine import Engine
from hotpatch.errors import PatchRejected

APP_NAME = "hotpatch_demo_app"
APP_V1 = '''\
"""The demo's application module: hotpatch swaps it while it serves."""

VERSION = "v1"
HITS = {"count": 0}  # live state: survives every patch


def greeting(name):
    return f"hello {name}"


def handle(path):
    HITS["count"] += 1
    return 200, f"{greeting('world')} from {VERSION} (hit {HITS['count']})"
'''

APP_V2 = APP_V1.replace('VERSION = "v1"', 'VERSION = "v2"').replace(
    'return f"hello {name}"', 'return f"HELLO, {name.upper()}!"'
)
BROKEN_SYNTAX = APP_V2.replace("def handle(path):", "def handle(path:")
BROKEN_IMPORT = (
    APP_V2 + "\nSETTINGS = {}\nTIMEOUT = SETTINGS['timeout']  # raises KeyError at import\n"
)
ANSWERS_500 = APP_V2.replace('VERSION = "v2"', 'VERSION = "v3"').replace(
    "return 200, f", "return 500, f"
)
UNHEALTHY = (
    APP_V2.replace('VERSION = "v2"', 'VERSION = "v4"')
    + """
BACKENDS = {"search": "ok", "payments": None}  # v4 forgot to configure payments


def __hotpatch_health__():
    missing = [name for name, state in BACKENDS.items() if state != "ok"]
    assert not missing, f"backends not ready: {missing}"
"""
)


def _answers_200(candidate: types.ModuleType) -> None:
    """The demo's verifier: the candidate must answer 200 before it may go live."""
    status, body = candidate.handle("/")
    if status != 200:
        raise AssertionError(f"candidate answered {status}: {body}")


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        app = sys.modules[APP_NAME]
        status, body = app.handle(self.path)
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Load:
    """Client threads that count every request and every failure."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.ok = 0
        self.failed = 0
        self.failures: list[str] = []
        self.bodies: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"demo-client-{i}", daemon=True)
            for i in range(clients)
        ]

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self._stop.is_set():
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read().decode()
                good = response.status < 500
                error = f"HTTP {response.status}: {body}"
            except (OSError, http.client.HTTPException) as exc:
                good, body, error = False, "", f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            with self._lock:
                if good:
                    self.ok += 1
                    self.bodies[body.split(" (hit")[0]] += 1
                else:
                    self.failed += 1
                    self.failures.append(error)
            time.sleep(0.001)
        conn.close()

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def wait_for(self, fragment: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(fragment in body for body in self.bodies):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no response containing {fragment!r} within {timeout_s}s")
            time.sleep(0.01)

    def settle(self, requests: int = 50, timeout_s: float = 10.0) -> None:
        """Let at least ``requests`` more requests complete."""
        target = self.ok + self.failed + requests
        deadline = time.monotonic() + timeout_s
        while self.ok + self.failed < target and time.monotonic() < deadline:
            time.sleep(0.01)


@contextmanager
def _serving(directory: Path) -> Iterator[ThreadingHTTPServer]:
    (directory / f"{APP_NAME}.py").write_text(APP_V1)
    sys.path.insert(0, str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="demo-server", daemon=True)
    try:
        importlib.import_module(APP_NAME)
        thread.start()
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        sys.path.remove(str(directory))
        sys.modules.pop(APP_NAME, None)


def run_in_process_demo(print_fn: Callable[[str], object] = print, *, clients: int = 4) -> bool:
    """The in-process part: returns True when every request succeeded and each step behaved."""
    say = print_fn
    ok_steps = True
    with tempfile.TemporaryDirectory(prefix="hotpatch-demo-") as tmp, _serving(Path(tmp)) as server:
        engine = Engine(health_timeout_s=5)
        engine.track(APP_NAME)
        port = server.server_address[1]
        say(f"\n== In-process hot patching: a threaded HTTP app on http://127.0.0.1:{port}/ ==")
        with _Load(port, clients=clients) as load:
            load.wait_for("from v1")
            load.settle(40)
            say(f"serving v1 under load: {load.ok} requests so far, {load.failed} failed")

            result = engine.patch(APP_NAME, source=APP_V2)
            load.wait_for("from v2")
            say(
                f"[applied]     good patch {result.previous} -> {result.version}: changed "
                f"{', '.join(result.changed)} in {result.duration_s * 1000:.1f} ms; "
                f"live state kept (hits: {sys.modules[APP_NAME].HITS['count']})"
            )

            def refused(tag: str, label: str, source: str) -> bool:
                try:
                    engine.patch(APP_NAME, source=source)
                except PatchRejected as exc:
                    say(f"{tag:<13} {label}: {exc}")
                    return True
                say(f"[UNEXPECTED]  {label}: the patch stayed live")
                return False

            engine.verifier(APP_NAME)(_answers_200)
            outcomes = [
                refused("[refused]", "syntax error", BROKEN_SYNTAX),
                refused("[refused]", "exception at import", BROKEN_IMPORT),
                refused("[refused]", "answers 500", ANSWERS_500),
                refused("[rolled back]", "failed its health check after commit", UNHEALTHY),
            ]
            ok_steps = ok_steps and all(outcomes)
            load.settle()

            baseline = engine.history(APP_NAME)[-1]
            engine.rollback(APP_NAME, to=baseline.id)
            load.wait_for("from v1")
            say(
                f"[rolled back] on request, to {baseline.id} (v1); history: "
                + ", ".join(f"{v.id}:{v.outcome}" for v in engine.history(APP_NAME))
            )
            load.settle()

        versions = ", ".join(f"{body!r} x{n}" for body, n in sorted(load.bodies.items()))
        say(f"responses: {versions}")
        say(
            "(v4 answered the requests that arrived between its commit and its health check's "
            "rollback: health checks run on the live version, verifiers before it goes live)"
        )
        say(f"requests served: {load.ok}, failures: {load.failed}")
        for failure in load.failures[:5]:
            say(f"  failure: {failure}")
        return ok_steps and load.failed == 0
