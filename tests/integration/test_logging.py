"""hotpatch's logging follows the application, in real processes.

Each app is a fresh interpreter that configures logging as a host application would, then patches
a module; the test reads what it printed. Under gunicorn, hotpatch's events must go where
gunicorn's error log goes (``--error-logfile``), at gunicorn's ``--log-level``.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.demo.harness import Site, assert_no_failures
from hotpatch.gunicorn._client import start_rollout, wait_for_rollout

APPS = Path(__file__).resolve().parents[1] / "apps"

# The part every app shares: a module on disk, patched with a new body once.
PATCH_A_MODULE = """
import pathlib, sys
sys.path.insert(0, sys.argv[1])
pathlib.Path(sys.argv[1], "target.py").write_text("def f():\\n    return 1\\n")
import target
import hotpatch
pathlib.Path(sys.argv[1], "target.py").write_text("def f():\\n    return 2\\n")
result = hotpatch.patch("target")
assert target.f() == 2, result
print("APP DONE", flush=True)
"""

STDLIB_AT = """
import logging, sys
logging.basicConfig(level=logging.{level}, stream=sys.stdout, format="APP|%(name)s|%(levelname)s|%(message)s")
"""

STRUCTLOG_APP = """
import logging, sys
import structlog
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="STDLIB|%(name)s|%(message)s")
structlog.configure(
    processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
    logger_factory=structlog.PrintLoggerFactory(sys.stdout),
)
"""


def run_app(tmp_path: Path, preamble: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(preamble) + PATCH_A_MODULE, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "APP DONE" in proc.stdout, proc
    return proc


def test_an_app_at_warning_sees_no_hotpatch_info(tmp_path: Path) -> None:
    proc = run_app(tmp_path, STDLIB_AT.format(level="WARNING"))
    output = proc.stdout + proc.stderr
    assert "patch." not in output, output
    assert proc.stdout.strip() == "APP DONE" and proc.stderr == "", output


def test_an_unconfigured_app_sees_no_hotpatch_info(tmp_path: Path) -> None:
    """Python's default (no logging configured): warnings and up only, nothing on stdout."""
    proc = run_app(tmp_path, "")
    assert proc.stdout.strip() == "APP DONE" and proc.stderr == "", proc


def test_an_app_at_info_gets_each_event_once_through_its_handler(tmp_path: Path) -> None:
    proc = run_app(tmp_path, STDLIB_AT.format(level="INFO"))
    lines = proc.stdout.splitlines()
    applied = [line for line in lines if "patch.applied" in line]
    assert len(applied) == 1, proc.stdout
    name, level, message = applied[0].split("|")[1:]
    assert (name, level) == ("hotpatch.engine.pipeline", "INFO"), applied
    assert message.startswith("patch.applied ") and "module=target" in message, message
    assert "patch.started" not in proc.stdout  # a debug event, below the app's level
    assert proc.stderr == "", proc.stderr


def test_an_app_that_configured_structlog_gets_the_events_through_structlog(
    tmp_path: Path,
) -> None:
    proc = run_app(tmp_path, STRUCTLOG_APP)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    applied = [e for e in events if e.get("event") == "patch.applied"]
    assert len(applied) == 1, proc.stdout
    assert applied[0]["module"] == "target" and applied[0]["level"] == "info"
    assert "patch.started" in [e.get("event") for e in events]  # structlog's level: all of them
    assert "STDLIB|hotpatch" not in proc.stdout, proc.stdout  # not twice, not through stdlib
    assert proc.stderr == "", proc.stderr


def test_structlog_configured_after_import_is_followed(tmp_path: Path) -> None:
    """The sink is decided at each event, not when hotpatch was imported."""
    preamble = "import hotpatch.engine.pipeline\n" + STRUCTLOG_APP
    proc = run_app(tmp_path, preamble)
    assert '"event": "patch.applied"' in proc.stdout, proc.stdout


# -- gunicorn ---------------------------------------------------------------------------------


@pytest.fixture(name="site")
def _site(tmp_path: Path) -> Iterator[Site]:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "app.py").write_text(
        (APPS / "good.py").read_text(encoding="utf-8").replace("__VERSION__", "v1"),
        encoding="utf-8",
    )
    site = Site(
        app_dir,
        workers=2,
        env={
            "HOTPATCH_HEALTH_PATH": "/healthz",
            "HOTPATCH_BOOT_TIMEOUT": "10",
            "HOTPATCH_HEALTH_TIMEOUT": "5",
            "HOTPATCH_SETTLE_TIME": "0.2",
        },
    )
    try:
        yield site
    finally:
        site.close()


def roll_out_under_load(site: Site, error_log: Path, level: str) -> str:
    """Start gunicorn at ``level``, roll out a new version under load; return the error log."""
    site.start(extra_args=("--log-level", level, "--error-logfile", str(error_log)))
    site.start_load(clients=4)
    source = (APPS / "good.py").read_text(encoding="utf-8").replace("__VERSION__", "v2")
    (site.dir / "app.py.tmp").write_text(source, encoding="utf-8")
    (site.dir / "app.py.tmp").replace(site.dir / "app.py")
    rollout_id = start_rollout(site.srv.pid)
    record = wait_for_rollout(site.srv.pid, rollout_id, timeout_s=90)
    assert_no_failures(site.stop_load())
    assert record["outcome"] == "completed", record
    return error_log.read_text(encoding="utf-8", errors="replace")


