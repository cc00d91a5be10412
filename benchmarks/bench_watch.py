"""Watch mode: save-to-new-code-live latency against a restart reloader and jurigged, in one run.

Run from the repository root (needs ``.venv/bin/pip install jurigged hupper``)::

    .venv/bin/python benchmarks/bench_watch.py                  # full run, about 4 minutes
    .venv/bin/python benchmarks/bench_watch.py --saves 10 --restart-saves 3   # smoke run

Every tool serves the same small Flask app (``app.py`` importing ``views.py``) on 127.0.0.1 from
a temporary directory, in its own process:

- hotpatch: ``python -m hotpatch run app.py PORT`` (in-process patch, werkzeug server threaded);
- jurigged: ``python -m jurigged -w DIR app.py PORT`` (in-process patch);
- werkzeug: ``run_simple(..., use_reloader=True, reloader_type="stat")``, the restart reloader
  ``flask run --reload`` uses (its watchdog variant never fires with watchdog 7, see below);
- hupper: ``hupper -m app PORT`` (restart reloader; uses watchdog when installed).

For each save pattern (in-place write, write-a-temporary-file-then-rename, delete-then-recreate)
the benchmark saves ``views.py`` with a new version string and polls ``GET /`` over HTTP every
millisecond until a response shows it: the latency is from the start of the save to that first
response. A save not seen within the deadline (2 s in-process, 15 s for restart reloaders) is a
missed save; after 10 straight misses a pattern is abandoned (reported as n/n missed). The time
during which requests fail (connection refused while a restart reloader restarts) is reported per
save. Saves are spaced 100 ms apart after the previous one was seen (or missed).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

APP = """\
    import sys

    from flask import Flask

    import views

    app = Flask(__name__)


    @app.route("/")
    def index():
        return views.version()


    if __name__ == "__main__":
        app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True, use_reloader=False)
"""

# werkzeug's reloader as ``flask run --reload`` starts it, but with the stat reloader: with
# watchdog 7 installed, werkzeug picks its watchdog reloader, whose "*.py" patterns match nothing
# under watchdog 7's full-path matching, so it never reloads at all (seen on this machine).
SERVE_WERKZEUG = """\
    import sys

    from werkzeug.serving import run_simple

    from app import app

    run_simple("127.0.0.1", int(sys.argv[1]), app, use_reloader=True, reloader_type="stat",
               threaded=True)
"""

VIEWS = 'def version():\n    return "{version}"\n'


def save_in_place(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as file:
        file.write(text)


def save_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def save_delete_recreate(path: Path, text: str) -> None:
    path.unlink()
    path.write_text(text, encoding="utf-8")


PATTERNS: dict[str, Callable[[Path, str], None]] = {
    "in-place": save_in_place,
    "temp+rename": save_atomic,
    "delete+recreate": save_delete_recreate,
}


@dataclass
class Tool:
    name: str
    kind: str  # "in-process" or "restart"
    command: Callable[[Path, int], list[str]]


TOOLS = [
    Tool(
        "hotpatch",
        "in-process",
        lambda d, port: [sys.executable, "-m", "hotpatch", "run", "app.py", str(port)],
    ),
    Tool(
        "jurigged",
        "in-process",
        lambda d, port: [sys.executable, "-m", "jurigged", "-w", str(d), "app.py", str(port)],
    ),
    Tool("werkzeug", "restart", lambda d, port: [sys.executable, "serve_werkzeug.py", str(port)]),
    Tool(
        "hupper",
        "restart",
        lambda d, port: [str(Path(sys.executable).with_name("hupper")), "-m", "app", str(port)],
    ),
]


@dataclass
class Result:
    tool: str
    pattern: str
    latencies_ms: list[float] = field(default_factory=list)
    missed: int = 0
    unavailable_ms: float = 0.0
    saves: int = 0

    def quantile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        data = sorted(self.latencies_ms)
        return data[min(len(data) - 1, round(q * (len(data) - 1)))]


class Poller:
    """GET / over a kept-alive connection; reconnects after failures."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def get(self) -> str | None:
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            self.conn.request("GET", "/")
            response = self.conn.getresponse()
            body = response.read().decode()
            return body if response.status == 200 else None
        except (OSError, http.client.HTTPException):
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(poller: Poller, expected: str, *, deadline_s: float) -> tuple[float | None, float]:
    """Seconds until a response body equals ``expected`` (None when missed), and for how many of
    them requests failed (from the first failure to the next response)."""
    started = time.perf_counter()
    down_since: float | None = None
    down_s = 0.0
    while True:
        body = poller.get()
        now = time.perf_counter()
        if body is None:
            down_since = now if down_since is None else down_since
        elif down_since is not None:
            down_s += now - down_since
            down_since = None
        if body == expected:
            return now - started, down_s
        if now - started > deadline_s:
            return None, down_s + (now - down_since if down_since is not None else 0.0)
        time.sleep(0.001)


