"""Patching a running process from outside: ``hotpatch patch --pid`` and ``hotpatch rollback --pid``.

A process opts in once, from its main thread at start-up::

    import hotpatch
    hotpatch.listen(["myapp"])          # modules, or packages (every submodule under them)

It then takes requests through a private directory, ``<tmp>/hotpatch-<uid>/process-<pid>``
(mode 0700: only the same user can ask): the command line writes a request file and sends the
process a signal (``SIGUSR2`` by default); a thread of the process handles the request with the
engine (guard, safe point, health, rollback) and writes the result next to it. Requests are:

- ``patch``: every listened module whose file on disk differs from the live version, as one
  change set in dependency order (all or nothing);
- ``check``: the same, through the guard only (a dry run: is the change on disk hot-patchable?);
- ``rollback``: one module to its previous version, or to a version from its history.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sys
import tempfile
import threading
import time
import types
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from hotpatch.engine import Engine, PatchResult, default_engine
from hotpatch.engine.candidate import text_sha256
from hotpatch.engine.modulemap import in_dependency_order
from hotpatch.errors import ConfigError, HotpatchError, PatchRejected

log = structlog.get_logger(__name__)

DEFAULT_SIGNAL = signal.SIGUSR2
_ACTIONS = ("patch", "check", "rollback")


def control_dir(pid: int) -> Path:
    """Where process ``pid`` takes requests when it listens."""
    return Path(tempfile.gettempdir()) / f"hotpatch-{os.getuid()}" / f"process-{pid}"


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Listener:
    """A process's end of the control channel; ``close()`` restores the signal handler."""

    engine: Engine
    modules: tuple[str, ...]
    directory: Path
    signum: int
    _previous: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def listened(self) -> list[str]:
        """The imported modules this listener patches (packages include their submodules)."""
        return sorted(
            name
            for name, module in list(sys.modules.items())
            if isinstance(module, types.ModuleType)
            and any(name == m or name.startswith(m + ".") for m in self.modules)
            and str(getattr(module, "__file__", "") or "").endswith(".py")
        )

    def handle_pending(self) -> None:
        """Handle every request waiting in the directory, oldest first."""
        with self._lock:
            requests = sorted(
                (self.directory / "requests").glob("*.json"), key=lambda p: p.stat().st_mtime_ns
            )
            for path in requests:
                request = _read_json(path) or {}
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                result = self._handle(request)
                _write_json(
                    self.directory / "results" / f"{request.get('id', path.stem)}.json", result
                )

    def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        action = request.get("action")
        base: dict[str, Any] = {"id": request.get("id"), "action": action, "pid": os.getpid()}
        started = time.perf_counter()
        try:
            if action == "patch":
                results = self._patch_changed(dry_run=False)
                base.update(outcome="applied" if results else "unchanged")
                base["results"] = [_describe(r) for r in results]
            elif action == "check":
                results = self._patch_changed(dry_run=True)
                base.update(outcome="patchable" if results else "unchanged")
                base["results"] = [_describe(r) for r in results]
            elif action == "rollback":
                version = self.engine.rollback(str(request.get("module")), to=request.get("to"))
                base.update(outcome="rolled_back", module=version.module, version=version.id)
            else:
                base.update(outcome="error", message=f"unknown action {action!r}")
        except PatchRejected as exc:
            base.update(outcome="refused", message=str(exc), **exc.details())
        except HotpatchError as exc:
            base.update(outcome="error", message=str(exc))
        base["duration_s"] = round(time.perf_counter() - started, 6)
        log.info("control.request_handled", **{k: v for k, v in base.items() if k != "results"})
        return base

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
        order = in_dependency_order(sources)
        if dry_run:
            results = [self.engine.check(name, source=sources[name] or None) for name in order]
        else:
            changes = {name: (sources[name] or None) for name in order}
            results = self.engine.patch_many(changes, allow_removals=False)
        return [r for r in results if not r.is_noop]

    def close(self) -> None:
        """Stop listening: the previous signal handler comes back, the directory goes."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._previous or signal.SIG_DFL)
        for sub in ("requests", "results"):
            for path in (self.directory / sub).glob("*"):
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                (self.directory / sub).rmdir()
        with contextlib.suppress(OSError):
            (self.directory / "process.json").unlink()
        with contextlib.suppress(OSError):
            self.directory.rmdir()


def _describe(result: PatchResult) -> dict[str, Any]:
    return {
        "module": result.module,
        "version": result.version,
        "previous": result.previous,
        "changed": list(result.changed),
        "added": list(result.added),
        "removed": list(result.removed),
        "duration_s": round(result.duration_s, 6),
    }


def listen(
    modules: Iterable[str],
    *,
    engine: Engine | None = None,
    signum: int = DEFAULT_SIGNAL,
) -> Listener:
    """Let ``hotpatch patch --pid`` and ``hotpatch rollback --pid`` change this process.

    Args:
        modules: module or package names; a package covers every submodule under it.
        engine: the engine to patch with (default: ``hotpatch.default_engine()``).
        signum: the signal that announces a request (default ``SIGUSR2``).

    Returns:
        The ``Listener``; ``close()`` stops listening.

    Raises:
        ConfigError: not called from the main thread (Python installs signal handlers only
            there), or no module given.
    """
    names = tuple(modules)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError("listen() needs one or more module names")
    if threading.current_thread() is not threading.main_thread():
        raise ConfigError("listen() must be called from the main thread (signal handlers)")
    directory = control_dir(os.getpid())
    (directory / "requests").mkdir(parents=True, exist_ok=True, mode=0o700)
    (directory / "results").mkdir(exist_ok=True, mode=0o700)
    directory.parent.chmod(0o700)
    directory.chmod(0o700)
    listener = Listener(engine or default_engine(), names, directory, signum)
    tracked = listener.listened()
    listener.engine.track(*tracked)

    def on_signal(received: int, frame: types.FrameType | None) -> None:
        # Not in the handler: it interrupts whatever the main thread runs, maybe the old code.
        threading.Thread(
            target=listener.handle_pending, name="hotpatch-control", daemon=True
        ).start()

    listener._previous = signal.signal(signum, on_signal)
    _write_json(
        directory / "process.json",
        {"pid": os.getpid(), "modules": list(names), "signal": int(signum), "python": sys.version},
    )
    log.info(
        "control.listening",
        modules=list(names),
        tracked=tracked,
        directory=str(directory),
        signal=signal.Signals(signum).name,
    )
    return listener


def send_request(
    pid: int,
    action: str,
    *,
    module: str | None = None,
    to: str | None = None,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Ask process ``pid`` (which called ``listen``) to act; returns its result.

    Raises:
        HotpatchError: the process does not listen, is gone, or did not answer in time.
    """
    if action not in _ACTIONS:
        raise ConfigError(f"unknown action {action!r}; expected one of {', '.join(_ACTIONS)}")
    directory = control_dir(pid)
    process = _read_json(directory / "process.json")
    if process is None:
        raise HotpatchError(
            f"process {pid} does not listen for hotpatch requests (no {directory / 'process.json'});"
            " call hotpatch.listen([...]) in it at start-up"
        )
    request_id = uuid.uuid4().hex
    _write_json(
        directory / "requests" / f"{request_id}.json",
        {"id": request_id, "action": action, "module": module, "to": to},
    )
    try:
        os.kill(pid, int(process.get("signal", DEFAULT_SIGNAL)))
    except ProcessLookupError:
        raise HotpatchError(f"process {pid} is gone") from None
    result_path = directory / "results" / f"{request_id}.json"
    deadline = time.monotonic() + timeout_s
    while True:
        result = _read_json(result_path)
        if result is not None:
            with contextlib.suppress(OSError):
                result_path.unlink()
            return result
        if time.monotonic() > deadline:
            raise HotpatchError(f"process {pid} did not answer within {timeout_s:g}s")
        time.sleep(0.01)
