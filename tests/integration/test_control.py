"""`hotpatch patch/rollback/history --pid` against a real process that listens on its socket.

Every test runs a real child process that calls ``hotpatch.listen`` and the real command line
(``python -m hotpatch``); where uid matters, a real second uid (65534, ``nobody``) acts. Each child
gets its own runtime directory (``HOTPATCH_RUNTIME_DIR``) so that tests never share sockets with
each other or with anything else on the machine.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import hotpatch
from hotpatch.control.client import _connect
from hotpatch.control.server import socket_name, unix_address
from hotpatch.demo.harness import wait_until

PROGRAM = textwrap.dedent(
    """\
    import pathlib
    import sys
    import time

    here = pathlib.Path(sys.argv[1])
    sys.path.insert(0, str(here))
    import target

    import hotpatch
    import structlog

    structlog.configure(logger_factory=structlog.WriteLoggerFactory())  # one write per line

    def say(text):
        sys.stdout.write(text + "\\n")
        sys.stdout.flush()

    engine = hotpatch.Engine(verify_timeout_s=120)

    @engine.verifier("target")
    def wait_when_blocked(candidate):
        if (here / "block").exists():
            say("verifier waiting")
            deadline = time.monotonic() + 60
            while not (here / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.01)

    hotpatch.listen(["target"], engine=engine)
    say("ready")
    last = None
    stop = here / "stop"
    deadline = time.monotonic() + 300
    while not stop.exists() and time.monotonic() < deadline:
        value = target.value()
        if value != last:
            say(f"value {value}")
            last = value
        time.sleep(0.005)
    """
)
TARGET = "COUNT = 1\n\ndef value():\n    return COUNT\n"
NOBODY = 65534


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def child_env(run_dir: Path | None, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HOTPATCH_RUNTIME_DIR", "XDG_RUNTIME_DIR", "TMPDIR")
    }
    if run_dir is not None:
        env["HOTPATCH_RUNTIME_DIR"] = str(run_dir)
    env.update(extra)
    return env


def hotpatch_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hotpatch", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


class Program:
    """A child process that listens for hotpatch requests and prints its target's value."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        directory.mkdir(exist_ok=True)
        (directory / "target.py").write_text(TARGET)
        (directory / "program.py").write_text(PROGRAM)
        self.dir = directory
        self.env = env
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(directory / "program.py"), str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> str:
        return str(self.proc.pid)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, *, timeout_s: float = 30) -> None:
        wait_until(
            lambda: any(text in line for line in list(self.lines)),
            timeout_s=timeout_s,
            what=repr(text),
            describe=self.output,
        )

    def hotpatch(self, *args: str) -> subprocess.CompletedProcess[str]:
        return hotpatch_cli(self.env, *args)

    def stop(self) -> None:
        (self.dir / "stop").touch()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture(name="run_dir")
def _run_dir(tmp_path: Path) -> Path:
    return private_dir(tmp_path / "run")


@pytest.fixture(name="program")
def _program(tmp_path: Path, run_dir: Path) -> Iterator[Program]:
    program = Program(tmp_path / "app", child_env(run_dir))
    try:
        program.wait_for("ready")
        program.wait_for("value 1")
        yield program
    finally:
        program.stop()


@pytest.fixture(name="sleeper")
def _sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def exchange(
    run_dir: Path, pid: int, data: bytes, *, half_close: bool = False
) -> dict[str, object]:
    """Send raw bytes to process ``pid``'s control socket; its answer line, parsed."""
    dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(unix_address(run_dir / socket_name(pid), dir_fd))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            received = b""
            while b"\n" not in received:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += chunk
    finally:
        os.close(dir_fd)
    assert b"\n" in received, f"no answer line: {received!r}"
    answer = json.loads(received.split(b"\n", 1)[0])
    assert isinstance(answer, dict)
    return answer


def stale_socket(path: Path) -> None:
    """Leave a socket file at ``path`` that nobody listens on (what a killed process leaves)."""
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(unix_address(path, dir_fd))
    finally:
        os.close(dir_fd)