def run_tool(tool: Tool, saves: int, work: Path, log: Path) -> list[Result]:
    directory = work / tool.name
    directory.mkdir()
    (directory / "app.py").write_text(textwrap.dedent(APP), encoding="utf-8")
    (directory / "serve_werkzeug.py").write_text(textwrap.dedent(SERVE_WERKZEUG), encoding="utf-8")
    views = directory / "views.py"
    views.write_text(VIEWS.format(version="v0"), encoding="utf-8")
    port = free_port()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("a") as out:
        out.write(f"\n=== {tool.name}: {' '.join(tool.command(directory, port))}\n")
        out.flush()
        proc = subprocess.Popen(
            tool.command(directory, port),
            cwd=directory,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    poller = Poller(port)
    results = []
    try:
        if wait_for(poller, "v0", deadline_s=30)[0] is None:
            raise RuntimeError(f"{tool.name} did not serve v0 within 30 s; see {log}")
        time.sleep(1.0)  # let the reloader finish setting up its watches
        deadline_s = 2.0 if tool.kind == "in-process" else 15.0
        counter = 0
        for pattern, save in PATTERNS.items():
            result = Result(tool.name, pattern)
            for _ in range(saves):
                counter += 1
                version = f"v{counter}"
                started = time.perf_counter()
                save(views, VIEWS.format(version=version))
                waited, down_s = wait_for(poller, version, deadline_s=deadline_s)
                result.saves += 1
                result.unavailable_ms += down_s * 1000
                if waited is None:
                    result.missed += 1
                    # resynchronize: a later save must not be credited to this one
                    views.write_text(VIEWS.format(version=version), encoding="utf-8")
                else:
                    result.latencies_ms.append((time.perf_counter() - started) * 1000)
                time.sleep(0.1)
                if result.missed >= 10 and not result.latencies_ms:
                    break  # 10 straight misses: the tool does not see this pattern at all
            results.append(result)
            print(f"  {tool.name:9} {pattern:16} {describe(result)}", flush=True)
    finally:
        poller.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    return results


def describe(r: Result) -> str:
    median, p95 = r.quantile(0.5), r.quantile(0.95)
    timing = (
        f"median {median:7.1f} ms  p95 {p95:7.1f} ms"
        if median is not None and p95 is not None
        else "median      -       p95      -   "
    )
    down = r.unavailable_ms / r.saves if r.saves else 0.0
    return f"{timing}  missed {r.missed:3}/{r.saves:<3}  refusing requests {down:6.1f} ms/save"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--saves", type=int, default=100, help="saves per pattern, in-process tools"
    )
    parser.add_argument(
        "--restart-saves",
        type=int,
        default=20,
        help="saves per pattern for the (slow) restart reloaders",
    )
    parser.add_argument("--tools", default="hotpatch,jurigged,werkzeug,hupper")
    args = parser.parse_args()
    wanted = args.tools.split(",")
    all_results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench_watch_") as tmp:
        work = Path(tmp)
        log = work / "tools.log"
        print(
            f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; tool output in {log} "
            "(removed at exit)"
        )
        for tool in TOOLS:
            if tool.name not in wanted:
                continue
            saves = args.saves if tool.kind == "in-process" else args.restart_saves
            print(f"{tool.name} ({tool.kind}, {saves} saves per pattern):", flush=True)
            all_results.extend(run_tool(tool, saves, work, log))
    print("\nratios of median latency (tool / hotpatch):")
    base = {r.pattern: r.quantile(0.5) for r in all_results if r.tool == "hotpatch"}
    for r in all_results:
        median, ref = r.quantile(0.5), base.get(r.pattern)
        if r.tool == "hotpatch" or median is None or not ref:
            continue
        print(f"  {r.tool:9} {r.pattern:16} {median / ref:6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
