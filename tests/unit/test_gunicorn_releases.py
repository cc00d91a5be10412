"""Releases, pure and on real files: the snapshot rule, the walk, the manifest checks, stale removal.

No processes (but one ``true`` run to obtain a pid that is gone) and no sleeps.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.errors import ConfigError, InsecurePath
from hotpatch.gunicorn._fileset import (
    Pattern,
    SnapshotRule,
    WalkError,
    show_path,
    walk,
)
from hotpatch.gunicorn._releases import (
    SnapshotError,
    check_release,
    master_releases_dir,
    process_stamp,
    releases_root,
    remove_stale,
    take_snapshot,
    verify_release,
)
from hotpatch.gunicorn._settings import load_settings, reset_configuration
from hotpatch.rundir import durable_dir, trusted_private_dir

NOBODY = 65534
as_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user")


def _bypasses_permissions() -> bool:
    """Whether this process reads a mode-000 file (root with its DAC capabilities)."""
    fd, name = tempfile.mkstemp()
    os.close(fd)
    try:
        os.chmod(name, 0)
        with open(name, "rb"):
            return True
    except PermissionError:
        return False
    finally:
        os.unlink(name)


not_root = pytest.mark.skipif(
    _bypasses_permissions(),
    reason="root reads unreadable files; tests/integration/test_gunicorn_releases.py covers it "
    "with a master that dropped its DAC capabilities",
)


@pytest.fixture(autouse=True)
def _forget_configuration() -> Iterator[None]:
    reset_configuration()
    yield
    reset_configuration()


# -- the rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "is_dir", "included"),
    [
        (b"app.py", False, True),
        (b"static/app.js", False, True),
        (b"dist", True, True),
        (b"build", True, True),
        (b"logs", True, True),
        (b"gunicorn.log", False, False),
        (b"logs/access.log.1", False, False),
        (b"gunicorn.pid", False, False),
        (b"pkg/mod.pyc", False, False),
        (b"pkg/.mod.py.swp", False, False),
        (b"pkg/mod.py~", False, False),
        (b".git", True, False),
        (b"pkg/__pycache__", True, False),
        (b"pkg.egg-info", True, False),
        (b"node_modules", True, False),
        (b"caf\xe9.txt", False, True),
    ],
)
def test_builtin_rule(rel: bytes, is_dir: bool, included: bool) -> None:
    assert SnapshotRule().includes(rel, is_dir=is_dir) is included


def test_user_patterns_are_gitignore_like() -> None:
    rule = SnapshotRule.build(["*.sqlite3", "/uploads", "data/cache/"])
    assert not rule.includes(b"db.sqlite3", is_dir=False)
    assert not rule.includes(b"a/b/db.sqlite3", is_dir=False)
    assert not rule.includes(b"uploads", is_dir=True)
    assert rule.includes(b"pkg/uploads", is_dir=True)  # anchored at the app directory
    assert not rule.includes(b"data/cache", is_dir=True)
    assert rule.includes(b"data/cache", is_dir=False)  # a trailing / means directories only
    assert rule.includes(b"app.py", is_dir=False)


def test_a_pattern_that_matches_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="empty exclude pattern"):
        Pattern.parse("/")


def test_exclude_paths_leave_out_hotpatchs_own_directories(tmp_path: Path) -> None:
    rule = SnapshotRule.build(exclude_paths=[tmp_path / "state"])
    full = os.fsencode(tmp_path / "state")
    assert not rule.includes(b"state", is_dir=True, full_path=full)
    assert rule.includes(b"state", is_dir=True, full_path=full + b"x")


def test_show_path_never_raises_on_undecodable_names() -> None:
    assert show_path(b"/srv/app/caf\xe9.txt") == "/srv/app/caf\\xe9.txt"
    assert show_path("/srv/app/café") == "/srv/app/café"


# -- the walk ---------------------------------------------------------------------------------


def make_deep(root: Path, levels: int) -> bytes:
    """``root/d/d/...`` ``levels`` deep, made by descriptor; returns the deepest path."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    return os.fsencode(root) + b"/d" * levels


def remove_deep(root: Path, levels: int) -> None:
    for level in range(levels, 0, -1):
        os.rmdir(os.fsencode(root) + b"/d" * level)


def test_the_walk_is_iterative_and_refuses_a_runaway_tree_clearly(tmp_path: Path) -> None:
    deepest = make_deep(tmp_path, 1100)
    try:
        with open(deepest + b"/leaf.py", "wb") as fh:
            fh.write(b"x = 1\n")
        # Deeper than the default recursion limit (1000): a recursive walk would fail here.
        rels = [f.rel for f in walk(str(tmp_path), max_depth=2000)]
        assert rels[-1] == b"d/" * 1100 + b"leaf.py"
        with pytest.raises(WalkError, match="nested more than 128 directories deep"):
            list(walk(str(tmp_path)))
    finally:
        os.unlink(deepest + b"/leaf.py")
        remove_deep(tmp_path, 1100)


