"""`hotpatch patch --pid` and `hotpatch rollback --pid` against a real process that listens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hotpatch.control import control_dir

PROGRAM = textwrap.dedent(
    """\
    import pathlib
    import sys
    import time

    sys.path.insert(0, sys.argv[1])
    import target

    import hotpatch

    hotpatch.listen(["target"])
    print("ready", flush=True)
    last = None
    stop = pathlib.Path(sys.argv[1], "stop")
    while not stop.exists():
        value = target.value()
        if value != last:
            print("value", value, flush=True)
            last = value
        time.sleep(0.005)
    """
)
TARGET = "COUNT = 1\n\ndef value():\n    return COUNT\n"


class Program:
    def __init__(self, directory: Path) -> None:
        (directory / "target.py").write_text(TARGET)
        (directory / "program.py").write_text(PROGRAM)
        self.dir = directory
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(directory / "program.py"), str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, line: str, *, timeout_s: float = 20) -> None:
        wait_until(
            lambda: line in self.lines, timeout_s=timeout_s, what=repr(line), output=self.lines
        )

    def hotpatch(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hotpatch", *args],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )

    def stop(self) -> None:
        (self.dir / "stop").touch()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def wait_until(
    predicate: Callable[[], bool], *, timeout_s: float, what: str, output: list[str]
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; output:\n" + "\n".join(output))
        time.sleep(0.01)


@pytest.fixture(name="program")
def _program(tmp_path: Path) -> Iterator[Program]:
    program = Program(tmp_path)
    try:
        program.wait_for("ready")
        program.wait_for("value 1")
        yield program
    finally:
        program.stop()


def test_patch_check_and_rollback_a_running_process(program: Program) -> None:
    pid = str(program.proc.pid)
    unchanged = program.hotpatch("patch", "--pid", pid)
    assert unchanged.returncode == 0, unchanged.stderr
    assert "nothing to do" in unchanged.stdout

    (program.dir / "target.py").write_text(TARGET.replace("COUNT = 1", "COUNT = 2"))
    dry = program.hotpatch("patch", "--pid", pid, "--check")
    assert dry.returncode == 0, dry.stderr
    assert "would apply (dry run) target" in dry.stdout
    assert "value 2" not in program.lines

    applied = program.hotpatch("patch", "--pid", pid)
    assert applied.returncode == 0, applied.stderr
    assert "applied target" in applied.stdout and "changed COUNT" in applied.stdout
    program.wait_for("value 2")

    (program.dir / "target.py").write_text("COUNT = 3\n\ndef value(:\n    return COUNT\n")
    refused = program.hotpatch("patch", "--pid", pid)
    assert refused.returncode == 1
    assert f"{program.dir / 'target.py'}:3" in refused.stderr and "compile" in refused.stderr
    assert "still runs the previous version" in refused.stderr

    rolled = program.hotpatch("rollback", "--pid", pid, "target")
    assert rolled.returncode == 0, rolled.stderr
    program.wait_for("value 1", timeout_s=20)
    assert program.lines.count("value 1") == 2  # back on the first version
    assert program.proc.poll() is None


def test_a_process_that_does_not_listen_gets_a_clear_error(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True
    )
    try:
        result = subprocess.run(
            [sys.executable, "-m", "hotpatch", "patch", "--pid", str(sleeper.pid)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2
        assert "does not listen" in result.stderr and "hotpatch.listen" in result.stderr
        assert not control_dir(sleeper.pid).exists()
    finally:
        os.killpg(sleeper.pid, signal.SIGKILL)
        sleeper.wait(timeout=10)
