"""The process side of the control channel: ``hotpatch.listen()`` and its socket server.

A process that opts in (``hotpatch.listen(["myapp"])``) can be patched, checked, rolled back and
asked for its history from outside, by ``hotpatch patch/rollback/history --pid``. The channel
must let in the process's own user and root, and nobody else; it must not be fooled by a pid
that now belongs to another process, by leftovers of a dead process, or by malformed input; and
it must never run anything inside a signal handler (which interrupts whatever the main thread is
running, perhaps the very code being replaced) or send a signal that the application or gunicorn
uses for something else (``SIGUSR2`` is gunicorn's binary upgrade).

The mechanism: one Unix domain socket per listening process, ``process-<pid>.sock`` (mode 0600)
in the runtime directory of its uid (``hotpatch.rundir.runtime_dir()``: private, owner and mode
checked, never through a link). It is bound under a temporary name and renamed into place, so a
stale socket of a dead process that had the same pid is replaced atomically; ``listen()`` also
removes every stale socket of this uid it finds (a connect that is refused means nobody listens).
The socket is the identity: the name carries the pid, the request repeats it and the server
refuses a request meant for another pid, and ``close()`` (also at exit, never in a forked child)
unlinks the socket so a dead process leaves nothing behind. A daemon thread accepts connections;
each is served in its own thread (at most ``MAX_CONNECTIONS`` at once), checks the peer's uid
with ``SO_PEERCRED`` (same uid or root), reads one request of the ``protocol`` and answers it
inside a catch-everything boundary. Requests that change code run one at a time; a request that
is still queued when its client hangs up is cancelled and never runs.

A gunicorn worker listens through ``listen_release`` instead (the hook does it, no code in the
app): it patches the modules whose files lie in its release's snapshot directory, and it also
serves ``deploy`` sessions (``session``: one worker's part of an in-place deploy) and ``status``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotpatch._log import get_logger
from hotpatch.control.protocol import (
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    STARTED_EVENT,
    BadRequest,
    Request,
    Step,
    encode_line,
    error_answer,
    parse_request,
    parse_step,
)
from hotpatch.control.session import ReleaseHooks, ReleaseState, run_session
from hotpatch.engine import Engine, PatchResult, Version, default_engine
from hotpatch.engine.candidate import text_sha256
from hotpatch.engine.safepoint import use_commit_thread
from hotpatch.errors import ConfigError, HotpatchError, InsecurePath, PatchRejected
from hotpatch.rundir import runtime_dir

log = get_logger(__name__)

SOCKET_PREFIX = "process-"
SOCKET_SUFFIX = ".sock"
MAX_CONNECTIONS = 8
READ_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 30.0
QUEUE_POLL_S = 0.05
PROBE_TIMEOUT_S = 1.0
MAX_SWEEP_ENTRIES = 10_000
_MAX_UNIX_PATH = 100  # sun_path holds 108 bytes on Linux; keep a margin


def socket_name(pid: int) -> str:
    """The file name of process ``pid``'s control socket in its runtime directory."""
    return f"{SOCKET_PREFIX}{pid}{SOCKET_SUFFIX}"


def unix_address(path: Path, dir_fd: int | None) -> str:
    """An ``AF_UNIX`` address for ``path``: itself, or via ``/proc/self/fd`` when too long."""
    text = os.fsdecode(path)
    if len(os.fsencode(text)) <= _MAX_UNIX_PATH or dir_fd is None:
        return text
    return f"/proc/self/fd/{dir_fd}/{path.name}"


def probe(address: str) -> str:
    """``"alive"``, ``"stale"`` (connect refused: nobody listens) or ``"gone"`` (no file)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(PROBE_TIMEOUT_S)
        try:
            sock.connect(address)
        except ConnectionRefusedError:
            return "stale"
        except FileNotFoundError:
            return "gone"
        except OSError:
            return "alive"  # busy or slow: not provably stale, so never removed
    return "alive"


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of ``conn`` (Linux ``SO_PEERCRED``)."""
    layout = "iII"  # struct ucred: pid_t, uid_t, gid_t
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(layout))
    pid, uid, gid = struct.unpack(layout, raw)
    return pid, uid, gid