def test_the_walk_keeps_names_as_bytes_and_skips_what_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("x = 1\n")
    with open(os.fsencode(tmp_path) + b"/caf\xe9.txt", "wb") as fh:
        fh.write(b"data")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to("app.py")
    found = {f.rel: f.kind for f in walk(str(tmp_path))}
    assert found == {b"app.py": "F", b"caf\xe9.txt": "F", b"link": "L"}


def test_a_virtual_environment_is_left_out_wherever_it_is(tmp_path: Path) -> None:
    (tmp_path / "env" / "lib").mkdir(parents=True)
    (tmp_path / "env" / "pyvenv.cfg").write_text("home = /usr\n")
    (tmp_path / "env" / "lib" / "x.py").write_text("")
    assert [f.rel for f in walk(str(tmp_path))] == []


@not_root
def test_an_unlistable_directory_fails_the_walk(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o100)
    try:
        with pytest.raises(WalkError, match="locked: cannot list or examine it: Permission denied"):
            list(walk(str(tmp_path)))
    finally:
        locked.chmod(0o700)


# -- snapshots and their manifest ---------------------------------------------------------------


@pytest.fixture(name="app")
def _app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    (app / "dist").mkdir(parents=True)
    (app / "app.py").write_text("VERSION = 1\n")
    (app / "dist" / "app.js").write_text("console.log(1);\n")
    (app / "current.js").symlink_to("dist/app.js")
    (app / "gunicorn.log").write_text("GET / 200\n")
    with open(os.fsencode(app) + b"/caf\xe9.txt", "wb") as fh:
        fh.write(b"latin-1")
    os.mkfifo(app / "control.fifo")
    (tmp_path / "releases").mkdir()
    return app


def test_a_snapshot_copies_what_the_app_needs_and_only_that(app: Path) -> None:
    release = take_snapshot(app, app.parent / "releases", number=0)
    copied = {f.rel for f in walk(str(release.path))}
    assert copied == {b"app.py", b"dist", b"dist/app.js", b"current.js", b"caf\xe9.txt"}
    assert os.readlink(release.path / "current.js") == "dist/app.js"
    assert release.files == 3
    (app / "gunicorn.log").write_text("GET / 200\n" * 100)  # log churn: the same release content
    again = take_snapshot(app, app.parent / "releases", number=1)
    assert again.sha256 == release.sha256
    (app / "dist" / "app.js").write_text("console.log(2);\n")
    assert take_snapshot(app, app.parent / "releases", number=2).sha256 != release.sha256


@not_root
def test_an_unreadable_file_fails_the_snapshot_and_leaves_no_copy(app: Path) -> None:
    secret = app / "secret.bin"
    secret.write_bytes(b"x")
    secret.chmod(0)
    try:
        with pytest.raises(SnapshotError, match=r"secret\.bin: cannot snapshot: Permission denied"):
            take_snapshot(app, app.parent / "releases", number=0)
    finally:
        secret.chmod(0o600)
    assert list((app.parent / "releases").iterdir()) == []


def test_an_intact_release_passes_both_checks(app: Path) -> None:
    release = take_snapshot(app, app.parent / "releases", number=0)
    (release.path / "__pycache__").mkdir()  # what workers write there is no damage
    (release.path / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"x")
    assert check_release(release) is None
    assert verify_release(release.path, release.manifest) is None


def test_a_deleted_release_or_file_is_detected(app: Path) -> None:
    release = take_snapshot(app, app.parent / "releases", number=0)
    os.unlink(release.path / "dist" / "app.js")
    assert check_release(release) == "dist/app.js is missing (No such file or directory)"
    assert verify_release(release.path, release.manifest) == "dist/app.js is missing"
    os.unlink(release.path / "app.py")
    os.unlink(release.path / "current.js")
    os.unlink(os.fsencode(release.path) + b"/caf\xe9.txt")
    os.rmdir(release.path / "dist")
    os.rmdir(release.path)
    assert "is missing" in (check_release(release) or "")
    assert "is missing" in (verify_release(release.path, release.manifest) or "")


def test_altered_content_is_detected_by_the_full_check(app: Path) -> None:
    release = take_snapshot(app, app.parent / "releases", number=0)
    target = release.path / "app.py"
    st = target.stat()
    target.chmod(0o600)
    target.write_text("VERSION = 9\n")  # same size, same inode, old mtime restored
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert check_release(release) is None  # the cheap check cannot see it ...
    assert verify_release(release.path, release.manifest) == "app.py has changed content"
    replaced = release.path / "app.py.new"
    replaced.write_text("VERSION = 1\n")
    replaced.replace(target)  # ... but sees any replaced entry
    assert check_release(release) == "app.py was replaced"