def test_gunicorn_at_warning_shows_no_hotpatch_info(site: Site, tmp_path: Path) -> None:
    error_log = roll_out_under_load(site, tmp_path / "error.log", "warning")
    output = site.srv.output()
    for text in (error_log, output):
        for event in ("rollout.started", "rollout.completed", "worker.spawned", "rollout.enabled"):
            assert event not in text, text


def test_gunicorn_at_info_writes_rollout_events_to_its_error_log(
    site: Site, tmp_path: Path
) -> None:
    error_log = roll_out_under_load(site, tmp_path / "error.log", "info")
    lines = error_log.splitlines()
    for event in ("rollout.enabled", "rollout.started", "rollout.completed"):
        found = [line for line in lines if f"] {event} " in line]
        assert len(found) == 1, (event, error_log)
        assert "[INFO]" in found[0], found
    assert "Booting worker" in error_log  # gunicorn's own lines: the same file
    output = site.srv.output()
    assert "rollout.started" not in output, output  # not on stdout as well: once


# -- the command line -------------------------------------------------------------------------

RUN_PROGRAM = """
import pathlib, sys, time
import helper
pathlib.Path(helper.__file__).write_text("def f():\\n    return 2\\n")
deadline = time.monotonic() + 60
while helper.f() != 2:
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.01)
"""


def run_cli(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, prelude: str = ""
) -> tuple[int, str]:
    """``hotpatch run ... prog.py`` on a program that waits for one patch; (exit code, stderr)."""
    (tmp_path / "helper.py").write_text("def f():\n    return 1\n", encoding="utf-8")
    (tmp_path / "prog.py").write_text(prelude + RUN_PROGRAM, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "hotpatch", *args, "prog.py"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done
    assert done.stdout == "", done.stdout
    return done.returncode, done.stderr


@pytest.mark.parametrize(
    "args", [("--log-format", "json", "run"), ("run", "--log-format", "json")], ids=str
)
def test_cli_json_every_event_line_is_json_and_printed_once(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    _, stderr = run_cli(tmp_path, *args)
    events = [json.loads(line) for line in stderr.splitlines()]  # every line is JSON
    names = [e["event"] for e in events]
    assert names.count("watch.change_applied") == 1, names
    assert names.count("patch.applied") == 1, names
    assert names[0] == "watch.started" and names[-1] == "watch.stopped", names


def test_cli_json_renders_watchdogs_own_records_as_json(tmp_path: Path) -> None:
    """watchdog logs through the standard library (an inotify queue overflow, say); with nothing
    configured those lines reached standard error raw, in the middle of the JSON stream."""
    _, stderr = run_cli(
        tmp_path,
        "--log-format",
        "json",
        "run",
        prelude=(
            "import logging\n"
            "logging.getLogger('watchdog.observers.inotify').warning('Inotify queue overflowed')\n"
        ),
    )
    events = [json.loads(line) for line in stderr.splitlines()]
    overflow = [e for e in events if e["event"] == "Inotify queue overflowed"]
    assert len(overflow) == 1, events
    assert overflow[0]["level"] == "warning", overflow
    assert overflow[0]["logger"] == "watchdog.observers.inotify", overflow


def test_cli_log_level_after_the_subcommand(tmp_path: Path) -> None:
    _, stderr = run_cli(tmp_path, "run", "--log-level", "warning", "--log-format", "json")
    assert stderr == "", stderr  # only info events happened


def test_cli_console_prints_each_event_once(tmp_path: Path) -> None:
    _, stderr = run_cli(tmp_path, "run", "--log-format", "console")
    lines = stderr.splitlines()
    assert len([line for line in lines if "applied helper.py" in line]) == 1, stderr
    assert not [line for line in lines if "patch.applied" in line or "change_applied" in line]
    assert "watch.started" in stderr and "\x1b[" not in stderr  # not a terminal: no colours


def test_cli_status_accepts_logging_options_after_the_subcommand(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hotpatch", "status", "--pid", "1", "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert "unrecognized arguments" not in done.stderr, done.stderr
    assert "usage:" not in done.stderr, done.stderr


@pytest.mark.parametrize(("no_color", "colored"), [("1", False), ("", True)], ids=str)
def test_cli_respects_no_color_on_a_terminal(tmp_path: Path, no_color: str, colored: bool) -> None:
    """stderr is a real pseudo-terminal; ``NO_COLOR`` (non-empty) turns colours off."""
    (tmp_path / "helper.py").write_text("def f():\n    return 1\n", encoding="utf-8")
    (tmp_path / "prog.py").write_text(RUN_PROGRAM, encoding="utf-8")
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hotpatch", "run", "prog.py"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            cwd=tmp_path,
            env={**os.environ, "NO_COLOR": no_color},
        )
        os.close(terminal)
        chunks = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the child closes the terminal (EIO on Linux)
            if not select.select([controller], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(controller)
    output = b"".join(chunks).decode("utf-8", "replace")
    assert "watch.started" in output, output
    assert ("\x1b[" in output) is colored, output
