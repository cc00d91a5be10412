"""Releases: verified snapshots of the app's code that workers are pinned to.

At start-up and at every rollout the master copies what the app needs (the snapshot rule of
``_fileset``) into ``<releases dir>/gunicorn-<pid>-<stamp>/<release id>/`` and records a
*manifest*: for every directory, file and link, its kind and content hash (link target), plus the
size, mtime and inode of the copy. A worker puts its release's copy in place of the app directory
on ``sys.path`` (in ``post_fork``, before gunicorn imports the app), so every worker runs exactly
the code of the release it was started with, whatever is on disk later. That is what lets a worker
respawned after a crash run the known-good code while broken code is still on disk.

The problem: a copy can be damaged after it was made. Releases used to live in the temp directory,
where cleaners delete files that nobody read for days: the known-good release vanished, and a
respawned worker silently imported the broken code from the app directory (or could not boot at
all). So releases live where cleaners do not reach (``releases_root``: ``HOTPATCH_RELEASES_DIR``,
else ``$XDG_STATE_HOME/hotpatch/releases`` or ``~/.local/state/hotpatch/releases``; the runtime
directory only when those cannot be used, with a warning), and every use is verified:
``check_release`` (cheap: one ``lstat`` per entry, in the master before each spawn) and
``verify_release`` (every byte hashed again, in the worker before it pins itself). A damaged
release is never repaired from the app directory (whose content is exactly what may be broken):
the master stops spawning workers on it and says so (see ``_master``).

A master that crashed cannot remove its releases; the next master of this uid removes them
(``remove_stale``): the per-master directory's name carries the master's pid, the boot id and the
process start time, so a reused pid is never mistaken for the master that made it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from hotpatch.errors import InsecurePath
from hotpatch.gunicorn._fileset import (
    BUILTIN_RULE,
    Found,
    SnapshotRule,
    WalkError,
    show_path,
    walk,
)
from hotpatch.rundir import (
    durable_dir,
    own_subdirs,
    private_dir,
    runtime_dir,
    trusted_private_dir,
)

MAX_FILES = 20_000
MAX_BYTES = 500 * 1024 * 1024
_CHUNK = 1 << 20

_NEVER_PURGED = frozenset({"hotpatch", "gunicorn"})
_MASTER_DIR = re.compile(r"^gunicorn-(\d+)-([0-9a-f]{8}|nobootid)-(\d+)$")


class SnapshotError(Exception):
    """The app directory could not be snapshotted."""


@dataclass(frozen=True)
class Record:
    """One manifest entry.

    Attributes:
        kind: ``"F"`` file, ``"L"`` symbolic link, ``"D"`` directory.
        digest: SHA-256 of a file's bytes; a link's target (hex of its bytes); ``""`` for a
            directory.
        size: a file's size.
        mtime_ns: the copy's modification time.
        inode: the copy's inode.
    """

    kind: str
    digest: str
    size: int = 0
    mtime_ns: int = 0
    inode: int = 0


Manifest = Mapping[bytes, Record]
"""Relative path (bytes, ``/``-separated) -> ``Record`` of every entry of a release."""


@dataclass(frozen=True)
class Release:
    """One snapshot of the app directory.

    Attributes:
        id: ``r<rollout number>-<first 12 hex digits of the content hash>`` (``d<deploy
            number>-...`` for a release made by ``hotpatch deploy``).
        path: the snapshot directory.
        source: the app directory it was copied from (resolved at that moment).
        sha256: the content hash (the manifest's paths, kinds and content hashes).
        files: how many files were copied.
        manifest: what the release holds (see ``Record``).
    """

    id: str
    path: Path
    source: Path
    sha256: str
    files: int
    manifest: Manifest = field(default_factory=dict, repr=False, compare=False)


def take_snapshot(
    app_dir: Path,
    releases_dir: Path,
    *,
    number: int,
    rule: SnapshotRule = BUILTIN_RULE,
    prefix: str = "r",
) -> Release:
    """Copy what ``rule`` includes of ``app_dir`` (resolved now: a ``current`` link is followed).

    All or nothing: any entry that exists but cannot be read fails the snapshot and leaves no
    copy behind.

    Args:
        app_dir: the app directory.
        releases_dir: where this master's releases live (a private directory).
        number: the rollout number (0 at start-up), part of the id.
        prefix: the id's first letter: ``r`` for a rollout's release, ``d`` for a deploy's.
        rule: what belongs to a release (the state and releases directories are excluded by it
            when they are inside the app).

    Raises:
        SnapshotError: the directory is missing, too big, too deep, or an entry cannot be read.
    """
    source = app_dir.resolve()
    if not source.is_dir():
        raise SnapshotError(f"{show_path(str(app_dir))}: the app directory does not exist")
    staging = releases_dir / f".staging-{number}-{os.getpid()}"
    _remove_tree(staging)
    os.mkdir(staging, 0o700)
    manifest: dict[bytes, Record] = {}
    total = 0
    try:
        for found in walk(str(source), rule):
            if found.st is not None and found.kind == "F":  # a huge file is never copied
                total += found.st.st_size
            if len(manifest) >= MAX_FILES or total > MAX_BYTES:
                raise SnapshotError(
                    f"{show_path(str(source))}: more than {MAX_FILES} files or "
                    f"{MAX_BYTES // 2**20} MiB to copy; set HOTPATCH_APP_DIR (or "
                    "configure(app_dir=...)) to the app's own directory, or exclude what the app "
                    "does not need with HOTPATCH_SNAPSHOT_EXCLUDE"
                )
            manifest[found.rel] = _copy(found, os.fsencode(staging) + b"/" + found.rel)
    except WalkError as exc:
        _remove_tree(staging)
        raise SnapshotError(f"{show_path(exc.path)}: cannot snapshot: {exc.message}") from exc
    except OSError as exc:
        _remove_tree(staging)
        where = show_path(exc.filename) if isinstance(exc.filename, (str, bytes)) else source
        raise SnapshotError(f"{where}: cannot snapshot: {exc.strerror or exc}") from exc
    except BaseException:
        _remove_tree(staging)
        raise
    sha = manifest_hash(manifest)
    release_id = f"{prefix}{number}-{sha[:12]}"
    final = releases_dir / release_id
    _remove_tree(final)
    staging.rename(final)
    files = sum(1 for r in manifest.values() if r.kind == "F")
    return Release(release_id, final, source, sha, files, manifest)


def _copy(found: Found, dst: bytes) -> Record:
    if found.kind == "D":
        os.mkdir(dst, 0o700)
        st = os.lstat(dst)
        return Record("D", "", 0, st.st_mtime_ns, st.st_ino)
    if found.kind == "L":
        target = os.readlink(found.path)
        os.symlink(target, dst)
        st = os.lstat(dst)
        return Record("L", target.hex(), 0, st.st_mtime_ns, st.st_ino)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    src_fd = os.open(found.path, flags)
    try:
        src = os.fstat(src_fd)
        if not stat.S_ISREG(src.st_mode):  # replaced since it was listed
            raise OSError(0, "changed into something that is not a file", found.path)
        mode = 0o400 | (src.st_mode & 0o100)
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        digest = hashlib.sha256()
        size = 0
        try:  # at most the size seen at open: a file written meanwhile cannot grow the copy
            while size < src.st_size and (
                chunk := os.read(src_fd, min(_CHUNK, src.st_size - size))
            ):
                digest.update(chunk)
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst_fd, view) :]
            os.fchmod(dst_fd, mode)
            os.utime(dst_fd, ns=(src.st_atime_ns, src.st_mtime_ns))
            st = os.fstat(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    return Record("F", digest.hexdigest(), size, st.st_mtime_ns, st.st_ino)


def manifest_hash(manifest: Manifest) -> str:
    """The content hash of a release: its paths, kinds and content hashes (not times, inodes)."""
    digest = hashlib.sha256()
    for rel in sorted(manifest):
        record = manifest[rel]
        digest.update(b"%s %s\0%s\0" % (record.kind.encode(), rel, record.digest.encode()))
    return digest.hexdigest()


def check_release(release: Release) -> str | None:
    """Cheap check (one ``lstat`` per entry): ``None`` when intact, else what is wrong.

    Catches a release or any of its entries deleted, replaced, truncated or rewritten (a new
    inode, size or modification time), and a link pointing elsewhere. ``verify_release`` also
    reads every byte.
    """
    root = os.fsencode(release.path)
    try:
        st = os.lstat(root)
    except OSError as exc:
        return f"{show_path(root)} is missing ({exc.strerror})"
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return f"{show_path(root)} was replaced (not a directory of this user any more)"
    for rel, record in release.manifest.items():
        path = root + b"/" + rel
        try:
            st = os.lstat(path)
        except OSError as exc:
            return f"{show_path(rel)} is missing ({exc.strerror})"
        problem = _compare_stat(record, st)
        if problem is None and record.kind == "L" and _link_target(path) != record.digest:
            problem = "points elsewhere"
        if problem:
            return f"{show_path(rel)} {problem}"
    return None


def _link_target(path: bytes) -> str | None:
    try:
        return os.readlink(path).hex()
    except OSError:
        return None


_KIND_OF = {stat.S_IFDIR: "D", stat.S_IFREG: "F", stat.S_IFLNK: "L"}


def _compare_stat(record: Record, st: os.stat_result) -> str | None:
    kind = _KIND_OF.get(stat.S_IFMT(st.st_mode))
    if kind != record.kind:
        return "was replaced by something of another kind"
    if st.st_ino != record.inode:
        return "was replaced"
    if kind == "F" and (st.st_size != record.size or st.st_mtime_ns != record.mtime_ns):
        return "was modified"
    return None


def verify_release(release_dir: Path, manifest: Manifest) -> str | None:
    """Full check: ``None`` when ``release_dir`` holds exactly ``manifest``, else what differs.

    Walks the release, hashes every file again and compares each link's target. Files that are
    not in the manifest (byte code, anything the app writes next to its code) are not damage.
    Never raises for a damaged release; an unreadable entry is damage.
    """
    if not os.path.isdir(release_dir):
        return f"{show_path(str(release_dir))} is missing"
    seen: set[bytes] = set()
    try:
        for found in walk(str(release_dir)):
            record = manifest.get(found.rel)
            if record is None:
                continue
            seen.add(found.rel)
            if record.kind != found.kind:
                return f"{show_path(found.rel)} was replaced by something of another kind"
            if found.kind == "L" and os.readlink(found.path).hex() != record.digest:
                return f"{show_path(found.rel)} points elsewhere"
            if found.kind == "F" and _hash_file(found.path) != record.digest:
                return f"{show_path(found.rel)} has changed content"
    except (WalkError, OSError) as exc:
        return f"cannot be read: {exc}"
    missing = sorted(set(manifest) - seen)
    if missing:
        extra = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"{show_path(missing[0])} is missing{extra}"
    return None


def _hash_file(path: bytes) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    digest = hashlib.sha256()
    try:
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _remove_tree(path: Path) -> None:
    """Remove a tree we made (``shutil.rmtree`` never follows links; on Linux it is fd-based)."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
            return
        # read-only copies in writable directories: rmtree unlinks them without chmod
        shutil.rmtree(path)


# -- where releases live ---------------------------------------------------------------------


def releases_root(configured: Path | None) -> tuple[Path, str | None]:
    """The private directory that holds every master's releases, and a warning if it is temporary.

    Args:
        configured: ``HOTPATCH_RELEASES_DIR`` / ``configure(releases_dir=...)``: used as given
            (created if missing below directories only this uid or root control), never replaced
            by another place.

    Raises:
        InsecurePath: the configured directory (or a parent) is not safe.
        OSError: it cannot be created.
    """
    if configured is not None:
        return trusted_private_dir(configured), None
    try:
        return private_dir(durable_dir(), "releases"), None
    except (OSError, InsecurePath) as exc:
        fallback = private_dir(runtime_dir(), "releases")
        return fallback, (
            f"releases are kept in {fallback} because the state directory cannot be used ({exc}); "
            "temp cleaners may remove them (hotpatch then detects it and stops starting workers "
            "on a damaged release); set HOTPATCH_RELEASES_DIR to a private directory"
        )


def process_stamp(pid: int) -> str | None:
    """``<boot id>-<start time>`` of a live process, ``None`` when there is no such process.

    Two processes with the same pid never share a stamp (the start time is in clock ticks since
    boot, the boot id changes at each boot). Without ``/proc``, the start time is ``0``.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        start = int(fields[19])
    except FileNotFoundError:
        return None
    except (OSError, IndexError, ValueError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        start = 0
    return f"{_boot_id()}-{start}"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip().replace("-", "")[:8] or "nobootid"
    except OSError:
        return "nobootid"


def master_releases_dir(root: Path, pid: int) -> Path:
    """Create this master's own releases directory ``gunicorn-<pid>-<stamp>`` under ``root``."""
    stamp = process_stamp(pid) or f"{_boot_id()}-0"
    return private_dir(root, f"gunicorn-{pid}-{stamp}")


def remove_stale(root: Path, *, keep: Path | None = None) -> list[str]:
    """Remove the releases of masters of this uid that are gone; returns the names removed.

    A master is gone when no process has its pid, or the process with that pid has another
    start time or boot id (the pid was reused). Only directories of this uid named as
    ``master_releases_dir`` names them are considered; anything else in ``root`` is left alone.
    """
    removed: list[str] = []
    for path, match in own_subdirs(root, _MASTER_DIR):
        if keep is not None and path == keep:
            continue
        pid, boot, start = int(match[1]), match[2], match[3]
        if process_stamp(pid) == f"{boot}-{start}":
            continue  # that master is alive
        with contextlib.suppress(OSError):
            _remove_tree(path)
            removed.append(path.name)
    return removed


def prune_releases(releases_dir: Path, keep: Iterable[str]) -> list[str]:
    """Delete every release directory not in ``keep``; returns the ids removed."""
    wanted = set(keep)
    removed: list[str] = []
    if not releases_dir.is_dir():
        return removed
    for entry in releases_dir.iterdir():
        if entry.name.startswith(("r", "d", ".staging-")) and entry.name not in wanted:
            with contextlib.suppress(OSError):
                _remove_tree(entry)
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
