"""The runtime directory refuses anything another user could have made, replaced or linked."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.errors import InsecurePath
from hotpatch.rundir import (
    ENV_RUNTIME_DIR,
    check_private_dir,
    private_dir,
    read_private,
    runtime_dir,
    write_private,
)

NOBODY = 65534
as_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a second user")


@pytest.fixture(name="tmp_base")
def _tmp_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A stand-in for the shared temp directory (mode 1777, reachable by other users, as /tmp is).

    No XDG or configured directory. It lives in the real temp directory, not in pytest's private
    tmp_path, so that a process of another uid can reach it.
    """
    del tmp_path  # made before tempfile is patched, so pytest keeps its own base
    base = Path(tempfile.gettempdir()) / f"hotpatch-test-{uuid.uuid4().hex}"
    base.mkdir()
    base.chmod(0o1777)
    monkeypatch.delenv(ENV_RUNTIME_DIR, raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    yield base
    shutil.rmtree(base)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_created_private_in_tmp(tmp_base: Path) -> None:
    path = runtime_dir()
    assert path == tmp_base / f"hotpatch-{os.getuid()}"
    assert mode_of(path) == 0o700
    assert runtime_dir() == path  # a second call accepts what the first made


def test_a_planted_symlink_is_refused_and_not_followed(tmp_base: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (tmp_base / f"hotpatch-{os.getuid()}").symlink_to(victim)
    with pytest.raises(InsecurePath, match="symbolic link"):
        runtime_dir()
    assert list(victim.iterdir()) == []


def test_an_open_mode_is_refused_not_repaired(tmp_base: Path) -> None:
    path = tmp_base / f"hotpatch-{os.getuid()}"
    path.mkdir()
    path.chmod(0o755)
    with pytest.raises(InsecurePath, match="0755"):
        runtime_dir()
    assert mode_of(path) == 0o755  # never chmod what we did not create


def test_a_file_in_its_place_is_refused(tmp_base: Path) -> None:
    (tmp_base / f"hotpatch-{os.getuid()}").write_text("x")
    with pytest.raises(InsecurePath, match="not a directory"):
        runtime_dir()


@as_root
def test_a_directory_another_user_created_first_is_refused(tmp_base: Path) -> None:
    """A real process of another uid creates the directory before we start."""
    path = tmp_base / f"hotpatch-{os.getuid()}"
    subprocess.run(
        ["mkdir", "-m", "700", str(path)],
        check=True,
        user=NOBODY,
        timeout=30,
    )
    assert os.lstat(path).st_uid == NOBODY
    with pytest.raises(InsecurePath, match=f"owned by uid {NOBODY}"):
        runtime_dir()


def test_xdg_runtime_dir_is_preferred_when_private(
    tmp_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert runtime_dir() == xdg / "hotpatch"
    assert mode_of(xdg / "hotpatch") == 0o700


@as_root
def test_someone_elses_xdg_runtime_dir_is_not_used(
    tmp_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sudo`` may keep the invoking user's XDG_RUNTIME_DIR: root must not put its sockets there."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    os.chown(xdg, NOBODY, NOBODY)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert runtime_dir() == tmp_base / f"hotpatch-{os.getuid()}"
    assert not (xdg / "hotpatch").exists()


def test_a_configured_directory_must_pass_the_same_check(
    tmp_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configured = tmp_path / "run"
    configured.mkdir(mode=0o755)
    configured.chmod(0o755)
    monkeypatch.setenv(ENV_RUNTIME_DIR, str(configured))
    with pytest.raises(InsecurePath, match="0755"):
        runtime_dir()
    configured.chmod(0o700)
    assert runtime_dir() == configured
    monkeypatch.setenv(ENV_RUNTIME_DIR, "relative/run")
    with pytest.raises(InsecurePath, match="absolute"):
        runtime_dir()


def test_private_dir_takes_one_component(tmp_path: Path) -> None:
    parent = tmp_path / "p"
    parent.mkdir(mode=0o700)
    for bad in ("", ".", "..", "a/b", "a\0b"):
        with pytest.raises(ValueError, match="single path component"):
            private_dir(parent, bad)
    assert mode_of(private_dir(parent, "child")) == 0o700
    check_private_dir(parent / "child")


def test_read_private_refuses_links_fifos_and_oversize(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"secret")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(InsecurePath, match="symbolic link"):
        read_private(link)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InsecurePath, match="not a regular file"):
        read_private(fifo)  # and it did not block waiting for a writer
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    with pytest.raises(ValueError, match="larger than 100 bytes"):
        read_private(big, max_bytes=100)
    assert read_private(big, max_bytes=101) == b"x" * 101
    with pytest.raises(FileNotFoundError):
        read_private(tmp_path / "missing")


@as_root
def test_read_private_refuses_another_users_file(tmp_path: Path) -> None:
    path = tmp_path / "planted"
    path.write_bytes(b"{}")
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(InsecurePath, match=f"owned by uid {NOBODY}"):
        read_private(path)


def test_write_private_replaces_a_planted_link_without_writing_through_it(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    path = tmp_path / "state.json"
    path.symlink_to(target)
    write_private(path, b"new")
    assert target.read_bytes() == b"precious"
    assert not path.is_symlink()
    assert path.read_bytes() == b"new"
    assert mode_of(path) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_shared_directory_is_never_advised_to_be_chmodded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HOTPATCH_RUNTIME_DIR=/tmp must not produce the advice `chmod 700 /tmp`."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setenv(ENV_RUNTIME_DIR, str(shared))
    with pytest.raises(InsecurePath, match="shared directory") as refused:
        runtime_dir()
    assert "chmod" not in str(refused.value)
    assert mode_of(shared) == 0o1777


def test_own_subdirs_yields_only_real_directories_of_this_uid(tmp_path: Path) -> None:
    import re

    from hotpatch.rundir import own_subdirs

    (tmp_path / "gunicorn-1").mkdir()
    (tmp_path / "gunicorn-2").write_text("a file")
    (tmp_path / "gunicorn-3").symlink_to(tmp_path / "gunicorn-1")
    (tmp_path / "other-4").mkdir()
    if os.getuid() == 0:
        (tmp_path / "gunicorn-5").mkdir()
        os.chown(tmp_path / "gunicorn-5", NOBODY, NOBODY)
    found = [(p.name, m[1]) for p, m in own_subdirs(tmp_path, re.compile(r"gunicorn-(\d+)"))]
    assert found == [("gunicorn-1", "1")]
    assert list(own_subdirs(tmp_path / "missing", re.compile(".*"))) == []
