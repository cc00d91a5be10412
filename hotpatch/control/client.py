"""The client side of the control channel: what ``hotpatch patch/rollback/history --pid`` use.

A pid is only a number: the process behind it may have exited and the number been reused, and
a file in a runtime directory may have been left by a dead process, planted, or linked. The
client must therefore reach exactly the process the operator named, through a socket made by
that process's user, and it must report only what it knows: when it stops waiting, the request
may still be running in the process, and saying "failed" (or "did not answer", as a failure)
would be a guess.

The mechanism: ``send_request`` reads the target's uid from ``/proc/<pid>/status``, finds its
runtime directory (this user's own ``runtime_dir()``, then the directory the target's
environment names, then the defaults for the target's uid) and accepts it only as a real
directory of that uid, private to it; the socket in it must be a socket (never a link) owned by
the same uid. It connects (a refused connect means a stale socket of a dead process), sends one
request that repeats the pid, and checks that the answer names the same pid. It waits at most
``timeout_s``: after a ``started`` event the request is running and ``NoAnswer`` says so; before
it, the request was queued and, because the client hangs up, is cancelled by the server unless
it started at that very moment; both are reported as an unknown outcome, never as a failure.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from hotpatch.control.protocol import (
    ACTIONS,
    MAX_ANSWER_BYTES,
    STARTED_EVENT,
    BadRequest,
    Request,
    Step,
    decode_json_line,
)
from hotpatch.control.server import socket_name, unix_address
from hotpatch.errors import ConfigError, HotpatchError, InsecurePath
from hotpatch.rundir import ENV_RUNTIME_DIR, runtime_dir


class NotListening(HotpatchError):
    """The process exists but has no live control socket (it never called ``listen``, or closed)."""


class OutcomeUnknown(HotpatchError):
    """The request was sent, but no answer came: it may have run, may be running, or not.

    Attributes:
        pid: the process.
        started: whether the process said the request had started.
    """

    def __init__(self, pid: int, message: str, *, started: bool) -> None:
        self.pid = pid
        self.started = started
        super().__init__(message)


class NoAnswer(OutcomeUnknown, TimeoutError):
    """The client stopped waiting after ``timeout_s``; the outcome is unknown."""

    def __init__(self, pid: int, timeout_s: float, *, started: bool) -> None:
        self.timeout_s = timeout_s
        if started:
            where = f"the request started in process {pid} and may still be running in the process"
        else:
            where = (
                f"the request was still queued in process {pid} behind another one; it is "
                "cancelled now that this client left, unless it started at this very moment, "
                "so it may still be running in the process"
            )
        super().__init__(
            pid,
            f"no answer within {timeout_s:g}s: {where}; its outcome is unknown: see "
            f"`hotpatch history --pid {pid}`",
            started=started,
        )


def process_uid(pid: int) -> int:
    """The real uid of process ``pid`` (from ``/proc/<pid>/status``).

    Raises:
        HotpatchError: there is no such process.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            status = fh.read(64 * 1024)
    except (FileNotFoundError, ProcessLookupError):
        raise HotpatchError(f"there is no process {pid}") from None
    except OSError as exc:
        raise HotpatchError(f"cannot read /proc/{pid}/status: {exc.strerror}") from None
    for line in status.splitlines():
        if line.startswith(b"Uid:"):
            return int(line.split()[1])
    raise HotpatchError(f"/proc/{pid}/status names no uid")


def _environment_of(pid: int) -> dict[str, str]:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as fh:
        raw = fh.read(1 << 20)
        pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        return {os.fsdecode(k): os.fsdecode(v) for k, v in pairs}
    return {}


def _directories_of(pid: int, uid: int) -> list[Path]:
    """Where process ``pid`` of ``uid`` may keep its socket: the rule of ``hotpatch.rundir``
    applied to the target's environment (``/proc/<pid>/environ``), then the defaults."""
    env = _environment_of(pid)
    found: list[Path] = []
    if os.path.isabs(env.get(ENV_RUNTIME_DIR, "")):
        found.append(Path(env[ENV_RUNTIME_DIR]))
    if os.path.isabs(env.get("XDG_RUNTIME_DIR", "")):
        found.append(Path(env["XDG_RUNTIME_DIR"]) / "hotpatch")
    default_tmp = "/tmp" if env else tempfile.gettempdir()  # the target's default, if known
    tmp = env["TMPDIR"] if os.path.isabs(env.get("TMPDIR", "")) else default_tmp
    found += [Path(f"/run/user/{uid}/hotpatch"), Path(tmp) / f"hotpatch-{uid}"]
    return list(dict.fromkeys(found))


def _check_directory(path: Path, fd: int, uid: int) -> None:
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise InsecurePath(path, "is not a directory")
    if st.st_uid != uid:
        raise InsecurePath(path, f"is owned by uid {st.st_uid}, not by the process's uid {uid}")
    if st.st_mode & 0o077:
        raise InsecurePath(path, f"has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0700")


