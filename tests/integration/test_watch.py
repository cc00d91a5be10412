"""watch(): real files in tmp_path, the real watchdog observer, the real engine (no mocks)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import textwrap
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import structlog
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from hotpatch import ConfigError, Engine
from hotpatch.watch import Watcher, WatchEvent, watch


def wait_until(predicate: Callable[[], object], *, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.002)


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    wait_until(
        lambda: not (set(threading.enumerate()) - before),
        what=f"watch threads to end: {set(threading.enumerate()) - before}",
    )


@dataclass
class Project:
    """A directory on sys.path whose modules get unique names; cleaned up by the fixture."""

    root: Path
    prefix: str
    names: list[str] = field(default_factory=list)

    def name(self, stem: str) -> str:
        return f"{self.prefix}_{stem}"

    def path(self, stem: str) -> Path:
        return self.root / f"{self.name(stem)}.py"

    def write(self, stem: str, source: str) -> Path:
        path = self.path(stem)
        path.write_text(textwrap.dedent(source), encoding="utf-8")
        return path

    def load(self, stem: str, source: str) -> types.ModuleType:
        self.write(stem, source)
        name = self.name(stem)
        self.names.append(name)
        importlib.invalidate_caches()
        return importlib.import_module(name)


@pytest.fixture(name="project")
def _project(tmp_path: Path) -> Iterator[Project]:
    root = tmp_path / "proj"
    root.mkdir()
    project = Project(root, f"hpw_{uuid.uuid4().hex[:8]}")
    sys.path.insert(0, str(root))
    try:
        yield project
    finally:
        sys.path.remove(str(root))
        for name in project.names:
            sys.modules.pop(name, None)


@dataclass
class Watching:
    watcher: Watcher
    events: list[WatchEvent]

    def of_kind(self, kind: str) -> list[WatchEvent]:
        return [e for e in self.events if e.kind == kind]

    def wait_for(self, kind: str, count: int = 1) -> WatchEvent:
        wait_until(lambda: len(self.of_kind(kind)) >= count, what=f"{count} {kind!r} event(s)")
        return self.of_kind(kind)[count - 1]


StartWatch = Callable[..., Watching]


@pytest.fixture(name="start_watch")
def _start_watch(project: Project) -> Iterator[StartWatch]:
    started: list[Watcher] = []

    def start(**options: object) -> Watching:
        events: list[WatchEvent] = []
        watcher = watch(project.root, engine=Engine(), on_event=events.append, **options)  # type: ignore[arg-type]
        started.append(watcher)
        return Watching(watcher, events)

    yield start
    for watcher in started:
        watcher.stop(timeout_s=5)


# -- editor save patterns ----------------------------------------------------------------------
def save_in_place(path: Path, text: str) -> None:
    """Truncate and write in several chunks: several modified events, then closed."""
    with path.open("w", encoding="utf-8") as file:
        half = len(text) // 2
        file.write(text[:half])
        file.flush()
        os.fsync(file.fileno())
        file.write(text[half:])


def save_atomic(path: Path, text: str) -> None:
    """Write a temporary file, rename it over the original: only a moved event for the file."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def save_delete_recreate(path: Path, text: str) -> None:
    path.unlink()
    path.write_text(text, encoding="utf-8")


def save_vim_style(path: Path, text: str) -> None:
    """vim's default: probe file 4913, rename the original to a backup, write anew, drop backup."""
    probe = path.with_name("4913")
    probe.write_text("")
    probe.unlink()
    backup = path.with_name(path.name + "~")
    os.rename(path, backup)
    path.write_text(text, encoding="utf-8")
    backup.unlink()


SAVES = {
    "in_place": save_in_place,
    "atomic_rename": save_atomic,
    "delete_recreate": save_delete_recreate,
    "vim_style": save_vim_style,
}

V1 = """\
    calls = []

    def value():
        return 1

    def call_value():
        calls.append(1)
        return value()
"""


