"""The gunicorn master under faults: contained errors, trusted state, --user, true stages, outcomes.

Real gunicorn masters on 127.0.0.1 under client load (``hotpatch/demo/harness.py``), counting
every request. Faults are made real: a file name that is not UTF-8, an error raised inside the
master's planning (injected through a gunicorn config file, as a bug would raise it), forged and
planted state files, a worker SIGKILLed during its health check, bad ``HOTPATCH_*`` values, a
client that stops waiting, and workers running as ``nobody`` under ``--user/--group``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotpatch.demo.harness import (
    GunicornServer,
    LoadGenerator,
    _has_control_socket,
    assert_no_failures,
    wait_until,
)
from hotpatch.demo.harness import Site as BaseSite
from hotpatch.errors import ConfigError
from hotpatch.gunicorn._client import load_state, start_rollout, wait_for_rollout
from hotpatch.gunicorn._state import process_start_time, state_dir_for

APPS = Path(__file__).resolve().parents[1] / "apps"
WORKERS = 3
ENV = {
    "HOTPATCH_HEALTH_PATH": "/healthz",
    "HOTPATCH_BOOT_TIMEOUT": "10",
    "HOTPATCH_HEALTH_TIMEOUT": "5",
    "HOTPATCH_SETTLE_TIME": "0.5",
}
CLI = [sys.executable, "-m", "hotpatch", "--log-format", "json"]

FAULT_CONFIG = """
# gunicorn config: hotpatch's hooks, plus a planning error raised inside the master while the
# file named by HOTPATCH_TEST_FAULT says so ("once": while going forward with a new worker
# ready; "always": on every planning step).
import os

import hotpatch.gunicorn
from hotpatch.gunicorn import _machine

hotpatch.gunicorn.install(globals())

_marker = os.environ["HOTPATCH_TEST_FAULT"]
_original = _machine.Rollout.next_actions


def _faulty(self, now):
    try:
        with open(_marker) as fh:
            mode = fh.read().strip()
    except OSError:
        mode = ""
    new_ready = any(
        s.phase == "ready" and s.release == self.target for s in self.workers.values()
    )
    if mode == "always" or (mode == "once" and self.mode == "forward" and new_ready):
        raise RuntimeError("injected planning fault")
    return _original(self, now)


