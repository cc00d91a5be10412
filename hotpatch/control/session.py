"""One process's part of an in-place deploy: prepare, commit, health, then confirm or roll back.

The idea is a two-phase commit across the workers of a server, with the coordinator outside
(``hotpatch deploy``): nothing goes live anywhere until every worker has accepted the new code,
and a worker that committed goes back to the exact previous version when any other worker fails.
The problem is that each worker is its own process with its own live modules: the coordinator can
only ask, and it may die, hang or send garbage between two phases. A worker must therefore never
be left holding something half-done: a prepared change nobody will commit, or a committed change
nobody confirmed.

The mechanism: a ``deploy`` request opens a session on one connection (``protocol``). Phase 1
reads, for every listened module, the file at the same place in the new release's snapshot
(``release_dir``: a sibling of the release this process was started from, owned by this uid,
never through a link), and runs the engine's full guard on each changed one (``Engine.check``:
load, compile, execute apart from the live module, compatibility, verifiers; nothing live
changes). The bytes read are held for the session: phase 2 (``commit``) gives exactly those bytes
to ``Engine.patch_many``, which guards them again and commits them at a safe point (all modules
or none), then moves ``sys.path`` to the new release (``ReleaseHooks.switched``), so a module
first imported later comes from the new release too. Phase 3 (``health``) runs the process's
health checks (``ReleaseHooks.health``; the engine's own ran inside the commit). ``confirm``
keeps the new version; ``rollback``, the client hanging up, a malformed step or no step within
``expires_ms`` restores each committed module to the exact version it had (``Engine.rollback``
to the recorded previous version, the same code objects) and ``sys.path`` with it. Before the
commit, the same events discard what was prepared.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import stat
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hotpatch._log import get_logger
from hotpatch.control.protocol import PROTOCOL_VERSION, Request, Step
from hotpatch.engine import Engine
from hotpatch.engine.candidate import text_sha256
from hotpatch.errors import HotpatchError, PatchRejected

log = get_logger(__name__)

MAX_MODULES = 5_000
"""A session refuses a process with more listened modules than this (a runaway import)."""


@dataclass(frozen=True)
class ReleaseHooks:
    """What the host (the gunicorn worker) lends a deploy session.

    Attributes:
        release: the release this process was started from.
        release_dir: its snapshot directory (its files are what the listened modules came from).
        health: the process's health checks; returns ``None`` when healthy, else the reason.
        switched: called with ``(release, release_dir)`` after a commit (the new release) and
            after a rollback (the previous one): moves ``sys.path`` and the host's records.
        refuse_in_place: when set, phase 1 refuses every deploy with this reason (a host that
            cannot take an in-place commit).
        stats: the process's request counts for the ``stats`` request, given the last request
            number the client saw (``hotpatch.gunicorn._metrics.Recorder.snapshot``), if any.
        commit_thread: the event loop this process serves on, as ``(thread ident,
            loop.call_soon_threadsafe)`` or ``None`` while it does not run: every commit and
            rollback of this process then runs on it (``hotpatch.engine.safepoint``).
        lifelong: the frames suspended for the life of the process, as ``(module, qualname,
            file, line)`` (an ASGI app's lifespan): phase 1 refuses a change to their code, which
            no safe point would ever let in.
    """

    release: str
    release_dir: str
    health: Callable[[], str | None]
    switched: Callable[[str, str], None]
    refuse_in_place: str | None = None
    stats: Callable[[int], dict[str, Any]] | None = None
    commit_thread: (
        Callable[[], tuple[int, Callable[[Callable[[], None]], object]] | None] | None
    ) = None
    lifelong: Callable[[], list[tuple[str, str, str, int]]] | None = None


@dataclass
class ReleaseState:
    """The release a process runs now, the directories its modules came from, its deploys."""

    hooks: ReleaseHooks
    release: str = ""
    release_dir: str = ""
    roots: list[str] = field(default_factory=list)
    current: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.release = self.release or self.hooks.release
        self.release_dir = self.release_dir or self.hooks.release_dir
        self.roots = self.roots or [self.hooks.release_dir]

    def root_of(self, filename: str) -> str | None:
        """The release directory ``filename`` lies in, if any."""
        for root in self.roots:
            if filename.startswith(root.rstrip("/") + "/"):
                return root
        return None

    def describe(self) -> dict[str, Any]:
        """For ``status`` answers."""
        with self.lock:
            return {
                "release": self.release,
                "release_dir": self.release_dir,
                "deploy": dict(self.current) if self.current else None,
                "last_deploy": dict(self.last) if self.last else None,
            }


class SessionIO(Protocol):
    """The connection, as a session uses it."""

    def send(self, message: dict[str, Any]) -> None:
        """Send one answer line (raises ``OSError`` when the client is gone)."""

    def next_step(self, deadline: float) -> Step | str:
        """The next step, or why there is none (client gone, malformed, too late)."""


class _Refused(Exception):
    """Phase 1 refuses; the message is the reason (naming file and stage)."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


def run_session(
    io: SessionIO,
    request: Request,
    *,
    engine: Engine,
    listened: Callable[[], list[str]],
    state: ReleaseState,
) -> dict[str, Any] | None:
    """Serve one ``deploy`` session; returns the last answer (``None``: the client is gone)."""
    assert request.deploy_id is not None and request.release is not None
    assert request.release_dir is not None and request.expires_ms is not None
    pid = os.getpid()
    deploy_id = request.deploy_id
    expires_s = request.expires_ms / 1000
    dlog = log.bind(deploy_id=deploy_id, release=request.release, worker_pid=pid)
    base = {"v": PROTOCOL_VERSION, "pid": pid, "action": "deploy", "deploy_id": deploy_id}
    previous = (state.release, state.release_dir)
    with state.lock:
        state.current = {"id": deploy_id, "release": request.release, "phase": "prepare"}
    try:
        started = time.perf_counter()
        try:
            changes, modules = _prepare(engine, listened(), state, request)
        except _Refused as exc:
            dlog.warning("deploy.refused", phase="prepare", reason=str(exc))
            return {
                **base,
                "phase": "prepare",
                "outcome": "refused",
                "message": str(exc),
                **exc.details,
                "duration_s": _since(started),
            }
        outcome = "accepted" if changes else "unchanged"
        try:
            io.send(
                {
                    **base,
                    "phase": "prepare",
                    "outcome": outcome,
                    "modules": modules,
                    "duration_s": _since(started),
                }
            )
        except OSError:
            dlog.info("deploy.discarded", reason="the client left")
            return None
        dlog.info("deploy.prepared", modules=modules)
        step = io.next_step(time.monotonic() + expires_s)
        if not isinstance(step, Step) or step.step != "commit" or step.deploy_id != deploy_id:
            reason = _why(step, deploy_id, "commit")
            dlog.info("deploy.discarded", reason=reason)
            return {**base, "phase": "abort", "outcome": "discarded", "message": reason}
        _set_phase(state, "commit")
        started = time.perf_counter()
        applied: list[tuple[str, str]] = []
        try:
            if changes:
                results = engine.patch_many(changes, allow_removals=False)
                applied = [(r.module, r.previous) for r in results if not r.is_noop]
        except PatchRejected as exc:  # the engine left every module as it was
            dlog.warning("deploy.refused", phase="commit", reason=str(exc))
            return {
                **base,
                "phase": "commit",
                "outcome": "refused",
                "message": str(exc),
                **exc.details(),
                "duration_s": _since(started),
            }
        _switch(state, request.release, request.release_dir)
        commit_s = _since(started)
        dlog.info("deploy.committed", modules=[m for m, _ in applied], commit_s=commit_s)
        answer = {
            **base,
            "phase": "commit",
            "outcome": "committed",
            "duration_s": commit_s,
            "modules": [m for m, _ in applied],
        }
        step = _send_then_step(io, answer, expires_s)
        if isinstance(step, Step) and step.step == "health" and step.deploy_id == deploy_id:
            _set_phase(state, "health")
            started = time.perf_counter()
            problem = _health(state)
            health = {
                **base,
                "phase": "health",
                "duration_s": _since(started),
                "outcome": "healthy" if problem is None else "unhealthy",
            }
            if problem is not None:
                health["message"] = problem
                dlog.warning("deploy.health_failed", reason=problem)
            step = _send_then_step(io, health, expires_s)
        if isinstance(step, Step) and step.step == "confirm" and step.deploy_id == deploy_id:
            with state.lock:
                state.last = {
                    "id": deploy_id,
                    "release": request.release,
                    "outcome": "deployed",
                    "modules": [m for m, _ in applied],
                    "time": time.time(),
                }
            dlog.info("deploy.confirmed")
            return {**base, "phase": "confirm", "outcome": "deployed"}
        reason = _why(step, deploy_id, "confirm")
        errors = _roll_back(engine, applied, dlog, reason=reason)
        _switch(state, *previous)
        with state.lock:
            state.last = {
                "id": deploy_id,
                "release": request.release,
                "time": time.time(),
                "outcome": "rollback_failed" if errors else "rolled_back",
                "reason": reason,
            }
        if errors:
            return {
                **base,
                "phase": "rollback",
                "outcome": "rollback_failed",
                "message": "; ".join(errors),
            }
        return {**base, "phase": "rollback", "outcome": "rolled_back", "message": reason}
    finally:
        with state.lock:
            state.current = None


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 6)