def _modules_argument(modules: Iterable[str]) -> tuple[str, ...]:
    """Validate ``listen``'s ``modules``: a list of names of Python modules or packages."""
    if isinstance(modules, (str, bytes)):
        raise ConfigError(
            f"listen(modules=...) takes a list of module names, not a string: "
            f"write listen([{modules!r}])"
        )
    try:
        names = tuple(modules)
    except TypeError:
        raise ConfigError(
            f"listen(modules=...) takes a list of module names, not {type(modules).__name__}"
        ) from None
    if not names:
        raise ConfigError("listen(modules=...) needs one or more module names")
    for name in names:
        if not isinstance(name, str) or not all(p.isidentifier() for p in name.split(".")):
            raise ConfigError(f"listen(modules=...): {name!r} is not a module name")
        _check_patchable(name)
    return names


def _check_patchable(name: str) -> None:
    module = sys.modules.get(name)
    if isinstance(module, types.ModuleType):
        origin = getattr(module, "__file__", None)
        is_package = hasattr(module, "__path__")
    else:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"listen(modules=...): no module named {name!r} ({exc})") from None
        if spec is None:
            raise ConfigError(f"listen(modules=...): no module named {name!r}")
        origin = spec.origin if spec.has_location else None
        is_package = spec.submodule_search_locations is not None
    if is_package:
        return  # a regular or namespace package: its submodules with a .py file are listened
    if not origin:
        raise ConfigError(
            f"listen(modules=...): {name!r} is a built-in or frozen module with no source file"
        )
    if not str(origin).endswith(".py"):
        raise ConfigError(
            f"listen(modules=...): {name!r} has no Python source to patch (loaded from {origin})"
        )