@pytest.mark.parametrize("save", SAVES.values(), ids=SAVES.keys())
def test_each_save_pattern_applies_the_new_code(
    project: Project, start_watch: StartWatch, save: Callable[[Path, str], None]
) -> None:
    mod = project.load("m", V1)
    bound = mod.value
    mod.calls.append("state")
    watching = start_watch()
    for n in (2, 3):
        save(project.path("m"), textwrap.dedent(V1).replace("return 1", f"return {n}"))
        wait_until(lambda n=n: mod.value() == n, what=f"value() to return {n}")  # type: ignore[misc]
    assert bound() == 3  # references taken before the save run the new code
    assert mod.call_value() == 3
    assert mod.calls == ["state", 1]  # unchanged module-level state is kept
    applied = watching.wait_for("applied", 2)
    assert applied.modules == (project.name("m"),)
    assert applied.results[0].changed == ("value",)
    assert not watching.of_kind("refused")


def test_a_touch_or_identical_save_does_nothing(project: Project, start_watch: StartWatch) -> None:
    project.load("m", V1)
    other = project.load("other", "def f():\n    return 1\n")
    watching = start_watch()
    with structlog.testing.capture_logs() as logs:
        path = project.path("m")
        path.write_text(path.read_text())  # identical content
        os.utime(path)
        # A real change afterwards: once it is applied, the identical save was handled too.
        project.write("other", "def f():\n    return 2\n")
        watching.wait_for("applied")  # reported after the commit: other.f() may return 2 first
    assert other.f() == 2
    assert [e.files for e in watching.events] == [(str(project.path("other")),)]
    skipped = [e for e in logs if e["event"] == "watch.change_skipped"]
    assert skipped
    assert all(e["file"] == str(project.path("m")) for e in skipped)


def test_several_files_saved_at_once_apply_as_one_change_in_dependency_order(
    project: Project, start_watch: StartWatch
) -> None:
    base = project.load("base", "def f():\n    return 1\n")
    top = project.load("top", f"import {project.name('base')} as base\n\ndef g():\n    return 10\n")
    watching = start_watch()
    # Written top first: the change set still lists base before top, which imports it.
    project.write(
        "top", f"import {project.name('base')} as base\n\ndef g():\n    return base.f() * 100\n"
    )
    project.write("base", "def f():\n    return 2\n")
    event = watching.wait_for("applied")
    assert event.modules == (project.name("base"), project.name("top"))
    assert (base.f(), top.g()) == (2, 200)
    assert len(watching.events) == 1


def test_a_multi_file_change_with_one_broken_file_applies_nothing_until_fixed(
    project: Project, start_watch: StartWatch
) -> None:
    a = project.load("a", "def f():\n    return 1\n")
    b = project.load("b", "def g():\n    return 1\n")
    watching = start_watch()
    project.write("a", "def f():\n    return 2\n")
    project.write("b", "def g():\n    return (\n")
    refused = watching.wait_for("refused")
    assert refused.error is not None
    assert refused.error.module == project.name("b")
    assert refused.error.stage == "compile"
    assert set(refused.modules) == {project.name("a"), project.name("b")}
    assert (a.f(), b.g()) == (1, 1)  # none of the change set is live
    project.write("b", "def g():\n    return 2\n")  # fixing b alone applies a's saved change too
    applied = watching.wait_for("applied")
    assert set(applied.modules) == {project.name("a"), project.name("b")}
    assert (a.f(), b.g()) == (2, 2)


def test_a_refactor_moving_a_new_helper_between_files_applies(
    project: Project, start_watch: StartWatch
) -> None:
    project.load("lib", "def f():\n    return 1\n")
    user = project.load(
        "user", f"from {project.name('lib')} import f\n\ndef g():\n    return f()\n"
    )
    watching = start_watch()
    project.write("lib", "def f():\n    return 1\n\ndef helper():\n    return 5\n")
    project.write(
        "user", f"from {project.name('lib')} import f, helper\n\ndef g():\n    return helper()\n"
    )
    wait_until(lambda: watching.events, what="an outcome")
    assert watching.events[0].kind == "applied", watching.events[0].describe()
    assert user.g() == 5