def test_patch_check_history_and_rollback_a_running_process(program: Program) -> None:
    pid = program.pid
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

    history = program.hotpatch("history", "--pid", pid, "--json")
    assert history.returncode == 0, history.stderr
    versions = json.loads(history.stdout)["modules"]["target"]
    assert [v["outcome"] for v in versions] == ["rejected", "applied", "baseline"]
    assert versions[1]["is_live"] and versions[0]["stage"] == "compile"
    baseline = versions[2]["id"]
    text = program.hotpatch("history", "--pid", pid, "target")
    assert text.returncode == 0, text.stderr
    assert f"{versions[1]['id']}  applied" in text.stdout and "live" in text.stdout

    rolled = program.hotpatch("rollback", "--pid", pid, "target", "--to", baseline)
    assert rolled.returncode == 0, rolled.stderr
    assert f"rolled back to {baseline}" in rolled.stdout
    program.wait_for("value 1", timeout_s=30)
    assert program.lines.count("value 1") == 2  # back on the first version

    unknown = program.hotpatch("rollback", "--pid", pid, "nosuch")
    assert unknown.returncode == 2
    assert "'nosuch' is not one this process listens to" in unknown.stderr
    assert program.proc.poll() is None


def test_wrong_pid_and_timeout_arguments_fail_at_once(program: Program) -> None:
    for args, message in (
        (["patch", "--pid", "0"], "argument --pid: must be a positive process id"),
        (["rollback", "--pid", "-4", "target"], "argument --pid"),
        (["history", "--pid", program.pid, "--timeout", "-1"], "argument --timeout"),
        (["patch", "--pid", program.pid, "--timeout", "nan"], "argument --timeout"),
    ):
        result = program.hotpatch(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    assert "control.request" not in program.output()


def test_a_process_that_does_not_listen_gets_a_clear_error(
    run_dir: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    result = hotpatch_cli(child_env(run_dir), "patch", "--pid", str(sleeper.pid))
    assert result.returncode == 2
    assert "does not listen" in result.stderr and "hotpatch.listen" in result.stderr
    assert sleeper.poll() is None


def test_a_reused_pid_is_never_signalled_nor_addressed(
    tmp_path: Path, run_dir: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    # A process that listened under this pid died without cleaning up (SIGKILL), and the pid now
    # belongs to `sleeper`, which never listened. Leftovers of both channel generations are there.
    tmp = private_dir(tmp_path / "tmp")
    old = tmp / f"hotpatch-{os.getuid()}" / f"process-{sleeper.pid}"
    (old / "requests").mkdir(parents=True)
    (old / "results").mkdir()
    (old / "process.json").write_text(json.dumps({"pid": sleeper.pid, "signal": 12}))
    stale_socket(run_dir / socket_name(sleeper.pid))

    result = hotpatch_cli(child_env(run_dir, TMPDIR=str(tmp)), "patch", "--pid", str(sleeper.pid))
    assert result.returncode == 2, result.stderr
    assert "does not listen" in result.stderr and "stale socket" in result.stderr
    assert sleeper.poll() is None, "the reused pid was signalled"
    assert (run_dir / socket_name(sleeper.pid)).exists(), "a client removed a socket"


def test_a_dead_process_leaves_nothing_behind_and_a_stale_socket_is_replaced(
    tmp_path: Path, run_dir: Path
) -> None:
    first = Program(tmp_path / "first", child_env(run_dir))
    try:
        first.wait_for("ready")
        assert (run_dir / socket_name(first.proc.pid)).is_socket()
    finally:
        first.stop()
    assert first.proc.returncode == 0, first.output()
    assert list(run_dir.iterdir()) == [], "a process that exited left its socket"

    killed = Program(tmp_path / "killed", child_env(run_dir))
    killed.wait_for("ready")
    killed.kill()
    stale = run_dir / socket_name(killed.proc.pid)
    assert stale.is_socket()  # SIGKILL: nothing could run
    result = hotpatch_cli(child_env(run_dir), "history", "--pid", str(killed.proc.pid))
    assert result.returncode == 2 and "there is no process" in result.stderr

    second = Program(tmp_path / "second", child_env(run_dir))
    try:
        second.wait_for("ready")
        assert not stale.exists(), "the next listen() did not remove the stale socket"
        assert "control.stale_socket_removed" in second.output()
        assert second.hotpatch("history", "--pid", second.pid).returncode == 0
    finally:
        second.stop()


def test_malformed_requests_get_an_error_answer_and_the_channel_keeps_serving(
    program: Program, run_dir: Path
) -> None:
    pid = program.proc.pid
    good = {"v": 1, "action": "history", "pid": pid}
    cases: list[tuple[bytes, str, bool]] = [
        (b"[" * 5000 + b"\n", "nested deeper than", False),
        (b'{"v": 1, "x": ' + b"[" * 50_000 + b"\n", "nested deeper than", False),
        (b"x" * (2 << 20), "longer than", False),
        (b"\xff\xfe\x00binary\x80\n", "not UTF-8", False),
        (b"not json\n", "not valid JSON", False),
        (b"[1, 2]\n", "must be a JSON object", False),
        (json.dumps({**good, "pid": str(pid)}).encode() + b"\n", "'pid' must be int", False),
        (json.dumps({**good, "module": ["a"]}).encode() + b"\n", "'module' must be str", False),
        (json.dumps({**good, "extra": 1}).encode() + b"\n", "unknown field 'extra'", False),
        (json.dumps({**good, "v": 99}).encode() + b"\n", "protocol version 99", False),
        (json.dumps({**good, "action": "exec"}).encode() + b"\n", "unknown action", False),
        (b'{"v": 1, "v": 1, "action": "history", "pid": 1}\n', "appears twice", False),
        (b'{"v": 1, "action": "history", "pid": NaN}\n', "NaN", False),
        (json.dumps(good).encode(), "without a newline", True),
    ]
    for data, message, half_close in cases:
        answer = exchange(run_dir, pid, data, half_close=half_close)
        assert answer["outcome"] == "error", (data[:40], answer)
        assert answer["error"] == "bad_request", (data[:40], answer)
        assert message in str(answer["message"]), (data[:40], answer)
        served = exchange(run_dir, pid, json.dumps(good).encode() + b"\n")
        assert served["outcome"] == "history", served

    wrong_pid = exchange(run_dir, pid, json.dumps({**good, "pid": pid + 1}).encode() + b"\n")
    assert wrong_pid["error"] == "wrong_process" and f"not {pid + 1}" in str(wrong_pid["message"])
    assert program.proc.poll() is None
    assert "Traceback" not in program.output()
    (program.dir / "target.py").write_text(TARGET.replace("COUNT = 1", "COUNT = 5"))
    applied = program.hotpatch("patch", "--pid", program.pid)
    assert applied.returncode == 0, applied.stderr
    program.wait_for("value 5")


def test_a_client_timeout_says_the_outcome_is_unknown_and_the_patch_lands_later(
    program: Program,
) -> None:
    (program.dir / "block").touch()
    (program.dir / "target.py").write_text(TARGET.replace("COUNT = 1", "COUNT = 2"))
    result = program.hotpatch("patch", "--pid", program.pid, "--timeout", "1")
    assert result.returncode == 3, result.stderr
    assert "no answer within 1s" in result.stderr
    assert "may still be running in the process" in result.stderr
    assert "started" in result.stderr and f"hotpatch history --pid {program.pid}" in result.stderr
    assert "did not answer" not in result.stderr and "failed" not in result.stderr
    assert "value 2" not in program.lines  # still in the verifier
    (program.dir / "release").touch()
    program.wait_for("value 2")  # the request the client gave up on ran to the end
    history = program.hotpatch("history", "--pid", program.pid, "--json")
    versions = json.loads(history.stdout)["modules"]["target"]
    assert versions[0]["outcome"] == "applied" and versions[0]["is_live"]


def test_a_request_still_queued_when_its_client_leaves_is_cancelled_and_never_runs(
    program: Program,
) -> None:
    (program.dir / "target.py").write_text(TARGET.replace("COUNT = 1", "COUNT = 2"))
    assert program.hotpatch("patch", "--pid", program.pid).returncode == 0
    program.wait_for("value 2")
    (program.dir / "block").touch()
    (program.dir / "target.py").write_text(TARGET.replace("COUNT = 1", "COUNT = 3"))
    first = subprocess.Popen(
        [sys.executable, "-m", "hotpatch", "patch", "--pid", program.pid, "--timeout", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=program.env,
    )
    try:
        program.wait_for("verifier waiting")
        queued = program.hotpatch("rollback", "--pid", program.pid, "target", "--timeout", "1")
        assert queued.returncode == 3, queued.stderr
        assert "still queued" in queued.stderr and "outcome is unknown" in queued.stderr
        program.wait_for("control.request_cancelled")
        (program.dir / "release").touch()
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=20)
    assert first.returncode == 0, err
    assert "applied target" in out
    program.wait_for("value 3")
    history = program.hotpatch("history", "--pid", program.pid, "--json")
    outcomes = [v["outcome"] for v in json.loads(history.stdout)["modules"]["target"]]
    assert outcomes == ["applied", "applied", "baseline"], outcomes
    started = [line for line in program.lines if "control.request_started" in line]
    assert not any("action=rollback" in line for line in started), program.output()


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to act as a second uid (65534) and to chown"
)


@needs_root
def test_a_peer_of_another_uid_is_refused_by_the_server(program: Program, run_dir: Path) -> None:
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no /usr/bin/python3 that uid 65534 can run")
    (program.dir / "target.py").write_text(TARGET.replace("COUNT = 1", "COUNT = 2"))
    assert program.hotpatch("patch", "--pid", program.pid).returncode == 0
    program.wait_for("value 2")
    # Defence in depth: even with the file permissions opened (a hard link in a public directory
    # and mode 0666), the server refuses a peer whose uid is neither its own nor root.
    public = Path(tempfile.mkdtemp(prefix="hotpatch-test-"))
    try:
        public.chmod(0o711)
        link = public / "control.sock"
        try:
            os.link(run_dir / socket_name(program.proc.pid), link)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            pytest.skip(f"the test's runtime directory is on another file system than /tmp: {exc}")
        link.chmod(0o666)
        request = json.dumps(
            {"v": 1, "action": "rollback", "pid": program.proc.pid, "module": "target"}
        )
        attacker = textwrap.dedent(
            """\
            import socket, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(sys.argv[1])
            try:
                s.sendall(sys.argv[2].encode() + b"\\n")
            except BrokenPipeError:
                pass  # the server may answer and close before reading
            data = b""
            while b"\\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            print(data.decode())
            """
        )
        result = subprocess.run(
            [python, "-c", attacker, str(link), request],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            user=NOBODY,
            group=NOBODY,
            cwd="/",
        )
    finally:
        shutil.rmtree(public, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["error"] == "permission", answer
    assert f"uid {NOBODY} may not control process {program.pid}" in answer["message"]
    program.wait_for("control.peer_refused")
    history = program.hotpatch("history", "--pid", program.pid, "--json")
    versions = json.loads(history.stdout)["modules"]["target"]
    assert versions[0]["outcome"] == "applied" and versions[0]["is_live"]
    assert [line for line in program.lines if line.startswith("value ")][-1] == "value 2"


@needs_root
def test_a_client_of_another_uid_is_refused_before_it_connects(program: Program) -> None:
    # The real client code, in a forked child that became uid 65534.
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        child = os.fork()
    if child == 0:  # pragma: no cover - the child
        message = "connected"
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            _connect(program.proc.pid, 10).close()
        except BaseException as exc:  # reported to the parent
            message = f"{type(exc).__name__}: {exc}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode()
    finally:
        os.waitpid(child, 0)
    assert message.startswith("HotpatchError: "), message
    assert f"process {program.pid} runs as uid 0; only that user or root" in message


@needs_root
@pytest.mark.parametrize("planted", ["other_owner", "symlink", "open_mode"])
def test_a_planted_runtime_directory_is_refused_with_a_clear_error(
    tmp_path: Path, planted: str, sleeper: subprocess.Popen[bytes]
) -> None:
    # Another local user created <tmp>/hotpatch-<uid> first (or a link, or an open directory).
    tmp = private_dir(tmp_path / "tmp")
    tmp.chmod(0o1777)
    runtime = tmp / f"hotpatch-{os.getuid()}"
    if planted == "symlink":
        target = private_dir(tmp_path / "elsewhere")
        runtime.symlink_to(target)
        expected = "is a symbolic link"
    else:
        runtime.mkdir(mode=0o700)
        if planted == "other_owner":
            os.chown(runtime, NOBODY, NOBODY)
            expected = f"is owned by uid {NOBODY}"
        else:
            runtime.chmod(0o777)
            expected = "has mode 0777"
    env = child_env(None, TMPDIR=str(tmp))
    program = Program(tmp_path / "app", env)
    try:
        wait_until(lambda: program.proc.poll() is not None, timeout_s=60, what="listen to fail")
    finally:
        program.kill()
    assert program.proc.returncode != 0
    assert "InsecurePath" in program.output() and expected in program.output()
    assert str(runtime) in program.output()
    assert "ready" not in program.lines
    client = hotpatch_cli(env, "patch", "--pid", str(sleeper.pid))
    assert client.returncode == 2
    assert expected in client.stderr and str(runtime) in client.stderr
    assert sleeper.poll() is None


def test_a_planted_link_in_place_of_a_socket_is_refused(
    program: Program, run_dir: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    planted = run_dir / socket_name(sleeper.pid)
    planted.symlink_to(run_dir / socket_name(program.proc.pid))
    result = program.hotpatch("patch", "--pid", str(sleeper.pid))
    assert result.returncode == 2
    assert f"{planted}: is a symbolic link" in result.stderr
    assert "control.request" not in program.output()
    planted.unlink()


@needs_root
def test_root_reaches_a_process_of_another_user_through_that_users_socket() -> None:
    base = Path(tempfile.mkdtemp(prefix="hotpatch-test-"))
    run = base / "run"
    ready_read, ready_write = os.pipe()
    hold_read, hold_write = os.pipe()
    child = -1
    try:
        base.chmod(0o711)
        run.mkdir(mode=0o700)
        os.chown(run, NOBODY, NOBODY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            child = os.fork()
        if child == 0:  # pragma: no cover - the child, as uid 65534
            try:
                os.close(ready_read)
                os.close(hold_write)
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                os.environ["HOTPATCH_RUNTIME_DIR"] = str(run)
                listener = hotpatch.listen(["json"], engine=hotpatch.Engine())
                os.write(ready_write, b"ready")
                os.read(hold_read, 1)  # until the parent closes its end
                listener.close()
            except BaseException as exc:  # reported to the parent
                os.write(ready_write, f"{type(exc).__name__}: {exc}".encode())
            finally:
                os._exit(0)
        os.close(ready_write)
        os.close(hold_read)
        message = os.read(ready_read, 4096)
        os.close(ready_read)
        assert message == b"ready", message
        path = run / socket_name(child)
        assert path.lstat().st_uid == NOBODY
        env = child_env(None, HOTPATCH_RUNTIME_DIR=str(run))
        result = hotpatch_cli(env, "history", "--pid", str(child), "json", "--json")
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["pid"] == child and answer["modules"]["json"][0]["outcome"] == "baseline"
        # The same directory with a socket of the wrong owner in the child's name is refused.
        os.chown(path, 0, 0, follow_symlinks=False)
        refused = hotpatch_cli(env, "history", "--pid", str(child))
        assert refused.returncode == 2
        assert f"{path}: is owned by uid 0, not by the process's uid {NOBODY}" in refused.stderr
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    finally:
        os.close(hold_write)
        if child > 0:
            os.waitpid(child, 0)
        shutil.rmtree(base, ignore_errors=True)
