"""Watch mode: save a file, and the running program has the new code in milliseconds.

``watch(paths)`` starts a watchdog ``Observer`` on directories, recursively. Each event on a Python
source goes into a ``Debouncer``; once the burst is over (a short quiet period, with a ceiling),
a worker thread reads every changed file once, drops those whose content hash is the one it last
saw (a touch, or a save of identical text), maps the rest to imported modules and hands them to
the engine as one change set, in dependency order: all of them go live, or none does. Every
editor's way of saving looks the same from there: an in-place write (modified, closed), a write to
a temporary file renamed over the original (only a moved event, whose destination counts), and
delete-then-recreate (vim) all end with the new content on disk when the batch is read.

Threads: the observer's threads only filter paths and add them to the debouncer; the worker does
all reading and patching, so a slow patch never blocks event delivery.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import EventEmitter, ObservedWatch

from hotpatch._log import get_logger
from hotpatch.engine import Engine, PatchResult, default_engine
from hotpatch.engine.arguments import check_count, check_optional_seconds, check_seconds
from hotpatch.engine.modulemap import (
    ModuleIndex,
    is_under,
    normalize,
)
from hotpatch.errors import ConfigError, HotpatchError, PatchRejected
from hotpatch.watch.debounce import Batch, Debouncer
from hotpatch.watch.pathfilter import is_ignored

log = get_logger(__name__)

EventKind = Literal["applied", "refused", "deleted", "ignored"]

# How often an idle watcher looks for newly imported modules, to record their baseline before
# they are edited (a module first seen in a batch is patched without one: see Engine.track).
_REFRESH_INTERVAL_S = 0.5


# A recursive watch costs one inotify watch (and about 1 KB of kernel memory) per directory, out of
# a per-user budget shared by every process of the user (fs.inotify.max_user_watches, 8,192 on
# older kernels). watch("/") took 23,541 watches and 247 MB, and still missed a save; a tree over
# these bounds is refused with a clear error before any watch is added.
DEFAULT_MAX_DIRECTORIES = 5_000
MAX_DEPTH = 256

_CHANGE_EVENTS = frozenset({EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED, EVENT_TYPE_CLOSED})
_WRITE_EVENTS = frozenset({EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED})  # a close should follow


@dataclass(frozen=True)
class WatchEvent:
    """What watch mode did about a batch of saved files; passed to ``on_event``.

    Attributes:
        kind: ``applied`` (the new code is live), ``refused`` (nothing changed: the program runs
            the previous version), ``deleted`` (a module's file is gone; the module is left as
            it is), or ``ignored`` (a source of no imported module; only with
            ``report_unimported``).
        files: the files concerned.
        modules: the modules concerned.
        results: for ``applied``, what the engine did to each module.
        error: for ``refused``, the engine's ``PatchRejected`` (``.stage``, ``.reason``,
            ``.filename``, ``.lineno``).
        latency_s: from the first file event of the batch to this outcome.
    """

    kind: EventKind
    files: tuple[str, ...]
    modules: tuple[str, ...]
    results: tuple[PatchResult, ...] = ()
    error: PatchRejected | None = None
    latency_s: float = 0.0

    def describe(self) -> str:
        """A plain, human-readable account, as ``hotpatch run`` prints it."""
        files = ", ".join(_short(f) for f in self.files)
        if self.kind == "applied":
            parts = []
            for r in self.results:
                what = [
                    f"{label} {', '.join(names)}"
                    for label, names in (
                        ("changed", r.changed),
                        ("added", r.added),
                        ("removed", r.removed),
                    )
                    if names
                ]
                parts.append(f"{r.module}: {'; '.join(what) or 'no change'}")
            return f"applied {files} in {self.latency_s * 1000:.0f} ms ({' | '.join(parts)})"
        if self.kind == "refused" and self.error is not None:
            err = self.error
            where = _short(err.filename or files)
            if err.lineno:
                where += f":{err.lineno}"
            return (
                f"{where}: change refused at {err.stage}: {err.reason}\n"
                f"  the program is still running the previous version of "
                f"{', '.join(self.modules)}; fix the file and save again"
            )
        if self.kind == "deleted":
            return f"{files} was deleted; {', '.join(self.modules)} keeps running the code it has"
        return f"{files} belongs to no imported module: ignored"


class Watcher:
    """A running watch: stop it with ``stop()``, or use it as a context manager.

    Made by ``watch()``; not meant to be built directly.

    Attributes:
        roots: the watched directories and files, normalized.
        engine: the engine that applies the changes (its ``history`` shows each outcome).
    """

    def __init__(
        self,
        roots: tuple[str, ...],
        *,
        engine: Engine,
        quiet_period_s: float,
        max_delay_s: float,
        on_event: Callable[[WatchEvent], object] | None,
        allow_removals: bool,
        safepoint_timeout_s: float | None,
        report_unimported: bool,
    ) -> None:
        self.roots = roots
        self.engine = engine
        self._on_event = on_event
        self._allow_removals = allow_removals
        self._safepoint_timeout_s = safepoint_timeout_s
        self._report_unimported = report_unimported
        self._cond = threading.Condition()
        self._debouncer: Debouncer[str] = Debouncer(
            quiet_period_s=quiet_period_s, max_delay_s=max_delay_s
        )
        self._is_stopping = False
        self._is_stopped = False
        self._venv_dirs: dict[str, bool] = {}
        # inotify reports closes; other observers never do, so writes count as settled there.
        self._closes_reported = _observer_reports_closes()
        # Worker-thread state.
        self._index = ModuleIndex(roots)
        self._seen: dict[str, str] = {}  # path -> sha256 of the content last read
        self._refused: set[str] = set()  # paths whose content on disk was refused: not live
        self._observer = Observer()
        self._watches: list[ObservedWatch] = []
        self._observer.name = "hotpatch-watch-observer"
        self._worker = threading.Thread(target=self._run, name="hotpatch-watch", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Record every watched module's baseline, then start the observer and the worker."""
        self._refresh_index(changing=frozenset())
        handler = _EventHandler(self._notice)
        for root in self.roots:
            directory = root if os.path.isdir(root) else os.path.dirname(root)
            self._watches.append(self._observer.schedule(handler, directory, recursive=True))
        self._observer.daemon = True
        try:
            self._observer.start()
        except OSError as exc:  # inotify watch or instance limit (ENOSPC, EMFILE), vanished root
            self._is_stopping = self._is_stopped = True
            with contextlib.suppress(Exception):
                self._observer.stop()
            raise ConfigError(
                f"cannot watch {', '.join(self.roots)}: {exc.strerror or exc} "
                "(watch fewer directories, or raise fs.inotify.max_user_watches)"
            ) from None
        self._worker.start()
        log.info(
            "watch.started",
            roots=list(self.roots),
            modules=self._index.names(),
            quiet_period_s=self._debouncer.quiet_period_s,
            max_delay_s=self._debouncer.max_delay_s,
        )

    @property
    def is_running(self) -> bool:
        return self._worker.is_alive() and not self._is_stopping

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop watching; changes still being debounced are dropped.

        Args:
            timeout_s: how long to wait for the observer and worker threads to end (a patch in
                progress finishes first); a thread still alive then is logged and left behind
                (it is a daemon thread).
        """
        with self._cond:
            if self._is_stopped:
                return
            self._is_stopping = self._is_stopped = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout_s
        with _StopRaceFilter(self._watches):
            self._observer.stop()
            if (
                self._observer.ident is not None
                and self._observer is not threading.current_thread()
            ):
                # The emitters are joined in the observer's own stop(); joining the observer
                # inside the filter's lifetime covers a stop that a slow emitter prolongs.
                self._observer.join(max(0.0, deadline - time.monotonic()))
        for thread in (self._observer, self._worker):
            if thread is threading.current_thread() or thread.ident is None:
                continue  # stop() called from on_event, or the thread never started
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [
            t.name
            for t in (self._observer, self._worker)
            if t.is_alive() and t is not threading.current_thread()
        ]
        if alive:
            log.warning("watch.stop_timed_out", threads=alive, timeout_s=timeout_s)
        log.info("watch.stopped", roots=list(self.roots))

    def __enter__(self) -> Watcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- observer threads ------------------------------------------------------------------------
    def _notice(self, path: str, event_type: str) -> None:
        """A file event: keep it if it may concern a module, and restart the quiet period.

        Where the observer reports closes (inotify), a file written to and not closed yet is
        still being written: it holds the batch back until its close event (or the ceiling).
        Elsewhere every event counts as settled, and the quiet period alone decides.
        """
        if event_type == EVENT_TYPE_CLOSED:
            self._closes_reported = True
        path = os.path.abspath(path)
        if not any(self._may_trigger(path, root) for root in self.roots):
            return
        is_settled = event_type not in _WRITE_EVENTS or not self._closes_reported
        with self._cond:
            self._debouncer.add(path, now=time.monotonic(), is_settled=is_settled)
            self._cond.notify()

    def _may_trigger(self, path: str, root: str) -> bool:
        if os.path.isdir(root):
            return is_under(path, (root,)) and not is_ignored(path, root, is_venv=self._is_venv)
        return path == root  # a single watched file

    def _is_venv(self, directory: str) -> bool:
        known = self._venv_dirs.get(directory)
        if known is None:
            known = os.path.isfile(os.path.join(directory, "pyvenv.cfg"))
            self._venv_dirs[directory] = known
        return known

    # -- worker thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        next_refresh = time.monotonic() + _REFRESH_INTERVAL_S
        while True:
            with self._cond:
                if self._is_stopping:
                    return
                now = time.monotonic()
                batch = self._debouncer.take_due(now=now)
                if batch is None:
                    wait = self._debouncer.time_until_due(now=now)
                    if wait is not None or now < next_refresh:
                        self._cond.wait(wait if wait is not None else next_refresh - now)
                        continue
            try:
                if batch is None:
                    self._refresh_index(changing=frozenset())
                    next_refresh = time.monotonic() + _REFRESH_INTERVAL_S
                else:
                    self._process(batch)
            except Exception:  # a bug must not end watch mode
                log.exception("watch.change_failed")

    def _refresh_index(self, *, changing: frozenset[str]) -> None:
        """Index newly imported modules; record the baseline of those not being changed now."""
        for name in self._index.refresh(sys.modules.copy()):
            path = self._index.path_of(name)
            if path is None or path in changing:
                continue  # its file already holds the edit: the engine patches it without baseline
            digest = _hash_file(path)
            if digest is not None:
                self._seen[path] = digest
            try:
                self.engine.track(name)
            except HotpatchError as exc:
                log.debug("watch.track_failed", module=name, reason=str(exc))

    def _process(self, batch: Batch[str]) -> None:
        paths = frozenset(normalize(p) for p in batch.items)
        self._refresh_index(changing=paths)
        log.debug("watch.change_detected", files=sorted(paths))
        changed: dict[str, bytes] = {}
        for path in sorted(paths):
            modules = self._index.modules_for(path)
            try:
                data = Path(path).read_bytes()
            except FileNotFoundError:
                if modules:
                    self._refused.discard(path)
                    log.warning("watch.file_deleted", file=path, modules=list(modules))
                    self._emit(WatchEvent("deleted", (path,), modules, latency_s=_since(batch)))
                continue
            except OSError as exc:
                log.warning("watch.file_unreadable", file=path, reason=str(exc))
                continue
            if not modules:
                if self._report_unimported:
                    log.info("watch.file_ignored", file=path, reason="not imported")
                    self._emit(WatchEvent("ignored", (path,), (), latency_s=_since(batch)))
                else:
                    log.debug("watch.file_ignored", file=path, reason="not imported")
                continue
            digest = hashlib.sha256(data).hexdigest()
            if self._seen.get(path) == digest:
                log.debug("watch.change_skipped", file=path, reason="content unchanged")
                continue
            self._seen[path] = digest
            changed[path] = data
        if changed:
            log.info("watch.change_detected", files=sorted(changed))
            self._apply(changed, batch)

    def _apply(self, changed: dict[str, bytes], batch: Batch[str]) -> None:
        """Patch ``changed`` plus earlier refused files as one change set (see ``_attempt``)."""
        retry: dict[str, bytes] = {}
        for path in sorted(self._refused - changed.keys()):
            try:
                retry[path] = Path(path).read_bytes()
            except OSError:
                self._refused.discard(path)
        attempt = {**retry, **changed}
        while True:
            try:
                results = self._attempt(attempt)
            except PatchRejected as exc:
                blamed = self._index.path_of(exc.module)
                if blamed in retry and blamed in attempt and len(attempt) > 1:
                    # An earlier refused file still fails: leave it out, try the new saves alone.
                    log.debug("watch.retry_dropped", file=blamed, reason=exc.reason)
                    del attempt[blamed]
                    continue
                self._refused.update(attempt)
                self._report_refused(exc, attempt, batch)
                return
            self._refused.difference_update(attempt)
            self._report_applied(results, attempt, batch)
            return

    def _attempt(self, files: dict[str, bytes]) -> list[PatchResult]:
        sources: dict[str, bytes] = {}
        for path, data in files.items():
            for name in self._index.modules_for(path):
                sources[name] = data
        return self.engine.patch_many(  # it orders them: each after the ones it imports
            sources,
            allow_removals=self._allow_removals,
            safepoint_timeout_s=self._safepoint_timeout_s,
        )

    # -- reporting -------------------------------------------------------------------------------
    def _report_applied(
        self, results: list[PatchResult], files: dict[str, bytes], batch: Batch[str]
    ) -> None:
        latency = _since(batch)
        log.info(
            "watch.change_applied",
            files=sorted(files),
            modules=[r.module for r in results],
            changed={r.module: list(r.changed) for r in results if r.changed},
            added={r.module: list(r.added) for r in results if r.added},
            duration_s=round(max((r.duration_s for r in results), default=0.0), 6),
            latency_s=round(latency, 6),
        )
        for result in results:
            if result.removed:
                log.warning(
                    "watch.names_removed", module=result.module, removed=list(result.removed)
                )
        self._emit(
            WatchEvent(
                "applied",
                tuple(sorted(files)),
                tuple(r.module for r in results),
                results=tuple(results),
                latency_s=latency,
            )
        )

    def _report_refused(
        self, exc: PatchRejected, files: dict[str, bytes], batch: Batch[str]
    ) -> None:
        modules = tuple(sorted({n for p in files for n in self._index.modules_for(p)}))
        log.warning(
            "watch.change_refused",
            **exc.details(),
            files=sorted(files),
            modules=list(modules),
            running="previous version",
        )
        self._emit(
            WatchEvent("refused", tuple(sorted(files)), modules, error=exc, latency_s=_since(batch))
        )

    def _emit(self, event: WatchEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:  # the callback is the user's: its failure must not end watch mode
            log.exception("watch.callback_failed", kind=event.kind)


class _EventHandler(FileSystemEventHandler):
    """Passes the paths of file events that may change a source to ``notice``.

    Paths are matched by the watcher itself on the file name, not with watchdog patterns, whose
    meaning changed in watchdog 7 (``"*.py"`` matches the full path there and so nothing).
    """

    def __init__(self, notice: Callable[[str, str], None]) -> None:
        super().__init__()
        self._notice = notice

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if event.event_type == EVENT_TYPE_MOVED:
            # An atomic save is only this event; its destination holds the new content. The
            # source may have been a module's file (renamed away: reported as deleted).
            self._notice(os.fsdecode(event.dest_path), event.event_type)
            self._notice(os.fsdecode(event.src_path), event.event_type)
        elif event.event_type in _CHANGE_EVENTS or event.event_type == EVENT_TYPE_DELETED:
            self._notice(os.fsdecode(event.src_path), event.event_type)


def watch(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    engine: Engine | None = None,
    quiet_period_s: float = 0.02,
    max_delay_s: float = 0.5,
    on_event: Callable[[WatchEvent], object] | None = None,
    allow_removals: bool = True,
    safepoint_timeout_s: float | None = None,
    report_unimported: bool = False,
    max_directories: int = DEFAULT_MAX_DIRECTORIES,
) -> Watcher:
    """Watch ``paths`` and patch each saved module into the running program.

    Every imported module whose file is under ``paths`` gets its baseline recorded now
    (``Engine.track``). From then on, each save goes through the engine (candidate, guard, safe
    point, health check, rollback) as one change set per burst of saves; a refused change leaves
    the program running the previous version and is logged as ``watch.change_refused``.

    Args:
        paths: directories (watched recursively) or single files.
        engine: the engine to patch with; ``hotpatch.default_engine()`` by default.
        quiet_period_s: how long after the last file event a burst counts as over.
        max_delay_s: the longest a change waits while events keep coming.
        on_event: called with a ``WatchEvent`` after each outcome, in the watcher's thread.
        allow_removals: apply changes the compatibility policy would refuse: public names
            that disappear, signatures that callers may not fit (development policy: on, with a
            ``watch.names_removed`` warning for removed names).
        safepoint_timeout_s: how long to wait for threads to leave replaced code (engine
            default when ``None``).
        report_unimported: log ``watch.file_ignored`` at info level (and call ``on_event``) for
            saved sources that belong to no imported module, instead of at debug level.
        max_directories: the most directories the roots may hold together (each costs an
            inotify watch); a larger tree is refused.

    Returns:
        The running ``Watcher``; call ``.stop()`` or use it in a ``with`` block.

    Raises:
        ConfigError: a path does not exist; the tree under the paths has more than
            ``max_directories`` directories or is more than ``MAX_DEPTH`` levels deep; the
            system's inotify limits are reached; a timing option is negative or not finite.
        TypeError: an argument has the wrong type.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    elif not isinstance(paths, Iterable):
        raise TypeError(f"watch(paths) must be a path or paths, not {type(paths).__name__}")
    quiet_period_s = check_seconds("quiet_period_s", quiet_period_s)
    max_delay_s = check_seconds("max_delay_s", max_delay_s)
    safepoint_timeout_s = check_optional_seconds("safepoint_timeout_s", safepoint_timeout_s)
    max_directories = check_count("max_directories", max_directories)
    if engine is not None and not isinstance(engine, Engine):
        raise TypeError(f"watch(engine) must be a hotpatch.Engine, not {type(engine).__name__}")
    if on_event is not None and not callable(on_event):
        raise TypeError(f"watch(on_event) must be callable, not {type(on_event).__name__}")
    roots: list[str] = []
    for given in paths:
        if not isinstance(given, str | os.PathLike):
            raise TypeError(f"watch(paths): {given!r} is not a path (str or os.PathLike)")
        path = normalize(os.fspath(given))
        if not os.path.exists(path):
            raise ConfigError(f"cannot watch {os.fspath(given)!r}: no such file or directory")
        roots.append(path)
    if not roots:
        raise ConfigError("watch needs at least one path")
    # Drop roots inside other roots: one recursive watch covers them.
    roots = [
        r
        for r in dict.fromkeys(roots)
        if not any(o != r and os.path.isdir(o) and is_under(r, (o,)) for o in roots)
    ]
    if max_delay_s < quiet_period_s:
        raise ConfigError(
            f"need 0 <= quiet_period_s <= max_delay_s, got {quiet_period_s!r} and {max_delay_s!r}"
        )
    survey_tree(roots, max_directories=max_directories)
    watcher = Watcher(
        tuple(roots),
        engine=engine if engine is not None else default_engine(),
        quiet_period_s=quiet_period_s,
        max_delay_s=max_delay_s,
        on_event=on_event,
        allow_removals=allow_removals,
        safepoint_timeout_s=safepoint_timeout_s,
        report_unimported=report_unimported,
    )
    watcher.start()
    return watcher