@pytest.mark.parametrize(
    ("broken", "stage", "lineno"),
    [
        ("def value():\n    return (\n", "compile", 2),
        ("def value():\n    return 9\n\nraise RuntimeError('boom at import')\n", "execute", 4),
    ],
    ids=["syntax_error", "exception_at_import"],
)
def test_a_refused_change_keeps_the_previous_version_and_a_fix_applies(
    project: Project, start_watch: StartWatch, broken: str, stage: str, lineno: int
) -> None:
    mod = project.load("m", V1)
    watching = start_watch()
    with structlog.testing.capture_logs() as logs:
        project.write("m", broken)
        refused = watching.wait_for("refused")
    assert refused.error is not None
    assert (refused.error.stage, refused.error.lineno) == (stage, lineno)
    assert refused.error.filename == str(project.path("m"))
    assert mod.value() == 1  # the program still runs the previous version, not half of the new
    text = refused.describe()
    assert f"{project.path('m').name}:{lineno}: change refused at {stage}" in text
    assert "still running the previous version" in text
    log = next(e for e in logs if e["event"] == "watch.change_refused")
    assert (log["stage"], log["lineno"], log["module"]) == (stage, lineno, project.name("m"))
    assert log["log_level"] == "warning"
    # Saving the broken text again is reported again (it is still not live); a fix applies.
    save_atomic(project.path("m"), textwrap.dedent(V1).replace("return 1", "return 4"))
    wait_until(lambda: mod.value() == 4, what="the fixed version to apply")
    assert watching.wait_for("applied").modules == (project.name("m"),)


def test_reverting_to_the_live_version_after_a_refusal_is_accepted(
    project: Project, start_watch: StartWatch
) -> None:
    mod = project.load("m", V1)
    watching = start_watch()
    project.write("m", "def value(:\n")
    watching.wait_for("refused")
    project.write("m", V1)  # back to exactly what is live
    applied = watching.wait_for("applied")
    assert applied.results[0].is_noop
    assert mod.value() == 1


def test_a_removed_function_is_applied_with_a_warning(
    project: Project, start_watch: StartWatch
) -> None:
    mod = project.load("m", "def keep():\n    return 1\n\ndef gone():\n    return 2\n")
    watching = start_watch()
    with structlog.testing.capture_logs() as logs:
        project.write("m", "def keep():\n    return 3\n")
        watching.wait_for("applied")
    assert mod.keep() == 3
    assert not hasattr(mod, "gone")
    removed = [e for e in logs if e["event"] == "watch.names_removed"]
    assert removed == [
        {
            "event": "watch.names_removed",
            "module": project.name("m"),
            "removed": ["gone"],
            "log_level": "warning",
        }
    ]


def test_a_deleted_module_file_is_reported_not_patched(
    project: Project, start_watch: StartWatch
) -> None:
    mod = project.load("m", V1)
    watching = start_watch()
    with structlog.testing.capture_logs() as logs:
        project.path("m").unlink()
        event = watching.wait_for("deleted")
    assert event.modules == (project.name("m"),)
    assert mod.value() == 1
    assert any(e["event"] == "watch.file_deleted" for e in logs)
    project.write("m", textwrap.dedent(V1).replace("return 1", "return 5"))  # recreated later
    wait_until(lambda: mod.value() == 5, what="the recreated file to apply")


def test_unimported_files_and_clutter_never_trigger_anything(
    project: Project, start_watch: StartWatch
) -> None:
    mod = project.load("m", V1)
    watching = start_watch(report_unimported=True)
    root = project.root
    clutter = [
        root / f".{project.path('m').name}.swp",
        root / f"{project.path('m').name}~",
        root / f".#{project.path('m').name}",
        root / "4913",
        root / "__pycache__" / "x.py",
        root / ".git" / "hook.py",
        root / "env" / "lib" / "site.py",
        root / "lib" / "site-packages" / "dep.py",
        root / "notes.txt",
    ]
    (root / "env").mkdir()
    (root / "env" / "pyvenv.cfg").write_text("home = /usr\n")
    with structlog.testing.capture_logs() as logs:
        for path in clutter:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("raise SystemExit('must never run')\n")
        new = project.write("new", "def f():\n    return 1\n")  # not imported: ignored, reported
        ignored = watching.wait_for("ignored")
        project.write("m", textwrap.dedent(V1).replace("return 1", "return 2"))
        watching.wait_for("applied")
    assert ignored.files == (str(new),)
    assert mod.value() == 2
    seen = {f for e in logs if e["event"] == "watch.change_detected" for f in e["files"]}
    assert seen <= {str(new), str(project.path("m"))}
    # Once imported, the new module is watched like the others.
    new_mod = importlib.import_module(project.name("new"))
    project.names.append(project.name("new"))
    wait_until(lambda: watching.watcher.engine.history(new_mod.__name__), what="baseline recorded")
    project.write("new", "def f():\n    return 2\n")
    wait_until(lambda: new_mod.f() == 2, what="the newly imported module to be patched")


