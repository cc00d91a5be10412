"""A live demonstration of rolling reloads: the example app under gunicorn, under client load.

``run_rollout_demo()`` copies ``examples/gunicorn_app`` to a temporary directory, starts it under
gunicorn with 4 workers on a free 127.0.0.1 port, keeps client threads sending requests, rolls out
a good change (every worker moves to it) and then a broken one (a syntax error: rolled back
automatically), prints what happened, and stops every process it started.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hotpatch.demo.harness import GunicornServer, LoadGenerator, LoadStats, wait_until
from hotpatch.gunicorn._client import read_state, start_rollout, wait_for_rollout

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "gunicorn_app"
WORKERS = 4

_FALLBACK_APP = '''"""The example app (embedded copy, used when examples/ is not shipped)."""
import os

VERSION = "1"


def app(environ, start_response):
    if environ["PATH_INFO"] == "/healthz":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\\n"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"version={VERSION} pid={os.getpid()}\\n".encode()]
'''
_FALLBACK_CONF = """import hotpatch.gunicorn
hotpatch.gunicorn.install(globals(), health_path="/healthz", boot_timeout_s=20)
workers = 4
graceful_timeout = 10
"""


def run_rollout_demo(print_fn: Callable[[str], Any] = print) -> bool:
    """Run the demo; returns True when no request failed and both rollouts ended as expected."""
    workdir = Path(tempfile.mkdtemp(prefix="hotpatch-rollout-demo-"))
    app_dir = workdir / "app"
    _copy_example(app_dir)
    server: GunicornServer | None = None
    load: LoadGenerator | None = None
    try:
        server = GunicornServer(
            "app:app",
            cwd=app_dir,
            workers=WORKERS,
            config="gunicorn.conf.py",
            env={"HOTPATCH_SETTLE_TIME": "0.5"},
        )
        server.wait_serving(workers=WORKERS)
        srv = server
        wait_until(
            lambda: read_state(srv.pid) is not None, timeout_s=10, what="hotpatch state published"
        )
        print_fn(
            f"gunicorn master {server.pid} serving the example on 127.0.0.1:{server.port} "
            f"with {WORKERS} workers; clients running"
        )
        load = LoadGenerator(server.port, clients=4).start()
        wait_until(
            lambda: load is not None and load.completed() > 20, timeout_s=10, what="client load"
        )

        _edit(app_dir / "app.py", 'VERSION = "1"', 'VERSION = "2"')
        good = _rollout(server, "good change (VERSION 1 -> 2)", print_fn)
        good_versions = _versions(server)
        _append(app_dir / "app.py", "\n\ndef broken(:\n    pass\n")
        bad = _rollout(server, "broken change (a syntax error)", print_fn)
        bad_versions = _versions(server)
        stats = load.stop()
        load = None
        print_fn(_summary(stats))
        good_ok = good.get("outcome") == "completed" and good_versions == {"2"}
        bad_ok = bad.get("outcome") == "rolled_back" and bad_versions == {"2"}
        print_fn(
            f"good rollout: {good.get('outcome')} (every worker answers version "
            f"{'/'.join(sorted(good_versions))}) -> {'as expected' if good_ok else 'WRONG'}"
        )
        print_fn(
            f"broken rollout: {bad.get('outcome')}: {bad.get('reason')} (every worker "
            f"answers version {'/'.join(sorted(bad_versions))}) -> "
            f"{'as expected' if bad_ok else 'WRONG'}"
        )
        return stats.failed == 0 and good_ok and bad_ok
    finally:
        if load is not None:
            load.stop()
        if server is not None:
            server.stop()
            server.close_log()
        shutil.rmtree(workdir, ignore_errors=True)


def _copy_example(app_dir: Path) -> None:
    if (EXAMPLE_DIR / "app.py").exists():
        shutil.copytree(EXAMPLE_DIR, app_dir, ignore=shutil.ignore_patterns("__pycache__", "*.pid"))
        return
    app_dir.mkdir(parents=True)
    (app_dir / "app.py").write_text(_FALLBACK_APP, encoding="utf-8")
    (app_dir / "gunicorn.conf.py").write_text(_FALLBACK_CONF, encoding="utf-8")


def _rollout(server: GunicornServer, label: str, print_fn: Callable[[str], Any]) -> dict[str, Any]:
    print_fn(f"rolling out the {label}:")

    def show(event: dict[str, Any]) -> None:
        detail = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "t"))
        print_fn(f"  {event.get('t', 0):6.2f}s {event.get('event')}  {detail}")

    rollout_id = start_rollout(server.pid)
    return wait_for_rollout(server.pid, rollout_id, timeout_s=120, on_event=show)


def _versions(server: GunicornServer, requests: int = 24) -> set[str]:
    seen = set()
    for _ in range(requests):
        status, body = server.get("/")
        if status == 200 and body.startswith("version="):
            seen.add(body.split()[0].split("=", 1)[1])
        else:
            seen.add(f"HTTP {status}")
    return seen


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace(old, new), encoding="utf-8")


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text)


def _summary(stats: LoadStats) -> str:
    return (
        f"client requests: {stats.ok + stats.failed} sent, {stats.ok} answered, "
        f"{stats.failed} failed" + (f" ({stats.errors[:3]})" if stats.failed else "")
    )
