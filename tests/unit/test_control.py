"""The control channel in one process: the protocol's refusals, listen()'s checks, the socket.

The pure protocol is tested alone; the server and client run for real (a Unix socket in a private
runtime directory of this test), in this process. tests/integration/test_control.py drives them
across processes and uids.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch import ConfigError, Engine, listen
from hotpatch.control import NotListening, send_request, server, socket_name
from hotpatch.control.protocol import (
    MAX_DEPTH,
    MAX_REQUEST_BYTES,
    BadRequest,
    Request,
    nesting_depth,
    parse_request,
)
from hotpatch.control.server import MAX_CONNECTIONS, unix_address
from hotpatch.demo.harness import wait_until
from hotpatch.errors import InsecurePath
from tests.conftest import MakeModule


@pytest.fixture(name="run_dir")
def _run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("HOTPATCH_RUNTIME_DIR", str(run))
    return run


# -- protocol (pure) -----------------------------------------------------------------------------
def test_a_request_round_trips() -> None:
    request = Request("rollback", 42, "pkg.mod", "abc123")
    line = request.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_request(line[:-1]) == request
    assert parse_request(Request("patch", 7).encode()[:-1]) == Request("patch", 7)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"[" * 50_000, "nested deeper than"),
        (b'{"v": 1, "pid": [[[[[1]]]]]}', "nested deeper than"),
        (b" " * (MAX_REQUEST_BYTES + 1), "longer than"),
        (b"\xff\xfe binary \x00", "not UTF-8"),
        (b"{", "not valid JSON"),
        (b'"text"', "must be a JSON object"),
        (b'{"v": 1, "action": "patch", "pid": 1, "sudo": true}', "unknown field 'sudo'"),
        (b'{"v": 1, "action": "patch", "pid": "1"}', "'pid' must be int"),
        (b'{"v": 1, "action": "patch", "pid": true}', "'pid' must be int"),
        (b'{"v": 1, "action": "patch", "pid": 1.5}', "'pid' must be int"),
        (b'{"v": 1, "action": "patch", "pid": 0}', "positive process id"),
        (b'{"v": 1, "action": 7, "pid": 1}', "'action' must be str"),
        (b'{"v": 1, "action": "patch", "pid": 1, "module": ""}', "1 to 1024 characters"),
        (b'{"v": 1, "action": "rollback", "pid": 1}', "needs field 'module'"),
        (b'{"v": 3, "action": "patch", "pid": 1}', "protocol version 3 is not supported"),
        (b'{"action": "patch", "pid": 1}', "'v' is required"),
        (b'{"v": 1, "action": "eval", "pid": 1}', "unknown action 'eval'"),
        (b'{"v": 1, "v": 1, "action": "patch", "pid": 1}', "'v' appears twice"),
        (b'{"v": 1, "action": "patch", "pid": Infinity}', "Infinity is not a valid value"),
        (b'{"v": 1, "action": "patch", "pid": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(line: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message.replace("(", r"\(")):
        parse_request(line)


def test_nesting_is_counted_outside_strings_only() -> None:
    assert nesting_depth('{"a": "[[[[[[[[{{{{\\"]]]"}') == 1
    assert nesting_depth("[[]][[[]]]") == 3
    assert nesting_depth("[" * 50_000, stop_above=MAX_DEPTH) == MAX_DEPTH + 1
    assert nesting_depth('{"a": 1}', stop_above=MAX_DEPTH) <= MAX_DEPTH


# -- listen()'s arguments ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("modules", "message"),
    [
        ("json", r"a list of module names, not a string: write listen\(\['json'\]\)"),
        ([], "one or more module names"),
        (42, "not int"),
        (["no_such_module_hp"], "no module named 'no_such_module_hp'"),
        (["json.no_such_sub"], "no module named 'json.no_such_sub'"),
        (["not a name"], "'not a name' is not a module name"),
        ([b"json"], "is not a module name"),
        (["sys"], "'sys' is a built-in or frozen module with no source file"),
        (["_socket"], "'_socket' has no Python source to patch"),
    ],
)
def test_listen_refuses_wrong_modules_at_once(run_dir: Path, modules: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        listen(modules, engine=Engine())  # type: ignore[arg-type]
    assert list(run_dir.iterdir()) == []


def test_listen_accepts_a_namespace_package_and_runs_from_any_thread(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hp_namespace_pkg").mkdir()
    (tmp_path / "hp_namespace_pkg" / "leaf.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    listeners = []
    errors: list[BaseException] = []

    def in_a_thread() -> None:
        try:
            listeners.append(listen(["hp_namespace_pkg"], engine=Engine()))
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(30)
    assert not errors, errors
    try:
        import hp_namespace_pkg.leaf  # noqa: F401  # type: ignore[import-not-found]

        assert listeners[0].listened() == ["hp_namespace_pkg.leaf"]
    finally:
        listeners[0].close()
        sys.modules.pop("hp_namespace_pkg.leaf", None)
        sys.modules.pop("hp_namespace_pkg", None)


# -- the socket, in this process -----------------------------------------------------------------
@pytest.fixture(name="module_and_listener")
def _module_and_listener(run_dir: Path, make_module: MakeModule) -> Iterator[tuple[object, object]]:
    mod = make_module("def f():\n    return 1\n")
    listener = listen([mod.__name__], engine=Engine())
    try:
        yield mod, listener
    finally:
        listener.close()


def test_requests_are_served_and_the_listener_cleans_up(
    run_dir: Path, make_module: MakeModule
) -> None:
    mod = make_module("def f():\n    return 1\n")
    listener = listen([mod.__name__], engine=Engine())
    path = run_dir / socket_name(os.getpid())
    try:
        assert listener.path == path and listener.listened() == [mod.__name__]
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        with pytest.raises(ConfigError, match="already listens"):
            listen([mod.__name__], engine=Engine())
        Path(mod.__file__).write_text("def f():\n    return 2\n")
        result = send_request(os.getpid(), "patch", timeout_s=30)
        assert result["outcome"] == "applied" and mod.f() == 2
        assert result["results"][0]["changed"] == ["f"]
        history = send_request(os.getpid(), "history", module=mod.__name__, timeout_s=30)
        versions = history["modules"][mod.__name__]
        assert [v["outcome"] for v in versions] == ["applied", "baseline"]
        result = send_request(os.getpid(), "rollback", module=mod.__name__, timeout_s=30)
        assert result["outcome"] == "rolled_back" and mod.f() == 1
        result = send_request(os.getpid(), "rollback", module=mod.__name__, timeout_s=30)
        assert result["outcome"] == "error" and "no earlier version" in result["message"]
    finally:
        listener.close()
    assert not path.exists()
    with pytest.raises(NotListening, match="does not listen"):
        send_request(os.getpid(), "history", timeout_s=30)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pid": 0}, "positive process id"),
        ({"pid": -3}, "positive process id"),
        ({"pid": True}, "positive process id"),
        ({"timeout_s": -1}, "positive number of seconds"),
        ({"timeout_s": 0}, "positive number of seconds"),
        ({"timeout_s": float("nan")}, "positive number of seconds"),
        ({"timeout_s": "5"}, "number of seconds"),
        ({"action": "exec"}, "unknown action"),
        ({"action": "rollback"}, "needs the module"),
    ],
)
def test_send_request_refuses_wrong_arguments(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"pid": os.getpid(), "action": "patch", **kwargs}
    with pytest.raises(ConfigError, match=message):
        send_request(**arguments)  # type: ignore[arg-type]


def test_a_stale_socket_of_this_pid_is_replaced_and_others_swept(
    run_dir: Path, make_module: MakeModule
) -> None:
    dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for pid in (os.getpid(), 2**22 + 1):  # this pid (reused) and one that cannot exist
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.bind(unix_address(run_dir / socket_name(pid), dir_fd))
    finally:
        os.close(dir_fd)
    mod = make_module("X = 1\n")
    listener = listen([mod.__name__], engine=Engine())
    try:
        assert sorted(p.name for p in run_dir.iterdir()) == [socket_name(os.getpid())]
        assert send_request(os.getpid(), "history", timeout_s=30)["outcome"] == "history"
    finally:
        listener.close()


def test_something_else_in_place_of_the_socket_is_refused(
    run_dir: Path, make_module: MakeModule
) -> None:
    planted = run_dir / socket_name(os.getpid())
    planted.symlink_to(run_dir / "elsewhere")
    mod = make_module("X = 1\n")
    with pytest.raises(InsecurePath, match="is not a socket of this uid"):
        listen([mod.__name__], engine=Engine())
    assert planted.is_symlink() and not (run_dir / "elsewhere").exists()
    with pytest.raises(InsecurePath, match="is a symbolic link"):
        send_request(os.getpid(), "history", timeout_s=30)


def test_the_runtime_directory_must_be_private(run_dir: Path, make_module: MakeModule) -> None:
    run_dir.chmod(0o755)
    mod = make_module("X = 1\n")
    with pytest.raises(InsecurePath, match="has mode 0755"):
        listen([mod.__name__], engine=Engine())
    assert list(run_dir.iterdir()) == []


def test_a_forked_child_neither_serves_nor_removes_the_socket(
    run_dir: Path, module_and_listener: tuple[object, object]
) -> None:
    _, listener = module_and_listener
    path = run_dir / socket_name(os.getpid())
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        child = os.fork()
    if child == 0:  # pragma: no cover - the child
        report = {"closed": bool(getattr(listener, "is_closed", False))}
        try:
            listener.close()  # type: ignore[attr-defined]
        finally:
            report["socket_kept"] = path.exists()
            os.write(write_end, json.dumps(report).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    os.waitpid(child, 0)
    assert report == {"closed": True, "socket_kept": True}
    assert path.exists()
    assert send_request(os.getpid(), "history", timeout_s=30)["pid"] == os.getpid()


def test_a_fifo_in_place_of_the_socket_is_refused_without_blocking(
    run_dir: Path, make_module: MakeModule
) -> None:
    planted = run_dir / socket_name(os.getpid())
    os.mkfifo(planted, 0o600)
    mod = make_module("X = 1\n")
    with pytest.raises(InsecurePath, match="is not a socket of this uid"):
        listen([mod.__name__], engine=Engine())
    with pytest.raises(InsecurePath, match="is not a socket"):
        send_request(os.getpid(), "history", timeout_s=30)
    assert stat.S_ISFIFO(os.lstat(planted).st_mode)


def test_connections_beyond_the_limit_get_a_busy_answer_and_serving_resumes(
    run_dir: Path, module_and_listener: tuple[object, object]
) -> None:
    address = str(run_dir / socket_name(os.getpid()))
    if len(address) > 100:
        pytest.skip("runtime directory path too long for a plain AF_UNIX address")
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(address)
            idle.append(sock)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.settimeout(30)
            extra.connect(address)
            answer = json.loads(extra.makefile("rb").readline())
        assert answer["error"] == "busy" and answer["pid"] == os.getpid()
    finally:
        for sock in idle:
            sock.close()
    wait_until(
        lambda: send_request(os.getpid(), "history", timeout_s=30).get("outcome") == "history",
        timeout_s=30,
        what="serving to resume once the idle connections closed",
    )


def test_a_client_that_never_finishes_its_request_is_answered_and_dropped(
    run_dir: Path, module_and_listener: tuple[object, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "READ_TIMEOUT_S", 0.5)
    address = str(run_dir / socket_name(os.getpid()))
    if len(address) > 100:
        pytest.skip("runtime directory path too long for a plain AF_UNIX address")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.settimeout(30)
        slow.connect(address)
        slow.sendall(b'{"v": 1, "action": "hist')  # and nothing more
        answer = json.loads(slow.makefile("rb").readline())
    assert answer["error"] == "bad_request"
    assert "no complete request line within 0.5s" in answer["message"]
    assert send_request(os.getpid(), "history", timeout_s=30)["outcome"] == "history"
