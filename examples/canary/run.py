"""Canary a new pricing module under live HTTP load: ``python examples/canary/run.py``.

Serves ``app.application`` on 127.0.0.1 (the standard library's threaded WSGI server), sends
requests from 4 client threads as 500 different users (``X-User-Id``), and starts
``hotpatch.canary("pricing", ...)`` with the source of ``pricing_next.py`` (or, with ``--broken``,
of ``pricing_broken.py``). A status line shows the ramp live: the step, the share, each arm's
calls, errors and median latency. At the end it prints the outcome, what each arm served, the
history of ``pricing`` and every failed request (a broken canary fails some requests of the users
on the new version before it is rolled back; the count is printed and bounded by the share).
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import app  # noqa: E402

import hotpatch  # noqa: E402


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def client(port: int, stop: threading.Event, tally: Counter[str], lock: threading.Lock) -> None:
    rng = random.Random()
    while not stop.is_set():
        sku = rng.choice(["book", "pen", "lamp"])
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/price?sku={sku}&qty={rng.randint(1, 20)}",
            headers={"X-User-Id": f"user-{rng.randrange(500)}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
                outcome = "ok"
        except urllib.error.HTTPError as exc:
            outcome = f"http {exc.code}"
        except OSError as exc:
            outcome = f"connection: {type(exc).__name__}"
        with lock:
            tally[outcome] += 1


def line(trial: hotpatch.Trial) -> str:
    s = trial.status()
    arms = []
    for name in ("old", "new"):
        arm = s.total_arms[name]
        p50 = f"{arm.p50_s * 1e3:.2f} ms" if arm.p50_s is not None else "-"
        arms.append(f"{name} {arm.calls} calls {arm.errors} errors p50 {p50}")
    return f"{s.phase:<11} step {s.step} share {s.share:5.1f}% | " + " | ".join(arms)


def main() -> int:
    parser = argparse.ArgumentParser(description="Canary pricing_next.py under HTTP load.")
    parser.add_argument("--broken", action="store_true", help="canary pricing_broken.py")
    parser.add_argument("--steps", default="5,25,50,100", help="shares in percent")
    parser.add_argument("--step-s", type=float, default=2.0)
    parser.add_argument("--min-calls", type=int, default=50)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args()
    candidate = HERE / ("pricing_broken.py" if args.broken else "pricing_next.py")

    server = make_server(
        "127.0.0.1", 0, app.application, server_class=ThreadingServer, handler_class=QuietHandler
    )
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop, lock, tally = threading.Event(), threading.Lock(), Counter[str]()
    clients = [
        threading.Thread(target=client, args=(port, stop, tally, lock), daemon=True)
        for _ in range(4)
    ]
    for c in clients:
        c.start()
    print(f"serving on 127.0.0.1:{port}; canary of {candidate.name} as pricing")
    trial = hotpatch.canary(
        {"pricing": candidate.read_text(encoding="utf-8")},
        steps=tuple(float(s) for s in args.steps.split(",")),
        step_s=args.step_s,
        min_calls=args.min_calls,
    )
    deadline = time.monotonic() + args.timeout_s
    result = None
    while time.monotonic() < deadline:
        print("\r" + line(trial), end="", flush=True)
        try:
            result = trial.wait(timeout=0.25)
            break
        except TimeoutError:
            continue
    print()
    stop.set()
    for c in clients:
        c.join(timeout=15)
    server.shutdown()
    if result is None:
        print(f"outcome: unknown, the trial is still running after {args.timeout_s}s")
        trial.abort()
        return 2
    print(f"outcome: {result.outcome} ({result.reason}) {result.detail}")
    print(
        f"new version served {result.new_calls} calls, {result.new_errors} errors; "
        f"old version {result.old_calls} calls, {result.old_errors} errors"
    )
    failed = sum(n for outcome, n in tally.items() if outcome != "ok")
    print(f"requests: {sum(tally.values())} sent, {failed} failed {dict(tally)}")
    for version in hotpatch.history("pricing")[:2]:
        print(
            f"history: {version.id} {version.outcome}{' (live)' if version.is_live else ''}"
            f"{' ' + version.reason if version.reason else ''}"
        )
    return 0 if result.outcome == "promoted" else 1


if __name__ == "__main__":
    sys.exit(main())
