"""Deploy strategies under load: stock gunicorn ``kill -HUP``, rolling, in-place, canary, blue-green.

Run: .venv/bin/python benchmarks/bench_deploy.py [--clients 8] [--window 6] [--repeats 3] [--bake 5]
[--strategies "stock HUP,blue-green"]

For each strategy it starts gunicorn (4 sync workers, an app that imports flask for a realistic
boot) on 127.0.0.1, runs client threads (a new connection per request), replaces ``app.py`` with a
good new version and deploys it: stock gunicorn with no config gets SIGHUP; hotpatch's hooks get
``hotpatch deploy --strategy rolling``, ``--strategy in-place``, ``--strategy canary`` (with
``--bake`` seconds, 50 samples per arm at least) or ``--strategy blue-green --keep-old 1`` (the
coordinator called in-process, as the command does; blue-green is waited for until the old master
quits). Measured from the start of the deploy to the end of the window:
the time until every answer comes from the new version ("time to all-new": the first new answer
after the last old one), the longest stretch with no completed request, failed requests and, for
in-place, the coordinator's own time to the last worker's commit. In-place runs twice on one
server (the second deploy finds the engine's indexes built by the first).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hotpatch.demo.harness import GunicornServer, LoadGenerator, wait_until
from hotpatch.gunicorn._canary import CanaryOptions
from hotpatch.gunicorn._client import read_state
from hotpatch.gunicorn._coordinator import deploy

APPS = Path(__file__).resolve().parents[1] / "tests" / "apps"
WORKERS = 4
STRATEGIES = ("stock HUP", "rolling", "in-place", "in-place (2nd)", "canary", "blue-green")
GROUPS = [["stock HUP"], ["rolling"], ["in-place", "in-place (2nd)"], ["canary"], ["blue-green"]]
KEEP_OLD_S = 1.0
BAKE_S = 5.0


@dataclass
class Result:
    strategy: str
    total: int
    failed: int
    gap_ms: float
    all_new_s: float | None
    commit_s: float | None
    outcome: str


def write_app(directory: Path, version: str) -> None:
    text = (APPS / "good.py").read_text(encoding="utf-8").replace("__VERSION__", version)
    text = f"import flask  # a realistic import cost\n{text}"
    (directory / "app.py.tmp").write_text(text, encoding="utf-8")
    (directory / "app.py.tmp").replace(directory / "app.py")


def measure(
    server: GunicornServer,
    directory: Path,
    strategy: str,
    version: str,
    *,
    clients: int,
    window_s: float,
) -> Result:
    old = f"version=v{int(version[1:]) - 1}"
    new = f"version={version}"
    load = LoadGenerator(server.port, clients=clients, timeout_s=5.0).start()
    try:
        wait_until(lambda: load.completed() > 50, timeout_s=20, what="warm-up")
        write_app(directory, version)
        t0 = time.monotonic()
        commit_s = None
        if strategy == "stock HUP":
            os.kill(server.pid, signal.SIGHUP)
            outcome = "signalled"
        else:
            kind = strategy.split(maxsplit=1)[0]
            result = deploy(
                server.pid,
                strategy=kind,
                timeout_s=180,
                keep_old_s=KEEP_OLD_S,
                canary=CanaryOptions(bake_s=BAKE_S, min_samples=50) if kind == "canary" else None,
            )
            outcome = f"{result.outcome} ({result.strategy})"
            commit_s = result.to_last_commit_s
        end = max(t0 + window_s, time.monotonic() + 1.0)
        while time.monotonic() < end:
            time.sleep(0.05)
    finally:
        stats = load.stop()
    answers = [(t, v) for t, v in stats.answers if t >= t0]
    last_old = max((t for t, v in answers if v == old), default=t0)
    first_new = min((t for t, v in answers if v == new and t >= last_old), default=None)
    return Result(
        strategy=strategy,
        total=len(answers) + stats.failed,
        failed=stats.failed,
        gap_ms=stats.longest_gap_s(t0, end) * 1000,
        all_new_s=None if first_new is None else first_new - t0,
        commit_s=commit_s,
        outcome=outcome,
    )


def run_server(strategies: list[str], *, clients: int, window_s: float) -> list[Result]:
    stock = strategies == ["stock HUP"]
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        directory = Path(tmp)
        write_app(directory, "v1")
        server = GunicornServer(
            "app:app",
            cwd=directory,
            workers=WORKERS,
            config=None if stock else "python:hotpatch.gunicorn",
            env={} if stock else {"HOTPATCH_HEALTH_PATH": "/", "HOTPATCH_SETTLE_TIME": "0.5"},
            pass_socket=False,
        )
        try:
            server.wait_serving(workers=WORKERS)
            results = []
            for number, strategy in enumerate(strategies, start=2):
                if not stock:
                    wait_until(
                        lambda: _settled(server.pid), timeout_s=30, what="every worker ready"
                    )
                results.append(
                    measure(
                        server,
                        directory,
                        strategy,
                        f"v{number}",
                        clients=clients,
                        window_s=window_s,
                    )
                )
            return results
        finally:
            server.stop()  # the process group: a blue-green's new master is in it too
            server.close_log()


def _settled(pid: int) -> bool:
    state = read_state(pid) or {}
    workers = state.get("workers") or []
    return (
        len(workers) == WORKERS
        and not state.get("rollout")
        and not state.get("deploy")
        and all(w.get("phase") == "ready" and w.get("listening") for w in workers)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--window", type=float, default=6.0, help="seconds measured per deploy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bake", type=float, default=BAKE_S, help="canary bake, seconds")
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help="comma-separated rows to measure (default: all)",
    )
    args = parser.parse_args(argv)
    globals()["BAKE_S"] = args.bake
    wanted = {s.strip() for s in args.strategies.split(",")}
    runs: dict[str, list[Result]] = {s: [] for s in STRATEGIES if s in wanted}
    for repeat in range(args.repeats):
        groups = [g for g in GROUPS if g[0] in wanted]
        for group in groups:
            for r in run_server(group, clients=args.clients, window_s=args.window):
                runs[r.strategy].append(r)
                print(f"  run {repeat + 1} {r.strategy:<15}: {r.outcome}", file=sys.stderr)
    import gunicorn

    print(
        f"\ngunicorn {gunicorn.__version__}, Python {sys.version.split()[0]}, {WORKERS} sync "
        f"workers, {args.clients} clients, {os.cpu_count()} CPUs, window {args.window:g} s, "
        f"canary bake {args.bake:g} s, medians of {args.repeats} runs\n"
    )
    print(
        "| strategy | time to all-new | longest gap ms | failed / total | to last commit | "
        "outcome |"
    )
    print("|---|---|---|---|---|---|")
    for strategy, results in runs.items():
        news = [r.all_new_s for r in results if r.all_new_s is not None]
        commits = [r.commit_s for r in results if r.commit_s is not None]
        all_new = f"{statistics.median(news):.2f} s" if news else "never"
        commit = f"{statistics.median(commits) * 1000:.0f} ms" if commits else "-"
        gap = statistics.median(r.gap_ms for r in results)
        failed = sum(r.failed for r in results)
        total = sum(r.total for r in results)
        outcomes = ", ".join(sorted({r.outcome for r in results}))
        print(
            f"| {strategy} | {all_new} | {gap:.0f} | {failed} / {total} | {commit} | {outcomes} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