def _set_phase(state: ReleaseState, phase: str) -> None:
    with state.lock:
        if state.current is not None:
            state.current["phase"] = phase


def _send_then_step(io: SessionIO, answer: dict[str, Any], expires_s: float) -> Step | str:
    try:
        io.send(answer)
    except OSError:
        return "the client left"
    return io.next_step(time.monotonic() + expires_s)


def _why(step: Step | str, deploy_id: str, expected: str) -> str:
    if isinstance(step, str):
        return step
    if step.deploy_id != deploy_id:
        return f"a step for deploy {step.deploy_id!r:.80} came in deploy {deploy_id!r}"
    if step.step in ("abort", "rollback"):
        return f"the coordinator asked to {step.step}"
    return f"step {step.step!r} came where {expected!r} was expected"


def _health(state: ReleaseState) -> str | None:
    try:
        return state.hooks.health()
    except Exception as exc:  # a health check that raises is a failed health check
        return f"the health check raised {type(exc).__name__}: {exc}"


def _switch(state: ReleaseState, release: str, release_dir: str) -> None:
    with state.lock:
        state.release, state.release_dir = release, release_dir
        if release_dir not in state.roots:
            state.roots.append(release_dir)
    state.hooks.switched(release, release_dir)


def _roll_back(
    engine: Engine, applied: list[tuple[str, str]], dlog: Any, *, reason: str
) -> list[str]:
    """Restore each committed module to its previous version, the last committed first."""
    errors: list[str] = []
    for module, version in reversed(applied):
        try:
            engine.rollback(module, to=version)
        except HotpatchError as exc:
            errors.append(f"{module}: {exc}")
    if errors:
        dlog.error("deploy.rollback_failed", reason=reason, errors=errors)
    else:
        dlog.warning("deploy.rolled_back", reason=reason, modules=[m for m, _ in applied])
    return errors