_machine.Rollout.next_actions = _faulty
"""


def write_app(directory: Path, variant: str, version: str) -> None:
    source = (APPS / variant).read_text(encoding="utf-8").replace("__VERSION__", version)
    tmp = directory / "app.py.tmp"
    tmp.write_text(source, encoding="utf-8")
    tmp.replace(directory / "app.py")


class Site(BaseSite):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory, workers=WORKERS, env=ENV)

    def start(  # type: ignore[override]
        self, *, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> GunicornServer:
        write_app(self.dir, "good.py", "v1")
        return super().start(extra_args=extra_args, env=env)

    def rollout(self, *, timeout_s: float = 60) -> dict[str, Any]:
        rollout_id = start_rollout(self.srv.pid)
        return wait_for_rollout(self.srv.pid, rollout_id, timeout_s=timeout_s)

    def versions(self, *, requests: int = 30) -> set[str]:
        seen = set()
        for _ in range(requests):
            status, body = self.srv.get("/")
            assert status == 200, body
            seen.add(body.split()[0])
        return seen


@pytest.fixture(name="site")
def _site(tmp_path: Path) -> Iterator[Site]:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    site = Site(app_dir)
    try:
        yield site
    finally:
        site.close()


# -- 1. nothing escapes into gunicorn's loop --------------------------------------------------


def test_planning_error_in_the_master_rolls_back_and_the_master_stays_up(
    site: Site, tmp_path: Path
) -> None:
    config = tmp_path / "fault_conf.py"
    config.write_text(FAULT_CONFIG, encoding="utf-8")
    marker = tmp_path / "fault"
    marker.write_text("once", encoding="utf-8")
    site.start(
        extra_args=("-c", str(config)),
        env={"HOTPATCH_TEST_FAULT": str(marker)},
    )
    known_good = site.state()["known_good"]
    site.start_load()
    write_app(site.dir, "good.py", "v2")
    record = site.rollout()
    site.wait_settled(known_good)
    stats = site.stop_load()
    site.assert_master_alive()
    assert record["outcome"] == "rolled_back", record
    assert record["stage"] == "internal", record
    assert "injected planning fault" in record["reason"], record
    assert_no_failures(stats)
    assert site.versions() == {"version=v1"}
    output = site.srv.output()
    assert "controller.failed" in output and "Traceback" in output, output[-3000:]
    assert "Unhandled exception in main loop" not in output
    # The master still rolls out once the fault is gone.
    marker.write_text("", encoding="utf-8")
    site.start_load()
    record = site.rollout()
    stats = site.stop_load()
    assert record["outcome"] == "completed", record
    site.wait_settled(record["release"])
    assert_no_failures(stats)
    assert site.versions() == {"version=v2"}


def test_a_rollback_that_keeps_failing_is_abandoned_to_gunicorn(site: Site, tmp_path: Path) -> None:
    config = tmp_path / "fault_conf.py"
    config.write_text(FAULT_CONFIG, encoding="utf-8")
    marker = tmp_path / "fault"
    site.start(extra_args=("-c", str(config)), env={"HOTPATCH_TEST_FAULT": str(marker)})
    known_good = site.state()["known_good"]
    site.start_load()
    write_app(site.dir, "good.py", "v2")
    rollout_id = start_rollout(site.srv.pid)

    def a_new_worker_serves() -> bool:
        return any(w["release"] != known_good and w["phase"] == "ready" for w in site.workers())

    wait_until(
        a_new_worker_serves, timeout_s=30, what="a new worker ready", describe=site.srv.output
    )
    marker.write_text("always", encoding="utf-8")
    record = wait_for_rollout(site.srv.pid, rollout_id, timeout_s=60)
    site.wait_settled(known_good, timeout_s=40)
    stats = site.stop_load()
    site.assert_master_alive()
    assert record["outcome"] == "rollback_failed", record
    assert record["rolled_back"] is False, record
    assert "abandoned" in record["reason"], record
    assert_no_failures(stats)
    assert site.versions() == {"version=v1"}
    assert "rollout.abandoned" in site.srv.output()


def test_a_file_name_that_is_not_utf8_never_takes_the_master_down(site: Site) -> None:
    site.start()
    known_good = site.state()["known_good"]
    site.start_load()
    with open(os.path.join(os.fsencode(site.dir), b"data-\xff\xfe.txt"), "wb") as fh:
        fh.write(b"x")
    write_app(site.dir, "good.py", "v2")
    record = site.rollout()
    stats = site.stop_load()
    site.assert_master_alive()
    assert_no_failures(stats)
    # Refused (the snapshot could not take the name) or rolled out: both are told truthfully.
    assert record["outcome"] in ("failed", "completed"), record
    if record["outcome"] == "failed":
        assert record["rolled_back"] is True and record["known_good"] == known_good
        site.wait_settled(known_good)
        assert site.versions() == {"version=v1"}
    output = site.srv.output()
    assert "Unhandled exception in main loop" not in output


NOISY_APP = """
import os

from hotpatch.gunicorn import _worker

# Junk and a report for another release on this worker's report pipe: the master must refuse them.
_fd = _worker._current.plan.report_fd
os.write(_fd, b"\\xff not json\\n" + b'{"v": 1, "stage": "healthy", "release": "r9-forged"}\\n')
VERSION = "__VERSION__"


def app(environ, start_response):
    body = f"version={VERSION} pid={os.getpid()}\\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def test_junk_on_a_report_pipe_is_refused_and_the_rollout_goes_on(site: Site) -> None:
    site.start()
    site.start_load()
    (site.dir / "app.py").write_text(NOISY_APP.replace("__VERSION__", "v2"), encoding="utf-8")
    record = site.rollout()
    stats = site.stop_load()
    assert record["outcome"] == "completed", record
    site.wait_settled(record["release"])
    assert_no_failures(stats)
    assert site.versions() == {"version=v2"}
    output = site.srv.output()
    assert "malformed report" in output and "r9-forged" in output, output[-3000:]


# -- 2. state on the runtime directory; the client trusts only a verified master -------------


@pytest.fixture(name="bystander")
def _bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process that SIGHUP would kill: it must survive every forged record."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _forge(state_dir: Path, state: dict[str, Any]) -> None:
    import json

    state_dir.mkdir(mode=0o700, exist_ok=True)
    (state_dir / "state.json").write_text(json.dumps(state), encoding="utf-8")