def survey_tree(roots: Iterable[str], *, max_directories: int, max_depth: int = MAX_DEPTH) -> int:
    """Count the directories a recursive watch of ``roots`` would watch, refusing a tree too big.

    The walk is iterative (a deep tree cannot exhaust the Python stack, as the recursive
    ``os.walk`` of Python 3.11 under watchdog did), works on bytes (any file name), follows no
    symbolic link (neither does the observer) and stops counting at the bound, so ``watch("/")``
    fails in milliseconds. Unreadable or vanishing directories are skipped: they cannot be
    watched either.

    Returns:
        The number of directories.

    Raises:
        ConfigError: more than ``max_directories`` directories, or a directory more than
            ``max_depth`` levels below its root.
    """
    count = 0
    for root in roots:
        if not os.path.isdir(root):
            continue
        pending: list[tuple[bytes, int]] = [(os.fsencode(root), 0)]
        while pending:
            directory, depth = pending.pop()
            count += 1
            if count > max_directories:
                raise ConfigError(
                    f"cannot watch {root!r}: it holds more than {max_directories:,} directories "
                    f"(counting stopped at {os.fsdecode(directory)!r}); each one costs an inotify "
                    "watch. Watch your source directories, or raise watch(max_directories=...)"
                )
            if depth > max_depth:
                raise ConfigError(
                    f"cannot watch {root!r}: the tree is more than {max_depth} directories deep "
                    f"(at {os.fsdecode(directory)[:200]!r}...); watch a shallower directory"
                )
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                pending.append((entry.path, depth + 1))
                        except OSError:
                            continue
            except OSError:
                continue
    return count


