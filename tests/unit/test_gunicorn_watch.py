"""Watch mode of the gunicorn hook, pure parts: scan filter, signature diff, debounce decision.

The clock is a number passed in; hashing is a dict lookup. No sleeps, no processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.errors import ConfigError
from hotpatch.gunicorn._fileset import SnapshotRule
from hotpatch.gunicorn._settings import configure, load_settings, reset_configuration
from hotpatch.gunicorn._watch import (
    ChangeDetector,
    FileStat,
    changed_paths,
    hash_sources,
    scan_sources,
)
from hotpatch.watch.pathfilter import is_ignored


@pytest.fixture(autouse=True)
def _forget_configuration() -> Iterator[None]:
    reset_configuration()
    yield
    reset_configuration()


def stat(mtime: int, size: int = 10, inode: int = 1) -> FileStat:
    return FileStat(mtime_ns=mtime, size=size, inode=inode)


# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["1", "true", "YES", " on "])
def test_watch_accepts_true_words(word: str) -> None:
    assert load_settings({"HOTPATCH_WATCH": word}).watch is True


@pytest.mark.parametrize("word", ["0", "false", "No", "off"])
def test_watch_accepts_false_words(word: str) -> None:
    configure(watch=True)
    assert load_settings({"HOTPATCH_WATCH": word}).watch is False


def test_watch_is_off_by_default_and_configure_turns_it_on() -> None:
    assert load_settings({}).watch is False
    configure(watch=True, watch_interval_s=0.5)
    s = load_settings({})
    assert s.watch is True and s.watch_interval_s == 0.5


def test_watch_rejects_other_words_naming_variable_and_value() -> None:
    with pytest.raises(ConfigError, match=r"environment variable HOTPATCH_WATCH: .* got 'maybe'"):
        load_settings({"HOTPATCH_WATCH": "maybe"})
    with pytest.raises(ConfigError, match=r"configure\(watch=...\)"):
        configure(watch="sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["soon", "0", "-1", "0.01", "nan"])
def test_watch_interval_rejects_bad_values(value: str) -> None:
    with pytest.raises(ConfigError, match=f"HOTPATCH_WATCH_INTERVAL.*{value!r}"):
        load_settings({"HOTPATCH_WATCH_INTERVAL": value})


def test_watch_interval_from_environment() -> None:
    assert load_settings({"HOTPATCH_WATCH_INTERVAL": "0.4"}).watch_interval_s == 0.4


# -- signature diff --------------------------------------------------------------------------


def test_changed_paths_reports_added_removed_and_modified() -> None:
    old = {"a.py": stat(1), "b.py": stat(1), "c.py": stat(1)}
    new = {"a.py": stat(1), "b.py": stat(2), "d.py": stat(1)}
    assert changed_paths(old, new) == {"b.py", "c.py", "d.py"}


def test_changed_paths_sees_a_rename_over_the_file_with_same_mtime_and_size() -> None:
    assert changed_paths({"a.py": stat(5, inode=1)}, {"a.py": stat(5, inode=2)}) == {"a.py"}


def test_changed_paths_of_equal_signatures_is_empty() -> None:
    assert changed_paths({"a.py": stat(1)}, {"a.py": stat(1)}) == frozenset()


# -- debounce and content decision ------------------------------------------------------------


class Files:
    """A fake tree: relative path -> content, with stats derived from a write counter."""

    def __init__(self, **contents: str) -> None:
        self.contents = dict(contents)
        self.stats = {p: stat(1, len(c)) for p, c in contents.items()}
        self.hash_calls: list[str] = []

    def write(self, path: str, content: str, *, mtime: int) -> None:
        self.contents[path] = content
        self.stats[path] = stat(mtime, len(content))

    def remove(self, path: str) -> None:
        del self.contents[path]
        del self.stats[path]

    def signature(self) -> dict[str, FileStat]:
        return dict(self.stats)

    def hash_of(self, path: str) -> str | None:
        self.hash_calls.append(path)
        content = self.contents.get(path)
        return None if content is None else f"h:{content}"

    def hashes(self) -> dict[str, str]:
        return {p: f"h:{c}" for p, c in self.contents.items()}


def detector(files: Files, *, now: float = 0.0) -> ChangeDetector:
    return ChangeDetector(
        files.signature(),
        files.hashes(),
        now=now,
        interval_s=0.25,
        quiet_period_s=0.2,
        max_delay_s=2.0,
    )


def test_a_save_is_released_once_a_scan_sees_it_quiet() -> None:
    files = Files(**{"app.py": "v1"})
    d = detector(files)
    assert d.next_scan_at() == 0.25
    files.write("app.py", "v2", mtime=2)
    first = d.observe(files.signature(), now=0.25, hash_of=files.hash_of)
    assert not first.is_batch and d.is_pending
    assert d.next_scan_at() == pytest.approx(0.45)  # the quiet period ends before the interval
    assert not d.is_scan_due(0.44) and d.is_scan_due(0.45)
    second = d.observe(files.signature(), now=0.45, hash_of=files.hash_of)
    assert second.changed == {"app.py"} and second.unchanged == frozenset()
    assert not d.is_pending and d.next_scan_at() == pytest.approx(0.70)


def test_a_change_seen_again_postpones_the_release() -> None:
    files = Files(**{"app.py": "v1"})
    d = detector(files)
    files.write("app.py", "v2-partial", mtime=2)
    assert not d.observe(files.signature(), now=0.25, hash_of=files.hash_of).is_batch
    files.write("app.py", "v2", mtime=3)  # still being written at the next scan
    assert not d.observe(files.signature(), now=0.45, hash_of=files.hash_of).is_batch
    assert files.hash_calls == []  # nothing read while the burst goes on
    assert d.observe(files.signature(), now=0.65, hash_of=files.hash_of).changed == {"app.py"}


def test_a_file_that_never_settles_is_released_at_the_ceiling() -> None:
    files = Files(**{"app.py": "v1"})
    d = detector(files)
    released = None
    for step in range(1, 20):
        now = step * 0.2
        files.write("app.py", f"v{step}", mtime=step + 1)
        seen = d.observe(files.signature(), now=now, hash_of=files.hash_of)
        if seen.is_batch:
            released = now
            break
    assert released is not None and released == pytest.approx(0.2 + 2.0)


def test_a_touch_or_identical_save_does_nothing() -> None:
    files = Files(**{"app.py": "v1"})
    d = detector(files)
    files.write("app.py", "v1", mtime=2)  # new mtime, same bytes
    d.observe(files.signature(), now=0.25, hash_of=files.hash_of)
    seen = d.observe(files.signature(), now=0.45, hash_of=files.hash_of)
    assert seen.changed == frozenset() and seen.unchanged == {"app.py"}
    # ... and the next real save is still compared with the right content
    files.write("app.py", "v2", mtime=3)
    d.observe(files.signature(), now=0.7, hash_of=files.hash_of)
    assert d.observe(files.signature(), now=0.9, hash_of=files.hash_of).changed == {"app.py"}


def test_several_files_saved_together_are_one_batch() -> None:
    files = Files(**{"app.py": "a1", "lib/util.py": "u1", "other.py": "o1"})
    d = detector(files)
    files.write("app.py", "a2", mtime=2)
    d.observe(files.signature(), now=0.25, hash_of=files.hash_of)
    files.write("lib/util.py", "u2", mtime=2)
    files.write("other.py", "o1", mtime=2)  # touched only
    assert not d.observe(files.signature(), now=0.4, hash_of=files.hash_of).is_batch
    seen = d.observe(files.signature(), now=0.65, hash_of=files.hash_of)
    assert seen.changed == {"app.py", "lib/util.py"} and seen.unchanged == {"other.py"}
    assert sorted(files.hash_calls) == ["app.py", "lib/util.py", "other.py"]


def test_new_and_deleted_files_are_changes() -> None:
    files = Files(**{"app.py": "a1", "old.py": "o1"})
    d = detector(files)
    files.remove("old.py")
    files.write("new.py", "n1", mtime=2)
    d.observe(files.signature(), now=0.25, hash_of=files.hash_of)
    assert d.observe(files.signature(), now=0.45, hash_of=files.hash_of).changed == {
        "new.py",
        "old.py",
    }


def test_the_same_broken_content_saved_again_does_not_retrigger() -> None:
    """After a rolled-back save, touching the broken file must not start another rollout."""
    files = Files(**{"app.py": "v1"})
    d = detector(files)
    files.write("app.py", "def broken(:", mtime=2)
    d.observe(files.signature(), now=0.25, hash_of=files.hash_of)
    assert d.observe(files.signature(), now=0.45, hash_of=files.hash_of).changed == {"app.py"}
    files.write("app.py", "def broken(:", mtime=3)
    d.observe(files.signature(), now=0.7, hash_of=files.hash_of)
    assert d.observe(files.signature(), now=0.9, hash_of=files.hash_of).changed == frozenset()


def test_a_slow_scan_stretches_the_interval() -> None:
    files = Files(**{"app.py": "v1"})
    d = detector(files)
    d.observe(files.signature(), now=1.0, hash_of=files.hash_of, scan_s=0.05)
    assert d.next_scan_at() == pytest.approx(1.5)  # 10% duty cycle: 0.05 s scan -> 0.5 s
    d.observe(files.signature(), now=1.5, hash_of=files.hash_of, scan_s=0.001)
    assert d.next_scan_at() == pytest.approx(1.75)


# -- the scan on a real tree ------------------------------------------------------------------


def make_tree(root: Path) -> None:
    for rel in [
        "app.py",
        "pkg/__init__.py",
        "pkg/views.py",
        "pkg/.views.py.swp",
        "pkg/views.py~",
        "pkg/.#views.py",
        "pkg/4913",
        "pkg/notes.txt",
        "templates/index.html",
        "__pycache__/app.cpython-311.pyc",
        "__pycache__/stray.py",
        ".git/hooks/pre-commit.py",
        ".venv/lib/site.py",
        "env/pyvenv.cfg",
        "env/lib/x.py",
        "node_modules/a/b.py",
        "build/lib/app.py",
        "dist/x.py",
        "pkg.egg-info/setup.py",
        "state/releases/r0/app.py",
        "deep/a/b/c/mod.py",
        "gunicorn.log",
        "logs/access.log.1",
        "gunicorn.pid",
    ]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n", encoding="utf-8")


def test_scan_sees_what_a_release_holds_and_agrees_with_pathfilter_on_sources(
    tmp_path: Path,
) -> None:
    make_tree(tmp_path)
    rule = SnapshotRule.build(exclude_paths=[tmp_path / "state"])
    signature = scan_sources(str(tmp_path), rule=rule)
    assert sorted(signature) == [
        "app.py",
        "build/lib/app.py",
        "deep/a/b/c/mod.py",
        "dist/x.py",
        "pkg/__init__.py",
        "pkg/notes.txt",
        "pkg/views.py",
        "templates/index.html",
    ]

    def is_venv(directory: str) -> bool:
        return os.path.exists(os.path.join(directory, "pyvenv.cfg"))

    for rel in signature:
        if rel.endswith(".py") and not rel.startswith(("build/", "dist/")):
            assert not is_ignored(str(tmp_path / rel), str(tmp_path), is_venv=is_venv), rel


def test_scan_follows_a_root_symlink_but_no_inner_ones(tmp_path: Path) -> None:
    real = tmp_path / "release-1"
    real.mkdir()
    (real / "app.py").write_text("x = 1\n", encoding="utf-8")
    (real / "loop").symlink_to(real, target_is_directory=True)
    current = tmp_path / "current"
    current.symlink_to(real, target_is_directory=True)
    assert sorted(scan_sources(str(current))) == ["app.py", "loop"]  # the link, not its content


def test_scan_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert scan_sources(str(tmp_path / "nope")) == {}


def test_scan_notices_in_place_write_and_rename_over(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("x = 1\n", encoding="utf-8")
    before = scan_sources(str(tmp_path))
    tmp = tmp_path / "app.py.tmp"
    tmp.write_text("x = 2\n", encoding="utf-8")
    tmp.replace(tmp_path / "app.py")
    renamed = scan_sources(str(tmp_path))
    assert changed_paths(before, renamed) == {"app.py"}
    hashes = hash_sources(str(tmp_path), ["app.py", "gone.py"])
    assert list(hashes) == ["app.py"]
