"""watch() on trees too big or too deep to watch: refused at once with a clear error (issue 9).

Real directories in tmp_path and the real watchdog observer; nothing is mocked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hotpatch import ConfigError, Engine
from hotpatch.watch import watch
from hotpatch.watch.watcher import DEFAULT_MAX_DIRECTORIES, MAX_DEPTH


def wait_until(predicate: Callable[[], object], *, what: str, timeout_s: float = 10.0) -> None:
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


def make_wide_tree(root: Path, count: int) -> None:
    """``count`` directories under ``root`` (100 per parent)."""
    for i in range(count):
        (root / f"d{i // 100}" / f"e{i % 100}").mkdir(parents=True, exist_ok=True)


def remove_deep_tree(top: Path) -> None:
    """Remove a nested chain iteratively (shutil.rmtree recurses, and fails at this depth)."""
    chain = [top]
    while True:
        children = [p for p in chain[-1].iterdir() if p.is_dir()]
        if not children:
            break
        chain.append(children[0])
    for directory in reversed(chain):
        for entry in directory.iterdir():
            entry.unlink()
        directory.rmdir()


def test_a_tree_with_more_directories_than_the_bound_is_refused(tmp_path: Path) -> None:
    make_wide_tree(tmp_path, DEFAULT_MAX_DIRECTORIES + 10)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        watch(tmp_path, engine=Engine())
    message = str(info.value)
    assert f"more than {DEFAULT_MAX_DIRECTORIES:,} directories" in message
    assert "max_directories" in message and "\n" not in message
    assert time.monotonic() - started < 30  # a generous bound against a hang, not a benchmark


def test_max_directories_raises_the_bound(tmp_path: Path) -> None:
    make_wide_tree(tmp_path, 120)
    with pytest.raises(ConfigError, match="more than 100 directories"):
        watch(tmp_path, engine=Engine(), max_directories=100)
    with watch(tmp_path, engine=Engine(), max_directories=200) as watcher:
        assert watcher.is_running


def test_a_tree_too_deep_is_a_clear_error_not_a_recursion_error(tmp_path: Path) -> None:
    top = tmp_path / "deep"
    depth = 1_100  # as observed: Python 3.11's recursive os.walk (under watchdog) overflowed
    path = top
    path.mkdir()
    for _ in range(depth):  # one level at a time: os.makedirs recurses, and fails at this depth
        path = path / "a"
        path.mkdir()
    try:
        with pytest.raises(ConfigError) as info:
            watch(top, engine=Engine())
        assert f"more than {MAX_DEPTH} directories deep" in str(info.value)
    finally:
        remove_deep_tree(top)


@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [
        ({"quiet_period_s": "0.1"}, TypeError, "quiet_period_s"),
        ({"quiet_period_s": float("nan")}, ConfigError, "quiet_period_s"),
        ({"max_delay_s": float("inf")}, ConfigError, "max_delay_s"),
        ({"safepoint_timeout_s": -1}, ConfigError, "safepoint_timeout_s"),
        ({"on_event": "print"}, TypeError, "on_event"),
        ({"engine": "default"}, TypeError, "engine"),
        ({"max_directories": 0}, ConfigError, "max_directories"),
    ],
)
def test_watch_arguments_are_checked_at_once(
    tmp_path: Path, kwargs: dict[str, object], error: type[Exception], named: str
) -> None:
    with pytest.raises(error, match=named):
        watch(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_a_path_that_is_not_a_path_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"watch\(paths\)"):
        watch(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"watch\(paths\)"):
        watch([b"/tmp"])  # type: ignore[list-item]