class _StopRaceFilter(logging.Filter):
    """Drops watchdog's false error when *our* inotify emitter is stopped while it reads.

    Stopping an ``InotifyEmitter`` closes its inotify instance from the stopping thread; removing
    the watches wakes the emitter's blocked read with an ``IN_IGNORED`` event, and the emitter,
    finding its instance gone, logs ``queue_events() called when the thread is inactive`` at
    ERROR (watchdog 3 onwards, gorakhargosh/watchdog#963): about one stop in twelve here. Nothing
    went wrong (we asked it to stop), and a false ERROR on every few shutdowns trains people to
    ignore errors. The filter is attached to watchdog's inotify logger only while this watcher
    stops, and drops only that message, only from this observer's emitter threads: the same
    message from anyone else's observer, and every other watchdog record, pass untouched.
    """

    _LOGGER = "watchdog.observers.inotify"
    _MESSAGE = "queue_events() called when the thread is inactive"

    def __init__(self, watches: Collection[ObservedWatch]) -> None:
        super().__init__()
        self._watches = watches

    def filter(self, record: logging.LogRecord) -> bool:
        thread = threading.current_thread()  # a logger's filters run in the logging thread
        return not (
            isinstance(thread, EventEmitter)
            and thread.watch in self._watches
            and self._MESSAGE in str(record.msg)
        )

    def __enter__(self) -> None:
        logging.getLogger(self._LOGGER).addFilter(self)

    def __exit__(self, *_exc: object) -> None:
        logging.getLogger(self._LOGGER).removeFilter(self)


def _observer_reports_closes() -> bool:
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:  # not Linux
        return False
    return Observer is InotifyObserver


def _hash_file(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _since(batch: Batch[str]) -> float:
    return time.monotonic() - batch.first_added


def _short(path: str) -> str:
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return path if relative.startswith(os.pardir) else relative