def _open_directory(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if os.path.islink(path):
            raise InsecurePath(path, "is a symbolic link; hotpatch never follows one") from None
        if exc.errno == errno.ENOTDIR:
            raise InsecurePath(path, "is not a directory") from None
        raise


def _connect_in(directory: Path, pid: int, uid: int, timeout_s: float) -> socket.socket | None:
    """A connection to ``directory/process-<pid>.sock`` after every check; None if no socket."""
    try:
        dir_fd = _open_directory(directory)
    except FileNotFoundError:
        return None
    try:
        _check_directory(directory, dir_fd, uid)
        path = directory / socket_name(pid)
        try:
            st = os.lstat(path.name, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise InsecurePath(path, "is a symbolic link; hotpatch never follows one")
        if not stat.S_ISSOCK(st.st_mode):
            raise InsecurePath(path, "is not a socket")
        if st.st_uid != uid:
            raise InsecurePath(path, f"is owned by uid {st.st_uid}, not by the process's uid {uid}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(timeout_s, 0.001))
        try:
            sock.connect(unix_address(path, dir_fd))
        except TimeoutError:
            sock.close()
            raise HotpatchError(
                f"process {pid} did not accept the connection within {timeout_s:g}s (busy or "
                "stuck); nothing was sent"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise NotListening(
                f"process {pid} does not listen for hotpatch requests: {path} is a stale socket "
                "(left by a process that is gone; the next hotpatch.listen() of its user removes "
                "it)"
            ) from None
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(dir_fd)


def _connect(pid: int, timeout_s: float) -> socket.socket:
    uid = process_uid(pid)
    me = os.getuid()
    if uid == me:
        # This user's own directory first; then where the target's environment says it is
        # (a service started with another HOTPATCH_RUNTIME_DIR), each checked the same way.
        directories = list(dict.fromkeys([runtime_dir(), *_directories_of(pid, uid)]))
    elif me == 0:
        # Root addressing another user: an explicit HOTPATCH_RUNTIME_DIR first (`sudo
        # HOTPATCH_RUNTIME_DIR=/run/app hotpatch ...`); every candidate must belong to ``uid``.
        configured = os.environ.get(ENV_RUNTIME_DIR, "")
        explicit = [Path(configured)] if os.path.isabs(configured) else []
        directories = list(dict.fromkeys([*explicit, *_directories_of(pid, uid)]))
    else:
        raise HotpatchError(
            f"process {pid} runs as uid {uid}; only that user or root can control it "
            f"(this is uid {me})"
        )
    stale: NotListening | None = None
    unsafe: InsecurePath | None = None
    for directory in directories:
        try:
            sock = _connect_in(directory, pid, uid, timeout_s)
        except NotListening as exc:
            stale = stale or exc  # a dead process's socket; the live one may be further on
            continue
        except InsecurePath as exc:
            unsafe = unsafe or exc  # never used; said if nothing better is found
            continue
        except HotpatchError:
            raise
        except OSError as exc:
            raise HotpatchError(
                f"cannot reach process {pid} through {directory}: {exc.strerror or exc}; "
                "nothing was sent"
            ) from None
        if sock is not None:
            return sock
    if stale is not None:
        raise stale
    if unsafe is not None:
        raise unsafe
    where = " or ".join(str(d) for d in directories)
    raise NotListening(
        f"process {pid} does not listen for hotpatch requests (no {socket_name(pid)} in "
        f"{where}); call hotpatch.listen([...]) in it at start-up"
    )


def send_request(
    pid: int,
    action: str,
    *,
    module: str | None = None,
    to: str | None = None,
    since: int | None = None,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Ask process ``pid`` (which called ``listen``) to act; returns its answer.

    Args:
        pid: the process (a positive pid).
        action: ``patch``, ``check``, ``rollback``, ``history``, or ``promote``/``abort`` (the
            parallel run on ``module``).
        module: the module to roll back (required) or whose history to show (optional).
        to: for ``rollback``: the version to restore.
        since: for ``stats``: the last request number already seen (latencies after it).
        timeout_s: how long to wait for the answer (a positive number of seconds).

    Returns:
        The answer: ``outcome`` is ``applied``, ``patchable``, ``unchanged``, ``rolled_back``,
        ``history``, ``refused`` or ``error`` (with ``message``).

    Raises:
        ConfigError: a wrong argument (pid, action, timeout).
        NotListening: the process does not listen.
        InsecurePath: its runtime directory or socket is not what it must be.
        NoAnswer: no answer within ``timeout_s``: the outcome is unknown.
        OutcomeUnknown: the connection broke after the request was sent.
        HotpatchError: no such process, or it is another user's.
    """
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ConfigError(f"pid must be a positive process id, not {pid!r}")
    if action not in ACTIONS or action == "deploy":
        raise ConfigError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise ConfigError(f"timeout_s must be a number of seconds, not {timeout_s!r}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
    if action == "rollback" and not module:
        raise ConfigError("rollback needs the module to roll back")
    if action in ("promote", "abort") and not module:
        raise ConfigError(f"{action} needs the module under trial")
    deadline = time.monotonic() + timeout_s
    with _connect(pid, timeout_s) as sock:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(Request(action, pid, module, to, since=since).encode())
        except TimeoutError:
            raise NoAnswer(pid, timeout_s, started=False) from None
        except OSError as exc:
            # The server may have answered (a refusal) and closed before reading: show that.
            with contextlib.suppress(HotpatchError, OSError):
                answer = _await_answer(sock, pid, timeout_s, min(deadline, time.monotonic() + 1))
                if answer.get("outcome") == "error":
                    return answer
            raise HotpatchError(f"process {pid}: the request could not be sent: {exc}") from None
        return _await_answer(sock, pid, timeout_s, deadline)


def _await_answer(
    sock: socket.socket,
    pid: int,
    timeout_s: float,
    deadline: float,
    buffer: bytearray | None = None,
    *,
    started: bool = False,
) -> dict[str, Any]:
    if buffer is None:
        buffer = bytearray()
    while True:
        newline = buffer.find(b"\n")
        if newline >= 0:
            line = bytes(buffer[:newline])
            del buffer[: newline + 1]
            try:
                message = decode_json_line(line, max_bytes=MAX_ANSWER_BYTES)
            except BadRequest as exc:
                raise OutcomeUnknown(
                    pid, f"process {pid} sent a malformed answer ({exc})", started=started
                ) from None
            if message.get("event") == STARTED_EVENT:
                started = True
                continue
            if message.get("pid") != pid:
                raise HotpatchError(
                    f"the socket of process {pid} answered for process {message.get('pid')}; "
                    "ignored"
                )
            return message
        if len(buffer) > MAX_ANSWER_BYTES:
            raise OutcomeUnknown(
                pid, f"process {pid} sent an answer over {MAX_ANSWER_BYTES} bytes", started=started
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NoAnswer(pid, timeout_s, started=started)
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise NoAnswer(pid, timeout_s, started=started) from None
        except OSError as exc:
            chunk = b""
            reason = str(exc)
        else:
            reason = "it closed the connection"
        if not chunk:
            raise OutcomeUnknown(
                pid,
                f"process {pid} gave no answer ({reason}); it may have exited, and the request "
                f"may or may not have run: see `hotpatch history --pid {pid}`",
                started=started,
            )
        buffer += chunk


class DeploySession:
    """The coordinator's end of one process's ``deploy`` session (see ``session``).

    ``open`` sends the request and returns the phase-1 answer; ``step`` sends the next step and
    returns its answer; ``close`` hangs up, which the process takes as an abort (before its
    commit: what it prepared is discarded; after it and before ``confirm``: it rolls back).

    Raises (from ``open`` and ``step``):
        NotListening, InsecurePath, HotpatchError: as ``send_request``.
        NoAnswer: no answer within ``timeout_s``; the outcome of that step is unknown.
        OutcomeUnknown: the connection broke after the line was sent.
    """

    def __init__(
        self,
        pid: int,
        *,
        deploy_id: str,
        release: str,
        release_dir: str,
        expires_s: float,
    ) -> None:
        self.pid = pid
        self.deploy_id = deploy_id
        self.request = Request(
            "deploy",
            pid,
            deploy_id=deploy_id,
            release=release,
            release_dir=release_dir,
            expires_ms=max(1, round(expires_s * 1000)),
        )
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    def open(self, *, timeout_s: float) -> dict[str, Any]:
        """Connect, send the request, return the answer to phase 1 (``prepare``)."""
        deadline = time.monotonic() + timeout_s
        self._sock = _connect(self.pid, timeout_s)
        return self._exchange(self.request.encode(), timeout_s, deadline)

    def step(self, step: str, *, timeout_s: float) -> dict[str, Any]:
        """Send ``step`` (``commit``, ``health``, ``confirm``, ``rollback``, ``abort``)."""
        if self._sock is None:
            raise HotpatchError(f"process {self.pid}: the deploy session is closed")
        deadline = time.monotonic() + timeout_s
        return self._exchange(
            Step(step, self.deploy_id).encode(), timeout_s, deadline, started=True
        )

    def _exchange(
        self, line: bytes, timeout_s: float, deadline: float, *, started: bool = False
    ) -> dict[str, Any]:
        sock = self._sock
        assert sock is not None
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(line)
        except TimeoutError:
            raise NoAnswer(self.pid, timeout_s, started=True) from None
        except OSError as exc:
            with contextlib.suppress(HotpatchError, OSError):
                answer = _await_answer(
                    sock, self.pid, timeout_s, min(deadline, time.monotonic() + 1), self._buffer
                )
                return answer
            raise OutcomeUnknown(
                self.pid, f"process {self.pid}: the line could not be sent: {exc}", started=True
            ) from None
        return _await_answer(sock, self.pid, timeout_s, deadline, self._buffer, started=started)

    def close(self) -> None:
        """Hang up (an abort for the process, unless it already confirmed)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