def _check_release_dir(request: Request, state: ReleaseState) -> str:
    """The new release's directory, after checking it is a sibling of ours, ours, not a link."""
    assert request.release_dir is not None and request.release is not None
    boot = state.hooks.release_dir
    if boot.startswith("/proc/self/fd/"):
        raise _Refused(
            "this worker reaches its release through a descriptor (gunicorn --user): it cannot "
            "read a new release, so in-place deploys are not available; use --strategy rolling "
            "(stage: release)"
        )
    new = request.release_dir
    if (
        not os.path.isabs(new)
        or os.path.normpath(new) != new
        or os.path.basename(new) != request.release
        or os.path.dirname(new) != os.path.dirname(boot.rstrip("/"))
    ):
        raise _Refused(
            f"release directory {new!r:.300} is not a release of this server's master "
            "(stage: release)"
        )
    try:
        st = os.lstat(new)
    except OSError as exc:
        raise _Refused(f"{new}: cannot read the release: {exc.strerror} (stage: release)") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise _Refused(f"{new}: not a directory of uid {os.getuid()} (stage: release)")
    return new


def _read_file(path: str, max_bytes: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(f"{path}: not a regular file (stage: load)")
        if st.st_size > max_bytes:
            raise _Refused(f"{path}: larger than {max_bytes} bytes (stage: load)")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(max_bytes + 1)
    finally:
        os.close(fd)


def _prepare(
    engine: Engine, names: list[str], state: ReleaseState, request: Request
) -> tuple[dict[str, bytes], list[str]]:
    """Phase 1: the changed modules' new bytes, guarded; raises ``_Refused`` with the reason."""
    if state.hooks.refuse_in_place is not None:
        raise _Refused(state.hooks.refuse_in_place, {"stage": "load"})
    new_dir = _check_release_dir(request, state)
    if len(names) > MAX_MODULES:
        raise _Refused(f"more than {MAX_MODULES} modules to check (stage: load)")
    raw: dict[str, bytes] = {}
    where: dict[str, tuple[str, str]] = {}
    for name in names:
        module = sys.modules.get(name)
        filename = str(getattr(module, "__file__", "") or "")
        root = state.root_of(filename) if isinstance(module, types.ModuleType) else None
        if root is None:
            continue
        relative = filename[len(root.rstrip("/")) + 1 :]
        path = os.path.join(new_dir, relative)
        try:
            data = _read_file(path, engine.max_source_bytes)
        except FileNotFoundError:
            raise _Refused(
                f"{relative}: module {name} is imported here but not in release {request.release}"
                " (a removed module needs a rolling reload) (stage: load)",
                {"module": name, "stage": "load", "file": relative},
            ) from None
        except OSError as exc:
            raise _Refused(f"{path}: cannot read: {exc.strerror} (stage: load)") from None
        try:
            text = importlib.util.decode_source(data)
        except (UnicodeDecodeError, SyntaxError, LookupError):
            text = ""  # changed for sure; the engine's check names the problem
        live = next((v for v in _history(engine, name) if v.is_live), None)
        if live is not None and text and live.sha256 == text_sha256(text):
            continue
        if live is None and _same_bytes(filename, data, engine.max_source_bytes):
            continue  # never patched, and its release file (a snapshot: immutable) is the same
        raw[name] = data
        where[name] = (filename, path)
    if not raw:
        return {}, []
    try:  # one change: a module may import a name another one adds (as patch_many commits it)
        results = engine.check_many(raw)  # the engine orders them
    except PatchRejected as exc:  # named by the file that holds the new code
        live_file, new_file = where.get(exc.module, ("", ""))
        if not live_file:
            raise _Refused(str(exc), exc.details()) from None
        details = {k: (new_file if v == live_file else v) for k, v in exc.details().items()}
        raise _Refused(str(exc).replace(live_file, new_file), details) from None
    if state.hooks.lifelong is not None:
        _refuse_lifelong(state.hooks.lifelong(), results)
    ordered = {r.module: raw[r.module] for r in results if not r.is_noop}
    return ordered, list(ordered)


def _refuse_lifelong(frames: list[tuple[str, str, str, int]], results: list[Any]) -> None:
    """Refuse a change to the code of a frame that stays suspended for the process's life."""
    changed = {r.module: r.changed for r in results if not r.is_noop}
    for module, qualname, filename, lineno in frames:
        for name in changed.get(module, ()):
            if qualname == name or qualname.startswith(name + "."):
                raise _Refused(
                    f"{filename}:{lineno}: {qualname}() is suspended for the life of this worker "
                    "(the app's lifespan, or a task its startup began) and this change replaces "
                    "its code, which no safe point lets in while it runs; a rolling deploy "
                    "carries it (stage: safepoint)",
                    {
                        "module": module,
                        "stage": "safepoint",
                        "filename": filename,
                        "lineno": lineno,
                    },
                )


def _same_bytes(filename: str, data: bytes, max_bytes: int) -> bool:
    try:
        return _read_file(filename, max_bytes) == data
    except (OSError, _Refused):
        return False


def _history(engine: Engine, name: str) -> list[Any]:
    with contextlib.suppress(HotpatchError):
        return list(engine.history(name))
    return []