def test_a_retargeted_link_is_detected(app: Path) -> None:
    release = take_snapshot(app, app.parent / "releases", number=0)
    os.unlink(release.path / "current.js")
    (release.path / "current.js").symlink_to("/etc/passwd")
    assert check_release(release) in ("current.js was replaced", "current.js points elsewhere")
    assert verify_release(release.path, release.manifest) == "current.js points elsewhere"


# -- where releases live, and who cleans them ---------------------------------------------------


def test_releases_live_under_xdg_state_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    root, warning = releases_root(None)
    assert root == tmp_path / "state" / "hotpatch" / "releases" and warning is None
    for path in (root, root.parent, tmp_path / "state"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_an_unusable_state_home_falls_back_to_the_runtime_dir_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # others could swap what is in it
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_STATE_HOME", str(shared / "state"))
    monkeypatch.setenv("HOTPATCH_RUNTIME_DIR", str(runtime))
    root, warning = releases_root(None)
    assert root == runtime / "releases"
    assert warning is not None and "temp cleaners may remove them" in warning
    assert "HOTPATCH_RELEASES_DIR" in warning


def test_a_configured_releases_dir_is_used_or_refused_never_replaced(tmp_path: Path) -> None:
    root, warning = releases_root(tmp_path / "mine" / "releases")
    assert root == tmp_path / "mine" / "releases" and warning is None
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(InsecurePath, match="other users could replace"):
        releases_root(tmp_path / "open" / "releases")


def test_trusted_private_dir_refuses_a_link_as_the_directory(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(InsecurePath, match="symbolic link"):
        trusted_private_dir(tmp_path / "link")


@as_root
def test_trusted_private_dir_refuses_a_parent_of_another_user(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(InsecurePath, match=f"owned by uid {NOBODY}"):
        trusted_private_dir(theirs / "hotpatch")
    assert not (theirs / "hotpatch").exists()


def gone_pid() -> int:
    done = subprocess.run(["true"], check=True)
    assert done.returncode == 0
    pid = int(subprocess.run(["sh", "-c", "echo $$"], capture_output=True, check=True).stdout)
    assert process_stamp(pid) is None
    return pid


def test_remove_stale_removes_dead_and_pid_reused_masters_only(tmp_path: Path) -> None:
    root = tmp_path / "releases"
    root.mkdir(mode=0o700)
    alive = master_releases_dir(root, os.getpid())
    stamp = process_stamp(os.getpid())
    assert stamp is not None and alive.name == f"gunicorn-{os.getpid()}-{stamp}"
    boot = stamp.split("-")[0]
    dead = root / f"gunicorn-{gone_pid()}-{boot}-12345"
    reused = root / f"gunicorn-{os.getpid()}-{boot}-1"  # our pid, another start time
    for path in (dead, reused):
        (path / "r0-abc").mkdir(parents=True)
        (path / "r0-abc" / "app.py").write_text("x = 1\n")
        (path / "r0-abc" / "app.py").chmod(0o400)
    unrelated = root / "notes"
    unrelated.mkdir()
    outside = tmp_path / "victim"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    planted = root / f"gunicorn-{gone_pid()}-{boot}-7"
    planted.symlink_to(outside)
    removed = remove_stale(root, keep=alive)
    assert sorted(removed) == sorted([dead.name, reused.name])
    assert sorted(p.name for p in root.iterdir()) == sorted([alive.name, "notes", planted.name])
    assert (outside / "keep.txt").read_text() == "mine"  # a link is never followed


@as_root
def test_remove_stale_never_touches_another_users_directory(tmp_path: Path) -> None:
    root = tmp_path / "releases"
    root.mkdir(mode=0o700)
    stamp = process_stamp(os.getpid())
    assert stamp is not None
    theirs = root / f"gunicorn-{gone_pid()}-{stamp.split('-')[0]}-5"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    assert remove_stale(root) == []
    assert theirs.exists()


# -- settings ---------------------------------------------------------------------------------


def test_snapshot_settings_from_the_environment(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "HOTPATCH_SNAPSHOT_EXCLUDE": "*.sqlite3, /uploads ,data/cache/",
            "HOTPATCH_RELEASES_DIR": str(tmp_path / "rel"),
        }
    )
    assert settings.snapshot_exclude == ("*.sqlite3", "/uploads", "data/cache/")
    assert settings.releases_dir == tmp_path / "rel"
    with pytest.raises(ConfigError, match="HOTPATCH_SNAPSHOT_EXCLUDE: '/' is not a pattern"):
        load_settings({"HOTPATCH_SNAPSHOT_EXCLUDE": "a,/"})


def test_durable_dir_is_under_the_home_directory_and_never_creates_a_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    monkeypatch.setenv("HOME", str(home))
    assert durable_dir() == home / ".local" / "state" / "hotpatch"
    assert stat.S_IMODE((home / ".local" / "state" / "hotpatch").stat().st_mode) == 0o700
    monkeypatch.setenv("HOME", str(tmp_path / "nonexistent"))
    with pytest.raises(FileNotFoundError):
        durable_dir()
    assert not (tmp_path / "nonexistent").exists()
