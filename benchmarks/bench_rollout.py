"""Rolling reload under load: stock gunicorn SIGHUP vs hotpatch's rollout, side by side.

Run: .venv/bin/python benchmarks/bench_rollout.py [--clients 8] [--window 6]

For each scenario (good code, syntax error, exception at import, health endpoint returning 500)
and each server (stock gunicorn 4 sync workers with no config; the same with
``-c python:hotpatch.gunicorn`` and ``HOTPATCH_HEALTH_PATH=/healthz``), it starts gunicorn on
127.0.0.1, runs client threads (a new connection per request), replaces ``app.py`` and sends
SIGHUP (hotpatch: the same signal, followed until the rollout ends), and measures from the signal
to the end of the window: failed requests (refused, reset, timed out, non-2xx), p99 and max
latency, the longest stretch with no completed request, and the time until every answer came from
the new version.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hotpatch.demo.harness import GunicornServer, LoadGenerator, wait_until
from hotpatch.gunicorn._client import read_state, wait_for_rollout

APPS = Path(__file__).resolve().parents[1] / "tests" / "apps"
SCENARIOS = {
    "good code": "good.py",
    "syntax error": "syntax_error.py.txt",
    "import exception": "import_error.py",
    "health 500": "health_500.py",
}
WORKERS = 4


@dataclass
class Result:
    scenario: str
    server: str
    total: int
    failed: int
    p99_ms: float
    max_ms: float
    gap_ms: float
    full_rollout_s: float | None
    outcome: str


def write_app(directory: Path, variant: str, version: str) -> None:
    text = (APPS / variant).read_text(encoding="utf-8").replace("__VERSION__", version)
    text = f"import flask  # a realistic import cost (about 0.5 s here)\n{text}"
    (directory / "app.py.tmp").write_text(text, encoding="utf-8")
    (directory / "app.py.tmp").replace(directory / "app.py")


def run_one(
    scenario: str, variant: str, *, hotpatch: bool, clients: int, window_s: float
) -> Result:
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        directory = Path(tmp)
        write_app(directory, "good.py", "v1")
        env = {"HOTPATCH_HEALTH_PATH": "/healthz", "HOTPATCH_SETTLE_TIME": "0.5"}
        server = GunicornServer(
            "app:app",
            cwd=directory,
            workers=WORKERS,
            config="python:hotpatch.gunicorn" if hotpatch else None,
            env=env if hotpatch else {},
            pass_socket=False,
        )
        load = None
        try:
            server.wait_serving(workers=WORKERS)
            if hotpatch:
                wait_until(
                    lambda: read_state(server.pid) is not None, timeout_s=10, what="state.json"
                )
            load = LoadGenerator(server.port, clients=clients, timeout_s=5.0).start()
            wait_until(
                lambda: load is not None and load.completed() > 50, timeout_s=10, what="warm-up"
            )
            write_app(directory, variant, "v2")
            state = read_state(server.pid) if hotpatch else None
            t0 = time.monotonic()
            os.kill(server.pid, signal.SIGHUP)
            outcome = ""
            rollout_s = None
            if hotpatch and state is not None:
                record = wait_for_rollout(server.pid, int(state["next_rollout_id"]), timeout_s=120)
                rollout_s = float(record["duration_s"])
                outcome = f"{record['outcome']} in {rollout_s:.2f} s"
            end = max(t0 + window_s, time.monotonic() + 1.0)
            while time.monotonic() < end:
                time.sleep(0.05)
            stats = load.stop()
            load = None
            alive = server.proc.poll() is None
            answers = [(t, v) for t, v in stats.answers if t >= t0]
            latencies = sorted(
                lat for (t, _), lat in zip(stats.answers, stats.latencies_s) if t >= t0
            )
            new_seen = any(v == "version=v2" for _, v in answers)
            last_old = max((t for t, v in answers if v == "version=v1"), default=t0)
            if not hotpatch:
                if not alive:
                    outcome = "master halted"
                elif new_seen:
                    outcome = "new code live"
                else:
                    outcome = "old code"
            first_new = min(
                (t for t, v in answers if v == "version=v2" and t >= last_old), default=None
            )
            full = None if first_new is None else first_new - t0  # new answers only, from then
            if hotpatch and outcome.startswith("completed"):
                full = rollout_s
            total = len(answers) + stats.failed
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0
            return Result(
                scenario=scenario,
                server="hotpatch" if hotpatch else "stock HUP",
                total=total,
                failed=stats.failed,
                p99_ms=p99 * 1000,
                max_ms=(latencies[-1] if latencies else 0) * 1000,
                gap_ms=stats.longest_gap_s(t0, end) * 1000,
                full_rollout_s=full,
                outcome=outcome + ("" if alive else ", server down"),
            )
        finally:
            if load is not None:
                load.stop()
            server.stop()
            server.close_log()


def ratio(a: float, b: float) -> str:
    if b == 0:
        return "inf" if a else "-"
    return f"{a / b:.1f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--window", type=float, default=6.0, help="seconds measured after HUP")
    args = parser.parse_args(argv)
    results: list[Result] = []
    for scenario, variant in SCENARIOS.items():
        for hotpatch in (False, True):
            r = run_one(
                scenario, variant, hotpatch=hotpatch, clients=args.clients, window_s=args.window
            )
            results.append(r)
            print(f"  measured {scenario:<17} {r.server:<9}: {r.outcome}", file=sys.stderr)
    import gunicorn

    print(
        f"\ngunicorn {gunicorn.__version__}, Python {sys.version.split()[0]}, {WORKERS} sync "
        f"workers, {args.clients} clients, {os.cpu_count()} CPUs, window {args.window:g} s "
        "after SIGHUP\n"
    )
    header = (
        f"| {'scenario':<16} | {'server':<9} | {'failed / total':>14} | {'p99 ms':>7} | "
        f"{'max ms':>7} | {'longest gap ms':>14} | {'full rollout':>12} | outcome |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in results:
        full = f"{r.full_rollout_s:.2f} s" if r.full_rollout_s is not None else "never"
        print(
            f"| {r.scenario:<16} | {r.server:<9} | {f'{r.failed} / {r.total}':>14} | "
            f"{r.p99_ms:7.1f} | {r.max_ms:7.1f} | {r.gap_ms:14.0f} | {full:>12} | "
            f"{r.outcome} |"
        )
    print("\nstock / hotpatch ratios (higher means hotpatch is better):\n")
    print("| scenario | failed | p99 | max | longest gap |")
    print("|---|---|---|---|---|")
    for scenario in SCENARIOS:
        stock, ours = [r for r in results if r.scenario == scenario]
        print(
            f"| {scenario} | {ratio(stock.failed, ours.failed)} | "
            f"{ratio(stock.p99_ms, ours.p99_ms)} | {ratio(stock.max_ms, ours.max_ms)} | "
            f"{ratio(stock.gap_ms, ours.gap_ms)} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