def _assert_refused_and_alive(pid: int, state_dir: Path, proc: subprocess.Popen[bytes]) -> str:
    with pytest.raises(ConfigError) as info:
        start_rollout(pid, state_dir)
    with pytest.raises(subprocess.TimeoutExpired):  # a SIGHUP would have ended it by then
        proc.wait(timeout=0.5)
    return str(info.value)


def test_client_never_signals_a_pid_on_a_forged_record(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    pid = bystander.pid
    state_dir = tmp_path / "state"
    # A record for this pid, but with another start time (a reused pid, or a forgery).
    _forge(state_dir, {"master_pid": pid, "master_start_time": 1, "next_rollout_id": 1})
    assert "start times differ" in _assert_refused_and_alive(pid, state_dir, bystander)
    # A record for another pid.
    start = process_start_time(pid)
    _forge(state_dir, {"master_pid": pid + 1, "master_start_time": start, "next_rollout_id": 1})
    assert "names master" in _assert_refused_and_alive(pid, state_dir, bystander)


def test_client_refuses_unsafe_state_files(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    pid = bystander.pid
    good = {"master_pid": pid, "master_start_time": process_start_time(pid), "next_rollout_id": 1}
    state_dir = tmp_path / "state"
    _forge(state_dir, good)
    path = state_dir / "state.json"
    # A link to a record elsewhere.
    elsewhere = tmp_path / "elsewhere.json"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    assert "link" in _assert_refused_and_alive(pid, state_dir, bystander)
    # A FIFO: refused without blocking.
    path.unlink()
    os.mkfifo(path, 0o600)
    assert "not a regular file" in _assert_refused_and_alive(pid, state_dir, bystander)
    # Huge.
    path.unlink()
    path.write_bytes(b" " * (5 << 20) + b"{}")
    assert "larger than" in _assert_refused_and_alive(pid, state_dir, bystander)
    # Malformed.
    path.write_bytes(b"[" * 100_000)
    assert "JSON" in _assert_refused_and_alive(pid, state_dir, bystander)
    # A directory open to others.
    _forge(state_dir, good)
    state_dir.chmod(0o755)
    assert "mode" in _assert_refused_and_alive(pid, state_dir, bystander)
    state_dir.chmod(0o700)
    if os.geteuid() == 0:  # someone else's directory and file
        os.chown(state_dir, 65534, 65534)
        assert "owned by uid 65534" in _assert_refused_and_alive(pid, state_dir, bystander)
        os.chown(state_dir, 0, 0)
        os.chown(path, 65534, 65534)
        assert "owned by uid 65534" in _assert_refused_and_alive(pid, state_dir, bystander)


def test_status_of_a_malformed_state_is_one_line(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    pid = bystander.pid
    state_dir = tmp_path / "state"
    bad = {"master_pid": pid, "master_start_time": process_start_time(pid), "workers": [{}]}
    _forge(state_dir, bad)
    done = subprocess.run(
        [*CLI, "status", "--pid", str(pid), "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "malformed" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_planted_runtime_directory_leaves_gunicorn_serving_and_sighup_refused(
    tmp_path: Path,
) -> None:
    # Someone else made <tmp>/hotpatch-<uid> first (open to others; someone else's when root).
    tmp = tmp_path / "tmp"
    planted = tmp / f"hotpatch-{os.getuid()}"
    planted.mkdir(parents=True)
    planted.chmod(0o777)
    if os.geteuid() == 0:
        os.chown(planted, 65534, 65534)
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "good.py", "v1")
    env = {**ENV, "TMPDIR": str(tmp), "XDG_RUNTIME_DIR": "", "HOTPATCH_RUNTIME_DIR": ""}
    server = GunicornServer("app:app", cwd=app_dir, workers=WORKERS, env=env)
    load = None
    try:
        server.wait_serving(workers=WORKERS)
        wait_until(
            lambda: "rollout.disabled" in server.output(),
            timeout_s=20,
            what="rollout.disabled",
            describe=server.output,
        )
        assert str(planted) in server.output()
        load = LoadGenerator(server.port).start()
        wait_until(lambda: load.completed() > 20, timeout_s=10, what="client load running")
        write_app(app_dir, "good.py", "v2")
        os.kill(server.pid, signal.SIGHUP)
        wait_until(
            lambda: "rollout.refused" in server.output(),
            timeout_s=20,
            what="rollout.refused",
            describe=server.output,
        )
        stats = load.stop()
        load = None
        assert_no_failures(stats)
        assert server.proc.poll() is None
        # Nothing was put in the planted directory, and the old code still answers everywhere.
        assert list(planted.iterdir()) == []
        bodies = {server.get("/")[1].split()[0] for _ in range(20)}
        assert bodies == {"version=v1"}
    finally:
        if load is not None:
            load.stop()
        server.stop()
        print(server.output()[-20000:])
        server.close_log()


def test_master_state_lives_in_a_private_runtime_directory(site: Site) -> None:
    site.start()
    state_dir = state_dir_for(site.srv.pid)
    st = os.lstat(state_dir)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
    assert stat.S_IMODE(st.st_mode) & 0o077 == 0
    state = load_state(site.srv.pid)
    assert state["master_start_time"] == process_start_time(site.srv.pid)
    assert not (state_dir / "reports").exists()  # reports come through pipes


# -- 3. gunicorn --user/--group -------------------------------------------------------------

USER_APP = """
import os

VERSION = "__VERSION__"


def app(environ, start_response):
    body = f"version={VERSION} pid={os.getpid()} uid={os.getuid()}\\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def _nobody() -> tuple[int, int] | None:
    try:
        entry = pwd.getpwuid(65534)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


@pytest.fixture(name="public_app_dir")
def _public_app_dir() -> Iterator[Path]:
    """A 0755 directory outside /root and pytest's 0700 tmp_path, so nobody can read it."""
    directory = Path(tempfile.mkdtemp(prefix="hotpatch-user-test-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _write_user_app(directory: Path, version: str) -> None:
    path = directory / "app.py"
    tmp = directory / "app.py.tmp"
    tmp.write_text(USER_APP.replace("__VERSION__", version), encoding="utf-8")
    tmp.chmod(0o644)
    tmp.replace(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="--user/--group needs a root master")
@pytest.mark.skipif(_nobody() is None, reason="no user with uid 65534 (nobody) on this machine")
def test_user_and_group_workers_serve_and_roll(public_app_dir: Path) -> None:
    user_args = ("--user", "65534", "--group", "65534")
    _write_user_app(public_app_dir, "v1")
    # Stock gunicorn serves this app as nobody.
    stock = GunicornServer(
        "app:app", cwd=public_app_dir, workers=2, config=None, extra_args=user_args
    )
    try:
        try:
            stock.wait_serving(workers=2)
        except RuntimeError as exc:  # the comparison this test makes is impossible here
            pytest.skip(
                "stock gunicorn itself cannot serve as uid 65534 on this interpreter (its "
                "workers import standard modules after dropping privileges, from a directory "
                f"that user cannot read): {str(exc).splitlines()[-1][:200]}"
            )
        assert "uid=65534" in stock.get("/")[1]
    finally:
        stock.stop()
        stock.close_log()
    # So does gunicorn with hotpatch's hooks, and a rollout moves every worker to v2.
    site = BaseSite(public_app_dir, workers=WORKERS, env=ENV)
    try:
        site.start(extra_args=user_args)
        load = site.start_load()
        assert load is not None
        _write_user_app(public_app_dir, "v2")
        rollout_id = start_rollout(site.srv.pid)
        record = wait_for_rollout(site.srv.pid, rollout_id, timeout_s=60)
        stats = site.stop_load()
        assert record["outcome"] == "completed", (record, site.srv.output()[-4000:])
        site.wait_settled(record["release"])
        assert_no_failures(stats)
        bodies = {site.srv.get("/")[1].split()[0] for _ in range(20)}
        assert bodies == {"version=v2"}
        assert "uid=65534" in site.srv.get("/")[1]
        # The release is readable by the workers' group only; the state directory stays private.
        state_dir = state_dir_for(site.srv.pid)
        release_dir = Path(load_state(site.srv.pid)["releases_dir"]) / record["release"]
        st = os.lstat(release_dir)
        assert st.st_uid == 0 and st.st_gid == 65534
        assert stat.S_IMODE(st.st_mode) & 0o027 == 0
        assert stat.S_IMODE(os.lstat(state_dir).st_mode) & 0o077 == 0
        # A worker gunicorn respawns as nobody also serves the release.
        victim = site.srv.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in site.srv.worker_pids(), timeout_s=10, what="worker reaped")
        site.wait_settled(record["release"])
        site.assert_master_alive()
    finally:
        site.close()


# -- 4. the true stage ----------------------------------------------------------------------


def test_a_worker_killed_during_its_health_check_is_reported_at_stage_health(site: Site) -> None:
    site.start(env={"HOTPATCH_HEALTH_TIMEOUT": "60"})
    known_good = site.state()["known_good"]
    site.start_load()
    write_app(site.dir, "health_hang.py", "v2")
    rollout_id = start_rollout(site.srv.pid)
    checking: list[int] = []

    def one_in_health_check() -> bool:
        checking[:] = [
            w["pid"]
            for w in site.workers()
            if w["release"] != known_good and w["phase"] == "loaded"
        ]
        return bool(checking)

    wait_until(
        one_in_health_check,
        timeout_s=30,
        what="a new worker in its check",
        describe=site.srv.output,
    )
    os.kill(checking[0], signal.SIGKILL)
    record = wait_for_rollout(site.srv.pid, rollout_id, timeout_s=60)
    site.wait_settled(known_good)
    stats = site.stop_load()
    assert record["outcome"] == "rolled_back", record
    assert record["stage"] == "health", record
    assert "during its health check" in record["reason"], record
    assert record["worker_pid"] == checking[0]
    assert_no_failures(stats)
    site.assert_master_alive()


# -- 5. HOTPATCH_* errors: one line, exit 2, before gunicorn listens --------------------------


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("HOTPATCH_BOOT_TIMEOUT", "soon", "expected a number of seconds"),
        ("HOTPATCH_HEALTH_PATH", "healthz", "must start with '/'"),
        ("HOTPATCH_WATCH", "maybe", "expected one of"),
        ("HOTPATCH_STATE_DIR", "<a 0755 directory>", "must be private"),
        ("HOTPATCH_RUNTIME_DIR", "<a 0755 directory>", "must be private"),
    ],
)
def test_a_bad_setting_stops_gunicorn_with_one_line_before_it_listens(
    tmp_path: Path, variable: str, value: str, words: str
) -> None:
    write_app(tmp_path, "good.py", "v1")
    if value == "<a 0755 directory>":  # (never a shared one: old code chmod-ed what it was given)
        value = str(tmp_path / "open")
        Path(value).mkdir(mode=0o755)
        Path(value).chmod(0o755)
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            *(["--no-control-socket"] if _has_control_socket() else []),
            "-c",
            "python:hotpatch.gunicorn",
            "app:app",
        ],
        cwd=tmp_path,
        env={**os.environ, variable: value},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    accepted = 0
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                accepted += 1
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    lines = err.decode().splitlines()
    assert proc.returncode == 2, (proc.returncode, err.decode())
    assert len(lines) == 1, err.decode()
    assert variable in lines[0] and words in lines[0], lines
    assert accepted == 0
    assert b"Listening" not in out + err


# -- 6. truthful outcomes on the command line ------------------------------------------------


def test_rollout_timeout_says_still_running_and_the_master_completes_it(site: Site) -> None:
    site.start(env={"HOTPATCH_SETTLE_TIME": "3"})
    site.start_load()
    write_app(site.dir, "good.py", "v2")
    done = subprocess.run(
        [*CLI, "rollout", "--pid", str(site.srv.pid), "--timeout", "0.2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "FAILED" not in done.stdout + done.stderr
    assert "NOT rolled back" not in done.stdout + done.stderr
    assert "still running" in done.stderr and "hotpatch status --pid" in done.stderr
    rollout_id = int(done.stdout.split()[1])
    record = wait_for_rollout(site.srv.pid, rollout_id, timeout_s=60)
    stats = site.stop_load()
    assert record["outcome"] == "completed", record
    assert_no_failures(stats)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["rollout", "--pid", "0"], "--pid"),
        (["rollout", "--pid", "-5"], "--pid"),
        (["rollout", "--pid", "abc"], "--pid"),
        (["status", "--pid", "0"], "--pid"),
        (["rollout", "--pid", "1", "--timeout", "-1"], "--timeout"),
        (["rollout", "--pid", "1", "--timeout", "nan"], "--timeout"),
        (["demo", "--clients", "0"], "--clients"),
    ],
)
def test_bad_arguments_get_one_line(args: list[str], words: str) -> None:
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert words in lines[0]
