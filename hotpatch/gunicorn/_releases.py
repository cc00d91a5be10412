"""Releases: snapshots of the app's code that workers are pinned to.

At start-up and at every rollout the master copies the app directory into
``<state_dir>/releases/<release id>/``. A worker puts its release's copy in place of the app
directory on ``sys.path`` (in ``post_fork``, before gunicorn imports the app), so every worker runs
exactly the code of the release it was started with, whatever is on disk later. That is what lets
a worker respawned after a crash run the known-good code while broken code is still on disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

IGNORED_NAMES = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "__pycache__",
        ".venv",
        "venv",
        ".tox",
        ".nox",
        "node_modules",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".eggs",
        "build",
        "dist",
    }
)
IGNORED_SUFFIXES = (".pyc", ".pyo", ".swp", "~")
MAX_FILES = 20_000
MAX_BYTES = 500 * 1024 * 1024


_NEVER_PURGED = frozenset({"hotpatch", "gunicorn"})


class SnapshotError(Exception):
    """The app directory could not be snapshotted."""


@dataclass(frozen=True)
class Release:
    """One snapshot of the app directory.

    Attributes:
        id: ``r<rollout number>-<first 12 hex digits of the content hash>``.
        path: the snapshot directory.
        source: the app directory it was copied from (resolved at that moment).
        sha256: the content hash (relative paths and bytes of every copied file).
        files: how many files were copied.
    """

    id: str
    path: Path
    source: Path
    sha256: str
    files: int


def take_snapshot(app_dir: Path, releases_dir: Path, *, number: int, exclude: Path) -> Release:
    """Copy ``app_dir`` (resolved now, so a ``current`` symlink is followed) to a new release.

    Args:
        app_dir: the app directory.
        releases_dir: where releases live.
        number: the rollout number (0 at start-up), part of the id.
        exclude: a directory never copied (the state directory, when it is inside the app).

    Raises:
        SnapshotError: the directory is missing, too big, or a file cannot be read.
    """
    source = app_dir.resolve()
    if not source.is_dir():
        raise SnapshotError(f"{app_dir}: the app directory does not exist")
    releases_dir.mkdir(parents=True, exist_ok=True)
    staging = releases_dir / f".staging-{number}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    digest = hashlib.sha256()
    files = 0
    total = 0
    try:
        for rel in _walk(source, exclude.resolve()):
            src = source / rel
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                target = os.readlink(src)
                os.symlink(target, dst)
                digest.update(f"L {rel}\0{target}\0".encode())
                continue
            shutil.copy2(src, dst)
            data = dst.read_bytes()
            digest.update(f"F {rel}\0{len(data)}\0".encode())
            digest.update(data)
            files += 1
            total += len(data)
            if files > MAX_FILES or total > MAX_BYTES:
                raise SnapshotError(
                    f"{source}: more than {MAX_FILES} files or {MAX_BYTES // 2**20} MiB to copy; "
                    "set HOTPATCH_APP_DIR (or configure(app_dir=...)) to the app's own directory"
                )
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise SnapshotError(f"{getattr(exc, 'filename', source)}: cannot snapshot: {exc}") from exc
    except SnapshotError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    sha = digest.hexdigest()
    release_id = f"r{number}-{sha[:12]}"
    final = releases_dir / release_id
    shutil.rmtree(final, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    staging.rename(final)
    return Release(id=release_id, path=final, source=source, sha256=sha, files=files)


def _walk(root: Path, exclude: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in IGNORED_NAMES and not d.endswith(".egg-info") and here / d != exclude
        )
        for d in list(dirnames):
            if (here / d).is_symlink():  # copied as a link, not followed
                dirnames.remove(d)
                yield (here / d).relative_to(root)
        for name in sorted(filenames):
            if not name.endswith(IGNORED_SUFFIXES):
                yield (here / name).relative_to(root)


def prune_releases(releases_dir: Path, keep: Iterable[str]) -> list[str]:
    """Delete every release directory not in ``keep``; returns the ids removed."""
    wanted = set(keep)
    removed: list[str] = []
    if not releases_dir.is_dir():
        return removed
    for entry in releases_dir.iterdir():
        if entry.name.startswith("r") and entry.name not in wanted:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return sorted(removed)


def app_roots(app_dir: Path) -> tuple[Path, ...]:
    """The spellings of ``app_dir`` that ``sys.path`` entries may use (as given, and resolved)."""
    given = Path(os.path.abspath(app_dir))
    resolved = given.resolve()
    return (given,) if given == resolved else (given, resolved)


def pin_sys_path(entries: list[str], roots: tuple[Path, ...], release_dir: Path) -> list[str]:
    """``sys.path`` with every entry inside the app directory moved into ``release_dir``.

    An entry is moved only when the snapshot has the matching directory (a virtualenv inside the
    app directory is not copied and stays where it is). When no entry points into the app
    directory, ``release_dir`` goes first.
    """
    pinned: list[str] = []
    moved = False
    for entry in entries:
        target = _inside(entry, roots, release_dir)
        if target is not None:
            moved = True
            if target not in pinned:
                pinned.append(target)
        else:
            pinned.append(entry)
    if not moved:
        pinned.insert(0, str(release_dir))
    return pinned


def _inside(entry: str, roots: tuple[Path, ...], release_dir: Path) -> str | None:
    path = Path(os.path.abspath(entry or os.curdir))
    for candidate in (path, path.resolve()):
        for root in roots:
            if candidate == root or root in candidate.parents:
                mapped = release_dir / candidate.relative_to(root)
                return str(mapped) if mapped.is_dir() else None
    return None


def purge_app_modules(
    modules: MutableMapping[str, ModuleType], roots: tuple[Path, ...]
) -> list[str]:
    """Remove from ``modules`` every module loaded from the app directory; returns their names.

    A worker must import the app from its release, never reuse a copy the master imported.
    """
    purged = []
    for name, module in list(modules.items()):
        filename = getattr(module, "__file__", None)
        if not filename or name == "__main__" or name.split(".")[0] in _NEVER_PURGED:
            continue
        path = Path(os.path.abspath(filename))
        if any(root in path.parents for root in roots) and "site-packages" not in path.parts:
            del modules[name]
            purged.append(name)
    return sorted(purged)


def pin_worker(release_dir: Path, roots: tuple[Path, ...]) -> list[str]:
    """Pin this process (a freshly forked worker) to ``release_dir``; returns purged modules."""
    sys.path[:] = pin_sys_path(sys.path, roots, release_dir)
    purged = purge_app_modules(sys.modules, roots)
    sys.path_importer_cache.clear()
    return purged


def grant_release_access(release_dir: Path, *, gid: int) -> None:
    """Make one release readable by group ``gid`` (``gunicorn --group``), and by nobody else.

    Under ``gunicorn --user/--group`` the workers run as another uid than the master. Every
    directory and file of the release gets group ``gid`` and the group's read bit (and search
    bit for directories and executable files); others get nothing and the group never gets
    write. The directories above the release stay private (0700): a worker reaches the release
    through a descriptor the master hands it, never by path. Links are changed, not followed.

    Raises:
        OSError: an entry cannot be changed (the release must not be used then).
    """
    stack = [release_dir]
    while stack:
        directory = stack.pop()
        _grant(directory, gid, is_dir=True)
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_symlink():
                    os.chown(entry.path, -1, gid, follow_symlinks=False)
                else:
                    _grant(Path(entry.path), gid, is_dir=False)


def _grant(path: Path, gid: int, *, is_dir: bool) -> None:
    st = os.lstat(path)
    os.chown(path, -1, gid, follow_symlinks=False)
    mode = stat.S_IMODE(st.st_mode) & ~0o077  # no group write, nothing for others
    mode |= 0o050 if is_dir or st.st_mode & 0o100 else 0o040
    os.chmod(path, mode)  # not a link (lstat above) in a directory only this uid can change
