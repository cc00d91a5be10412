"""A trial in a running process, seen and ended over the control socket (`hotpatch trial`).

A real child process listens (``hotpatch.listen``), runs a canary on its module while it calls it,
and the real command line asks it: its status answer lists the trial, ``hotpatch trial --pid N
abort|promote MODULE`` ends it. The child has its own runtime directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.control import send_request
from hotpatch.demo.harness import wait_until

PROGRAM = textwrap.dedent(
    """\
    import pathlib, sys, time
    here = pathlib.Path(sys.argv[1])
    sys.path.insert(0, str(here))
    import target
    import hotpatch

    def say(text):
        sys.stdout.write(text + "\\n")
        sys.stdout.flush()

    hotpatch.listen(["target"])
    trial = hotpatch.canary(
        {"target": "def value():\\n    return 'new'\\n"}, steps=(50, 100), step_s=600
    )
    say("ready")
    seen = set()
    deadline = time.monotonic() + 300
    while not (here / "stop").exists() and time.monotonic() < deadline:
        value = target.value()
        if value not in seen:
            say(f"value {value}")
            seen.add(value)
        if trial._done.is_set() and "ended" not in seen:
            seen.add("ended")
            say(f"ended {trial.wait(0).outcome} now {target.value()}")
            seen = {"ended"}
        time.sleep(0.002)
    """
)


class Child:
    def __init__(self, directory: Path, run_dir: Path) -> None:
        directory.mkdir()
        (directory / "target.py").write_text("def value():\n    return 'old'\n")
        (directory / "program.py").write_text(PROGRAM)
        self.dir = directory
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("HOTPATCH_RUNTIME_DIR", "XDG_RUNTIME_DIR", "TMPDIR")
        }
        self.env["HOTPATCH_RUNTIME_DIR"] = str(run_dir)
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(directory / "program.py"), str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=self.env,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str) -> None:
        wait_until(
            lambda: any(text in line for line in list(self.lines)),
            timeout_s=60,
            what=repr(text),
            describe=lambda: "\n".join(self.lines),
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hotpatch", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=self.env,
        )

    def stop(self) -> None:
        (self.dir / "stop").touch()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture(name="child")
def _child(tmp_path: Path) -> Iterator[Child]:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    run_dir.chmod(0o700)
    child = Child(tmp_path / "app", run_dir)
    try:
        child.wait_for("ready")
        child.wait_for("value new")  # both arms serve
        child.wait_for("value old")
        yield child
    finally:
        child.stop()


def status_of(child: Child) -> dict[str, object]:
    old = os.environ.get("HOTPATCH_RUNTIME_DIR")
    os.environ["HOTPATCH_RUNTIME_DIR"] = child.env["HOTPATCH_RUNTIME_DIR"]
    try:
        return send_request(child.proc.pid, "status", timeout_s=60)
    finally:
        if old is None:
            del os.environ["HOTPATCH_RUNTIME_DIR"]
        else:
            os.environ["HOTPATCH_RUNTIME_DIR"] = old


def test_status_lists_the_trial_and_the_cli_aborts_it(child: Child) -> None:
    status = status_of(child)
    (trial,) = status["trials"]  # type: ignore[misc]
    assert trial["kind"] == "canary" and trial["modules"] == ["target"]  # type: ignore[index]
    assert trial["phase"] == "running" and trial["share"] == 50.0  # type: ignore[index]
    assert trial["new"]["calls"] > 0  # type: ignore[index]
    done = child.cli("trial", "--pid", str(child.proc.pid), "abort", "target")
    assert done.returncode == 0, done.stdout + done.stderr
    assert ": aborted (manual)" in done.stdout, done.stdout
    child.wait_for("ended aborted now old")
    assert "trials" not in status_of(child)


def test_promote_over_the_control_socket_commits(child: Child) -> None:
    done = child.cli("trial", "--pid", str(child.proc.pid), "promote", "target")
    assert done.returncode == 0, done.stdout + done.stderr
    assert ": promoted (manual)" in done.stdout, done.stdout
    child.wait_for("ended promoted now new")
    history = child.cli("history", "--pid", str(child.proc.pid), "target")
    assert "applied" in history.stdout, history.stdout + history.stderr
    missing = child.cli("trial", "--pid", str(child.proc.pid), "abort", "target")
    assert missing.returncode == 2 and "no parallel run" in missing.stderr, missing.stderr