def _sweep_stale(directory: Path, dir_fd: int) -> None:
    """Remove the sockets of this uid in ``directory`` that nobody listens on any more."""
    uid = os.getuid()
    with os.scandir(dir_fd) as entries:
        names = [
            e.name
            for _, e in zip(range(MAX_SWEEP_ENTRIES), entries, strict=False)
            if e.name.startswith(SOCKET_PREFIX) and e.name.endswith(SOCKET_SUFFIX)
        ]
    for name in names:
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except OSError:
            continue
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
            continue
        path = directory / name
        if probe(unix_address(path, dir_fd)) != "stale":
            continue
        with contextlib.suppress(FileNotFoundError):
            current = os.lstat(name, dir_fd=dir_fd)
            if (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(name, dir_fd=dir_fd)
                log.info("control.stale_socket_removed", path=str(path))


def _bind(directory: Path) -> tuple[socket.socket, Path, tuple[int, int]]:
    """A listening socket at ``directory/process-<pid>.sock`` (mode 0600), and its identity."""
    pid = os.getpid()
    path = directory / socket_name(pid)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _sweep_stale(directory, dir_fd)
        try:
            st = os.lstat(path.name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
                raise InsecurePath(
                    path,
                    "exists and is not a socket of this uid; hotpatch does not replace what it "
                    "did not make: look at it, remove it, then start again",
                )
            if probe(unix_address(path, dir_fd)) == "alive":
                raise ConfigError(f"this process already listens on {path}; close() it first")
        temporary = directory / f".{path.name}.{os.urandom(6).hex()}.tmp"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(unix_address(temporary, dir_fd))
            os.chmod(temporary.name, 0o600, dir_fd=dir_fd, follow_symlinks=True)
            sock.listen(MAX_CONNECTIONS)
            os.rename(temporary.name, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            st = os.lstat(path.name, dir_fd=dir_fd)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary.name, dir_fd=dir_fd)
            raise
        return sock, path, (st.st_dev, st.st_ino)
    finally:
        os.close(dir_fd)


def _describe_result(result: PatchResult) -> dict[str, Any]:
    return {
        "module": result.module,
        "version": result.version,
        "previous": result.previous,
        "changed": list(result.changed),
        "added": list(result.added),
        "removed": list(result.removed),
        "duration_s": round(result.duration_s, 6),
    }


def describe_version(version: Version) -> dict[str, Any]:
    """One history entry as JSON-ready data."""
    return {
        "id": version.id,
        "module": version.module,
        "sha256": version.sha256,
        "time": version.time,
        "outcome": version.outcome,
        "is_live": version.is_live,
        "stage": version.stage,
        "reason": version.reason,
    }


def _peer_gone(conn: socket.socket) -> bool:
    """Whether the client hung up (end of stream or an error) without reading anything."""
    poller = select.poll()
    hangup = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)
    poller.register(conn.fileno(), select.POLLIN | hangup)
    for _, events in poller.poll(0):
        if events & hangup:
            return True
        if events & select.POLLIN:
            try:
                return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True
    return False


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(encode_line(message), socket.MSG_NOSIGNAL)


def _read_line(
    conn: socket.socket, max_bytes: int, deadline: float, buffer: bytearray | None = None
) -> bytes | None:
    """One request line without its newline; ``None`` when the client sent nothing at all.

    ``buffer`` keeps what arrived after the line (a deploy session's next step sent early).

    Raises:
        BadRequest: longer than ``max_bytes``, cut short, or not complete before ``deadline``.
    """
    if buffer is None:
        buffer = bytearray()
    while True:
        newline = buffer.find(b"\n")
        if newline >= 0:
            if newline > max_bytes:
                break
            line = bytes(buffer[:newline])
            del buffer[: newline + 1]
            return line
        if len(buffer) > max_bytes:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BadRequest(f"no complete request line within {READ_TIMEOUT_S:g}s")
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            raise BadRequest(f"no complete request line within {READ_TIMEOUT_S:g}s") from None
        if not chunk:
            if not buffer:
                return None
            raise BadRequest("the request ended without a newline")
        buffer += chunk
    raise BadRequest(f"request longer than {max_bytes} bytes")


@dataclass(eq=False)
class Listener:
    """A process's end of the control channel; ``close()`` stops it and removes its socket.

    Attributes:
        engine: the engine requests are served with.
        modules: the module and package names given to ``listen``.
        path: the control socket.
    """

    engine: Engine
    modules: tuple[str, ...]
    path: Path
    _sock: socket.socket
    _identity: tuple[int, int]
    release: ReleaseState | None = None
    _owner_pid: int = field(default_factory=os.getpid)
    _closed: threading.Event = field(default_factory=threading.Event)
    _work: threading.Lock = field(default_factory=threading.Lock)
    _slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(MAX_CONNECTIONS)
    )
    _thread: threading.Thread | None = None

    @property
    def is_closed(self) -> bool:
        """Whether ``close()`` ran (or this is a forked child, where the listener is inert)."""
        return self._closed.is_set()

    def listened(self) -> list[str]:
        """The imported modules this listener patches (packages include their submodules)."""
        release = self.release
        return sorted(
            name
            for name, module in list(sys.modules.items())
            if isinstance(module, types.ModuleType)
            and str(getattr(module, "__file__", "") or "").endswith(".py")
            and (
                any(name == m or name.startswith(m + ".") for m in self.modules)
                or (release is not None and release.root_of(str(module.__file__)) is not None)
            )
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def _start(self) -> None:
        self._sock.settimeout(0.5)
        self._thread = threading.Thread(target=self._serve, name="hotpatch-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and remove the socket (only the process that made it removes it)."""
        if self._closed.is_set():
            return
        self._closed.set()
        _ACTIVE.discard(self)
        if os.getpid() == self._owner_pid:
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._identity:
                    os.unlink(self.path)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        log.info("control.closed", path=str(self.path))

    def _forget_in_child(self) -> None:
        """After ``fork``: the child inherited the socket but serves nothing; drop it, keep the file."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.close()

    # -- serving ---------------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._closed.is_set():
                    return
                log.warning("control.accept_failed", error=str(exc))
                self._closed.wait(0.1)
                continue
            try:
                self._dispatch(conn)
            except Exception:  # a broken connection must never stop the server
                log.exception("control.connection_failed")
                conn.close()

    def _dispatch(self, conn: socket.socket) -> None:
        if not self._slots.acquire(blocking=False):
            conn.settimeout(1.0)
            with conn, contextlib.suppress(OSError):
                _send(
                    conn,
                    error_answer(
                        os.getpid(),
                        f"busy: {MAX_CONNECTIONS} requests are open already; try again",
                        kind="busy",
                    ),
                )
            return
        try:
            threading.Thread(
                target=self._connection, args=(conn,), name="hotpatch-control-request", daemon=True
            ).start()
        except BaseException:
            self._slots.release()
            raise

    def _connection(self, conn: socket.socket) -> None:
        pid = os.getpid()
        try:
            with conn:
                answer = self._converse(conn, pid)
                conn.settimeout(SEND_TIMEOUT_S)
                if answer is not None:
                    with contextlib.suppress(OSError):
                        _send(conn, answer)
        except Exception:  # the boundary: an error is logged, the server goes on
            log.exception("control.connection_failed")
        finally:
            self._slots.release()

    def _converse(self, conn: socket.socket, pid: int) -> dict[str, Any] | None:
        peer_pid, peer_uid, _ = peer_credentials(conn)
        uid = os.getuid()
        if peer_uid not in (uid, 0):
            log.warning("control.peer_refused", peer_pid=peer_pid, peer_uid=peer_uid)
            return error_answer(
                pid,
                f"permission denied: uid {peer_uid} may not control process {pid} "
                f"(only uid {uid} and root may)",
                kind="permission",
            )
        pending = bytearray()
        try:
            line = _read_line(conn, MAX_REQUEST_BYTES, time.monotonic() + READ_TIMEOUT_S, pending)
            if line is None:
                return None  # a probe: connected and left
            request = parse_request(line)
        except BadRequest as exc:
            log.warning("control.request_refused", peer_pid=peer_pid, reason=str(exc))
            return error_answer(pid, f"bad request: {exc}", kind="bad_request")
        if request.pid != pid:
            return error_answer(
                pid, f"this is process {pid}, not {request.pid}", kind="wrong_process"
            )
        rlog = log.bind(action=request.action, peer_pid=peer_pid, peer_uid=peer_uid)
        if request.action in ("history", "status", "stats"):
            return self._answer(request)
        if request.action == "deploy" and self.release is None:
            return error_answer(
                pid,
                "this process does not take deploys (only gunicorn workers started with "
                "hotpatch's hooks do)",
                kind="request",
            )
        while not self._work.acquire(timeout=QUEUE_POLL_S):
            if self._closed.is_set():
                return error_answer(pid, "the listener was closed before the request started")
            if _peer_gone(conn):
                rlog.info("control.request_cancelled", reason="the client left while it waited")
                return None
        try:
            if _peer_gone(conn):
                rlog.info("control.request_cancelled", reason="the client left while it waited")
                return None
            try:
                conn.settimeout(SEND_TIMEOUT_S)
                _send(conn, {"v": PROTOCOL_VERSION, "event": STARTED_EVENT})
            except OSError:
                rlog.info("control.request_cancelled", reason="the client left while it waited")
                return None
            rlog.info("control.request_started")
            if request.action == "deploy":
                return self._deploy(conn, request, pending)
            return self._answer(request)
        finally:
            self._work.release()

    def _deploy(
        self, conn: socket.socket, request: Request, pending: bytearray
    ) -> dict[str, Any] | None:
        assert self.release is not None
        try:
            return run_session(
                _Connection(conn, pending),
                request,
                engine=self.engine,
                listened=self.listened,
                state=self.release,
            )
        except Exception as exc:  # the boundary: an answer, never a dead thread
            log.exception("control.request_failed", action="deploy")
            return {
                "v": PROTOCOL_VERSION,
                "pid": os.getpid(),
                "action": "deploy",
                "deploy_id": request.deploy_id,
                "outcome": "error",
                "error": "internal",
                "message": f"{type(exc).__name__}: {exc}",
            }

    def _answer(self, request: Request) -> dict[str, Any]:
        pid = os.getpid()
        base: dict[str, Any] = {"v": request.v, "pid": pid, "action": request.action}
        started = time.perf_counter()
        try:
            base.update(self._act(request))
        except PatchRejected as exc:
            base.update(outcome="refused", message=str(exc), **exc.details())
        except HotpatchError as exc:
            base.update(outcome="error", error="request", message=str(exc))
        except Exception as exc:  # the boundary: an answer, never a dead thread
            log.exception("control.request_failed", action=request.action)
            base.update(outcome="error", error="internal", message=f"{type(exc).__name__}: {exc}")
        base["duration_s"] = round(time.perf_counter() - started, 6)
        log.info(
            "control.request_handled",
            **{k: v for k, v in base.items() if k not in ("results", "modules", "v", "releases")},
        )
        return base

    def _act(self, request: Request) -> dict[str, Any]:
        if request.action in ("patch", "check"):
            dry_run = request.action == "check"
            results = self._patch_changed(dry_run=dry_run)
            outcome = "unchanged" if not results else "patchable" if dry_run else "applied"
            return {"outcome": outcome, "results": [_describe_result(r) for r in results]}
        if request.action == "stats":
            stats = self.release.hooks.stats if self.release is not None else None
            if stats is None:
                raise HotpatchError(
                    "this process records no request stats (only gunicorn workers started with "
                    "hotpatch's hooks do)"
                )
            return {"outcome": "stats", **stats(request.since or 0)}
        listened = self.listened()
        if request.action == "status":
            versions = {}
            for name in listened:
                live = next((v for v in self.engine.history(name) if v.is_live), None)
                if live is not None and live.outcome == "applied":
                    versions[name] = live.id
            described = self.release.describe() if self.release is not None else {}
            trials = [c["status"]() for c in self.engine.held_controls().values() if "status" in c]
            if trials:  # parallel runs (hotpatch.canary, shadow, experiment) in this process
                described = {**described, "trials": trials}
            return {"outcome": "status", "patched": versions, "modules": len(listened), **described}
        if request.action in ("promote", "abort"):
            assert request.module is not None  # the protocol requires it
            held = self.engine.held_controls(request.module)
            control = next((c.get(request.action) for c in held.values()), None)
            if control is None:
                raise HotpatchError(
                    f"no parallel run (canary, shadow, experiment) on {request.module!r}"
                )
            trial = control()
            return {"outcome": str(trial.get("outcome")), "trial": trial}
        if request.module is not None and request.module not in listened:
            raise HotpatchError(
                f"module {request.module!r} is not one this process listens to; "
                f"listened: {', '.join(listened) or 'none imported yet'}"
            )
        if request.action == "rollback":
            assert request.module is not None  # the protocol requires it
            version = self.engine.rollback(request.module, to=request.to)
            return {"outcome": "rolled_back", "module": version.module, "version": version.id}
        names = [request.module] if request.module else listened
        return {
            "outcome": "history",
            "modules": {
                name: [describe_version(v) for v in self.engine.history(name)] for name in names
            },
        }

    def _patch_changed(self, *, dry_run: bool) -> list[PatchResult]:
        sources: dict[str, str] = {}
        for name in self.listened():
            module = sys.modules[name]
            filename = str(module.__file__)
            try:
                text = importlib.util.decode_source(Path(filename).read_bytes())
            except (OSError, UnicodeDecodeError, SyntaxError, LookupError):
                sources[name] = ""  # the engine refuses it with the reason
                continue
            sha = text_sha256(text)
            live = next((v for v in self.engine.history(name) if v.is_live), None)
            if live is None or live.sha256 != sha:
                sources[name] = text
        if not sources:
            return []
        changes = {name: (text or None) for name, text in sources.items()}  # the engine orders
        if dry_run:  # the same guard as the patch, on the change as one (not module by module)
            results = self.engine.check_many(changes, allow_removals=False)
        else:
            results = self.engine.patch_many(changes, allow_removals=False)
        return [r for r in results if not r.is_noop]


class _Connection:
    """A deploy session's connection: answers out, steps in (``session.SessionIO``)."""

    def __init__(self, conn: socket.socket, pending: bytearray) -> None:
        self.conn = conn
        self.pending = pending

    def send(self, message: dict[str, Any]) -> None:
        self.conn.settimeout(SEND_TIMEOUT_S)
        _send(self.conn, message)

    def next_step(self, deadline: float) -> Step | str:
        try:
            line = _read_line(self.conn, MAX_REQUEST_BYTES, deadline, self.pending)
        except BadRequest as exc:
            if time.monotonic() >= deadline:
                return "no next step came before the deploy's expiry (expires_ms)"
            return f"no valid next step: {exc}"
        except OSError as exc:
            return f"the client left ({exc})"
        if line is None:
            return "the client left"
        try:
            return parse_step(line)
        except BadRequest as exc:
            return f"malformed step: {exc}"


_ACTIVE: set[Listener] = set()
_HOOKS_INSTALLED = False
_HOOKS_LOCK = threading.Lock()
_LISTEN_LOCK = threading.Lock()


def _close_all_at_exit() -> None:
    for listener in list(_ACTIVE):
        with contextlib.suppress(Exception):
            listener.close()


def _forget_all_in_child() -> None:
    for listener in list(_ACTIVE):
        listener._forget_in_child()
    _ACTIVE.clear()


def _install_process_hooks() -> None:
    global _HOOKS_INSTALLED
    with _HOOKS_LOCK:
        if _HOOKS_INSTALLED:
            return
        atexit.register(_close_all_at_exit)
        os.register_at_fork(after_in_child=_forget_all_in_child)
        _HOOKS_INSTALLED = True


def listen(modules: Iterable[str], *, engine: Engine | None = None) -> Listener:
    """Let ``hotpatch patch/rollback/history --pid`` reach this process through its socket.

    Only this process's user and root can connect (``SO_PEERCRED``). Call it once, at start-up,
    from any thread; the socket goes away at ``close()`` or at exit.

    Args:
        modules: a list of module or package names (a package covers every submodule under
            it); each must be importable, with Python source (a namespace package is fine).
        engine: the engine to patch with (default: ``hotpatch.default_engine()``).

    Returns:
        The ``Listener``; ``close()`` stops listening.

    Raises:
        ConfigError: ``modules`` is a string, empty, names no module or a module without
            source; this process already listens; or the platform has no ``SO_PEERCRED``.
        InsecurePath: the runtime directory (or a file where the socket goes) is not safe.
    """
    return _listen(_modules_argument(modules), engine=engine, release=None)


def listen_release(hooks: ReleaseHooks, *, engine: Engine | None = None) -> Listener:
    """``listen`` for a gunicorn worker: the modules whose files lie in its release's snapshot.

    Besides ``patch``/``check``/``rollback``/``history``, the listener serves ``status`` and
    ``deploy`` sessions (``hotpatch deploy --strategy in-place``; see ``session``). When the app
    already called ``listen()`` in this process, that listener is returned, now also serving the
    release's modules and deploys (one socket per process).

    Args:
        hooks: the worker's release, its health checks and how it moves to another release.
        engine: the engine to patch with (default: ``hotpatch.default_engine()``).

    Raises:
        ConfigError: this process already listens, or the platform has no ``SO_PEERCRED``.
        InsecurePath: the runtime directory (or a file where the socket goes) is not safe.
    """
    if hooks.commit_thread is not None:  # an event loop serves here: commits run on it
        use_commit_thread(hooks.commit_thread)
    with _LISTEN_LOCK:
        for listener in list(_ACTIVE):  # the app listens already: that socket takes deploys too
            if listener._owner_pid == os.getpid() and not listener.is_closed:
                if listener.release is None:
                    listener.release = ReleaseState(hooks)
                    log.info("control.release_attached", socket=str(listener.path))
                return listener
    return _listen((), engine=engine, release=ReleaseState(hooks))


def _listen(
    names: tuple[str, ...], *, engine: Engine | None, release: ReleaseState | None
) -> Listener:
    if not hasattr(socket, "SO_PEERCRED") or not hasattr(socket, "AF_UNIX"):
        raise ConfigError("listen() needs Unix sockets with SO_PEERCRED (Linux)")
    with _LISTEN_LOCK:  # two threads of one process must not both bind its name
        sock, path, identity = _bind(runtime_dir())
        listener = Listener(engine or default_engine(), names, path, sock, identity, release)
        _install_process_hooks()
        _ACTIVE.add(listener)
    tracked = listener.listened()
    try:
        # A release's files never change: their baseline is read when needed, so a release
        # listener tracks no module; track() still builds the engine's index of the loaded
        # modules, the one-time work the first patch (a worker's first deploy) would pay.
        listener.engine.track(*(tracked if release is None else ()))
        listener._start()
    except BaseException:
        listener.close()
        raise
    log.info("control.listening", modules=list(names), tracked=tracked, socket=str(path))
    return listener