def test_stop_ends_the_threads_and_the_watcher_is_a_context_manager(project: Project) -> None:
    mod = project.load("m", V1)
    with structlog.testing.capture_logs() as logs, watch(project.root, engine=Engine()) as watcher:
        assert watcher.is_running
        project.write("m", textwrap.dedent(V1).replace("return 1", "return 2"))
        wait_until(lambda: mod.value() == 2, what="the change to apply")
    assert not watcher.is_running
    watcher.stop()  # idempotent
    events = [e["event"] for e in logs if e["event"].startswith("watch.")]
    assert events[0] == "watch.started"
    assert events[-1] == "watch.stopped"
    assert "watch.change_applied" in events


def test_a_failing_callback_does_not_end_watch_mode(project: Project) -> None:
    mod = project.load("m", V1)

    def explode(event: WatchEvent) -> None:
        raise RuntimeError("callback bug")

    with (
        structlog.testing.capture_logs() as logs,
        watch(project.root, engine=Engine(), on_event=explode),
    ):
        for n in (2, 3):
            project.write("m", textwrap.dedent(V1).replace("return 1", f"return {n}"))
            wait_until(lambda n=n: mod.value() == n, what=f"value() == {n}")  # type: ignore[misc]
        wait_until(
            lambda: sum(e["event"] == "watch.callback_failed" for e in logs) == 2,
            what="two callback failures logged",
        )


def test_missing_paths_and_bad_timings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        watch(tmp_path / "missing")
    with pytest.raises(ConfigError, match="quiet_period_s"):
        watch(tmp_path, quiet_period_s=1.0, max_delay_s=0.5)


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_stopping_never_logs_watchdogs_false_error(tmp_path: Path) -> None:
    """watchdog's emitter, stopped while it reads, logs "queue_events() called when the thread is
    inactive" at ERROR on one stop in seven to twelve here: a false alarm (we asked it to stop).
    A bare observer, started, sent one event (so its emitter is in its read loop) and stopped,
    shows the race is there; the watcher's stops, the same way, must never show it."""
    emitter_log = logging.getLogger("watchdog.observers.inotify")
    count = _Count()
    emitter_log.addHandler(count)
    was_disabled, emitter_log.disabled = emitter_log.disabled, False
    try:
        arrived = threading.Event()

        class _Arrived(FileSystemEventHandler):
            def on_any_event(self, event: object) -> None:
                arrived.set()

        def event_seen(i: int) -> None:
            arrived.clear()
            (tmp_path / "touched.txt").write_text(str(i), encoding="utf-8")
            assert arrived.wait(30), "no watchdog event within 30 s"

        for i in range(100):  # P(no race in 100 bare stops) is below 1e-5 on this machine
            observer = Observer()
            observer.schedule(_Arrived(), str(tmp_path), recursive=True)
            observer.start()
            event_seen(i)
            observer.stop()
            observer.join(30)
        bare = len(count.messages)
        count.messages.clear()
        for i in range(100):
            watcher = watch(tmp_path, engine=Engine())
            watcher._observer.schedule(_Arrived(), str(tmp_path), recursive=True)
            event_seen(i)
            watcher.stop(timeout_s=30)
    finally:
        emitter_log.removeHandler(count)
        emitter_log.disabled = was_disabled
    if not bare:
        pytest.skip("this watchdog and kernel never showed the race in 100 bare stops")
    assert count.messages == [], count.messages
