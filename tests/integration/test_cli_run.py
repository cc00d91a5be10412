"""``hotpatch run``: a real program in a subprocess, edited while it runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

APP = """\
    import os
    import sys
    import time

    import greeting

    print("argv", sys.argv, flush=True)
    print("path0", sys.path[0], flush=True)
    print("name", __name__, flush=True)
    if __name__ == "__main__":
        while not os.path.exists("stop"):
            print("says", greeting.message(), flush=True)
            time.sleep(0.02)
        sys.exit(int(sys.argv[1]))
"""

GREETING = 'def message():\n    return "v1"\n'


def wait_until(
    predicate: Callable[[], object], *, what: str | Callable[[], str], timeout_s: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            message = what if isinstance(what, str) else what()
            pytest.fail(f"timed out after {timeout_s}s waiting for {message}")
        time.sleep(0.01)


@dataclass
class Program:
    proc: subprocess.Popen[str]
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def start_readers(self) -> list[threading.Thread]:
        readers = []
        for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            assert stream is not None
            reader = threading.Thread(target=lambda s=stream, out=lines: out.extend(s), daemon=True)
            reader.start()
            readers.append(reader)
        return readers

    def output(self) -> str:
        return "stdout:\n" + "".join(self.stdout) + "\nstderr:\n" + "".join(self.stderr)

    def wait_stdout(self, text: str, *, what: str) -> None:
        wait_until(
            lambda: any(text in line for line in self.stdout),
            what=lambda: f"{what}\n{self.output()}",
        )

    def wait_stderr(self, text: str, *, what: str) -> None:
        wait_until(
            lambda: any(text in line for line in self.stderr),
            what=lambda: f"{what}\n{self.output()}",
        )

    def last_said(self) -> str:
        said = [line.split()[1] for line in list(self.stdout) if line.startswith("says ")]
        return said[-1] if said else ""


def stop_group(
    proc: subprocess.Popen[str], *, term_timeout_s: float, kill_timeout_s: float
) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=term_timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=kill_timeout_s)


RunProgram = Callable[..., Program]


@pytest.fixture(name="run_program")
def _run_program(tmp_path: Path) -> Iterator[RunProgram]:
    started: list[tuple[Program, list[threading.Thread]]] = []

    def run(*args: str) -> Program:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "hotpatch", "--log-format", "console", "run", *args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=env,
        )
        program = Program(proc)
        started.append((program, program.start_readers()))
        return program

    yield run
    for program, readers in started:
        stop_group(program.proc, term_timeout_s=5, kill_timeout_s=5)
        for reader in readers:
            reader.join(timeout=5)
        for stream in (program.proc.stdout, program.proc.stderr):
            if stream is not None:
                stream.close()


def write(path: Path, text: str) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(textwrap.dedent(text), encoding="utf-8")
    os.replace(temp, path)  # atomic save, as most editors do


def test_run_script_patches_saved_modules_and_propagates_argv_and_exit_code(
    tmp_path: Path, run_program: RunProgram
) -> None:
    write(tmp_path / "app.py", APP)
    write(tmp_path / "greeting.py", GREETING)
    program = run_program("app.py", "7", "--flag")
    program.wait_stdout("says v1", what="the program to start")
    assert f"argv {['app.py', '7', '--flag']}\n" in program.stdout
    assert f"path0 {os.path.realpath(tmp_path)}\n" in program.stdout
    assert "name __main__\n" in program.stdout

    write(tmp_path / "greeting.py", GREETING.replace("v1", "v2"))
    wait_until(lambda: program.last_said() == "v2", what=lambda: f"v2 printed\n{program.output()}")
    program.wait_stderr("hotpatch: applied greeting.py", what="the applied message")

    write(tmp_path / "greeting.py", 'def message():\n    return "v3"\n\nraise ValueError("bad")\n')
    program.wait_stderr("change refused at execute", what="the refusal on the terminal")
    refusal = next(line for line in program.stderr if "change refused" in line)
    assert refusal.startswith("hotpatch: greeting.py:4: change refused at execute: ValueError")
    program.wait_stderr("still running the previous version of greeting", what="the reassurance")
    assert program.last_said() == "v2"
    assert program.proc.poll() is None

    write(tmp_path / "greeting.py", GREETING.replace("v1", "v4"))
    wait_until(lambda: program.last_said() == "v4", what=lambda: f"v4 printed\n{program.output()}")

    (tmp_path / "stop").touch()
    assert program.proc.wait(timeout=10) == 7, program.output()


def test_run_module_sets_argv_like_python_m(tmp_path: Path, run_program: RunProgram) -> None:
    write(tmp_path / "app_mod.py", APP)
    write(tmp_path / "greeting.py", GREETING)
    program = run_program("-m", "app_mod", "3", "--x")
    program.wait_stdout("says v1", what="the program to start")
    assert f"argv {[str(tmp_path / 'app_mod.py'), '3', '--x']}\n" in program.stdout
    write(tmp_path / "greeting.py", GREETING.replace("v1", "v2"))
    wait_until(lambda: program.last_said() == "v2", what=lambda: f"v2 printed\n{program.output()}")
    (tmp_path / "stop").touch()
    assert program.proc.wait(timeout=10) == 3, program.output()


def test_an_uncaught_error_exits_1_with_the_programs_traceback(
    tmp_path: Path, run_program: RunProgram
) -> None:
    write(tmp_path / "crash.py", "def boom():\n    raise KeyError('k')\n\nboom()\n")
    program = run_program("crash.py")
    assert program.proc.wait(timeout=10) == 1
    program.wait_stderr("KeyError: 'k'", what="the traceback")
    assert not any("runpy" in line or "hotpatch/cli/" in line for line in program.stderr)


def test_saving_the_main_script_patches_it(tmp_path: Path, run_program: RunProgram) -> None:
    """New definitions in the script go live; its main block (the running program) is not rerun."""
    app = textwrap.dedent(APP).replace("greeting.message()", "local()")
    app = app.replace("import greeting\n", "import greeting\n\ndef local():\n    return 'v1'\n")
    write(tmp_path / "app.py", app)
    write(tmp_path / "greeting.py", GREETING)
    program = run_program("app.py", "0")
    program.wait_stdout("says v1", what="the program to start")
    write(tmp_path / "app.py", (tmp_path / "app.py").read_text().replace("'v1'", "'v2'"))
    try:
        wait_until(lambda: program.last_said() == "v2", what="v2", timeout_s=3)
    finally:
        (tmp_path / "stop").touch()
