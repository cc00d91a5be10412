"""The recording middleware's cost per request, on a trivial WSGI app, in process.

Run: .venv/bin/python benchmarks/bench_middleware.py [--requests 200000] [--repeats 5]

Each request is what a WSGI server does: call the app with a ``start_response``, iterate the
body, call ``close()``. Measured: the bare app, the app inside ``RecordingMiddleware`` (the
counts and latency ring the canary judge reads), and the same with the Prometheus sink in
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` in a private temporary directory). The overhead is
the difference of the per-request means (the best of ``--repeats`` runs each).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

from hotpatch.gunicorn._metrics import Recorder, RecordingMiddleware

BODY = [b"hello world\n"]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12")])
    return BODY


def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
    return None


def per_request_ns(wsgi: Callable[..., Iterable[bytes]], n: int) -> float:
    environ = {"PATH_INFO": "/", "REQUEST_METHOD": "GET"}
    started = time.perf_counter_ns()
    for _ in range(n):
        body = wsgi(environ, start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return (time.perf_counter_ns() - started) / n


def best(wsgi: Callable[..., Iterable[bytes]], n: int, repeats: int) -> float:
    return min(per_request_ns(wsgi, n) for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    n, repeats = args.requests, args.repeats

    recorded = RecordingMiddleware(app, recorder=Recorder(), release_of=lambda: "r1")
    bare_ns = best(app, n, repeats)
    recorded_ns = best(recorded, n, repeats)

    with tempfile.TemporaryDirectory(prefix="bench-prom-") as directory:
        os.chmod(directory, 0o700)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        from hotpatch.gunicorn import _prometheus

        _prometheus._define()
        exported = RecordingMiddleware(
            app,
            recorder=Recorder(),
            release_of=lambda: "r1",
            sink=_prometheus.worker_sink(os.getpid()),
        )
        exported_ns = best(exported, n // 4, repeats)

    print(
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {n} requests per run, "
        f"best of {repeats} runs"
    )
    print("| app | per request | overhead |")
    print("|---|---|---|")
    print(f"| bare trivial app | {bare_ns / 1000:.2f} us | - |")
    print(
        f"| in RecordingMiddleware | {recorded_ns / 1000:.2f} us | "
        f"+{(recorded_ns - bare_ns) / 1000:.2f} us |"
    )
    print(
        f"| + Prometheus sink (multiprocess) | {exported_ns / 1000:.2f} us | "
        f"+{(exported_ns - bare_ns) / 1000:.2f} us |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
