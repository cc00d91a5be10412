"""The runtime directory: the one private place where hotpatch keeps sockets and state on disk.

hotpatch runs inside servers, often as root, on machines shared with other users. Anything it keeps
on disk (control sockets, a gunicorn master's state, worker reports) is trusted later: a request
file is executed, a state file decides which signal goes to which pid. So the directory that holds
them must be one that nobody else could have made, replaced or linked. A directory in a shared
``/tmp`` that already exists may belong to anyone: another user who creates ``/tmp/hotpatch-0``
before root's first start owns everything root later puts there.

The rule, applied by ``runtime_dir()`` and ``private_dir()`` and by nothing else in hotpatch:
create with ``mkdir`` one level at a time (never ``parents=True`` through directories we do not
own), then ``lstat`` and accept only a real directory (not a link) owned by this uid with no
permission bits for group or others. Never ``chmod`` a directory we did not just create: a
directory that fails the check is refused with an error that says what is wrong and how to fix it.
Files in it are opened with ``O_NOFOLLOW``, must be regular files owned by this uid, and are read
with a size cap (``read_private``); they are written by a temporary file and a rename
(``write_private``), so readers see the old content or the new, never a part.

Where: ``$HOTPATCH_RUNTIME_DIR`` when set (for systemd ``RuntimeDirectory=`` with
``RuntimeDirectoryMode=0700``, or a container volume; it must pass the check itself), else
``$XDG_RUNTIME_DIR/hotpatch`` when ``$XDG_RUNTIME_DIR`` is a private directory of this uid (a
``sudo`` that kept another user's value is not), else ``<tmp>/hotpatch-<uid>``.

What must outlive temp cleaners (gunicorn release snapshots: a worker respawned days later loads
from them) goes in ``durable_dir()`` instead: ``$XDG_STATE_HOME/hotpatch``, else
``~/.local/state/hotpatch``. Its ancestors are not ours to make private (``/home/me`` is often
0755), so ``trusted_private_dir`` applies a weaker rule to them: each must be owned by this uid or
root and not writable by group or others (a root-owned sticky directory such as ``/tmp`` is
accepted: nobody else can rename what is in it); a missing one is created 0700; the last component
must pass the full check above.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hotpatch.errors import InsecurePath

ENV_RUNTIME_DIR = "HOTPATCH_RUNTIME_DIR"
DEFAULT_MAX_READ_BYTES = 1 << 20


def _check_private_dir(path: Path, st: os.stat_result) -> None:
    uid = os.getuid()
    if stat.S_ISLNK(st.st_mode):
        raise InsecurePath(
            path, "is a symbolic link; hotpatch never follows a link it did not make"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise InsecurePath(path, "exists and is not a directory")
    if st.st_uid != uid:
        raise InsecurePath(
            path,
            f"is owned by uid {st.st_uid}, not by this process's uid {uid}; another user may have "
            "created it first: remove it (as its owner or root) or set HOTPATCH_RUNTIME_DIR",
        )
    if st.st_mode & (stat.S_ISVTX | stat.S_IWOTH):
        raise InsecurePath(
            path,
            f"has mode {stat.S_IMODE(st.st_mode):04o}: a shared directory; hotpatch needs a "
            "private one (0700) of this uid: name a directory inside it, never the shared one",
        )
    if st.st_mode & 0o077:
        raise InsecurePath(
            path,
            f"has mode {stat.S_IMODE(st.st_mode):04o}; it must be private to its owner (0700): "
            f"run `chmod 700 {path}` if you made it",
        )


def check_private_dir(path: str | os.PathLike[str]) -> Path:
    """Refuse ``path`` unless it is a real directory owned by this uid, mode 0700 or stricter.

    Raises:
        InsecurePath: it is a link, not a directory, someone else's, or open to others.
        FileNotFoundError: it does not exist.
    """
    path = Path(path)
    _check_private_dir(path, os.lstat(path))
    return path


def private_dir(parent: Path, name: str) -> Path:
    """Create (or accept) the private directory ``parent/name``; ``parent`` must be private already.

    ``name`` is one path component: no separator, not ``.`` or ``..``, no NUL.
    """
    if not name or name in {".", ".."} or "/" in name or "\0" in name:
        raise ValueError(f"not a single path component: {name!r}")
    path = parent / name
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    check_private_dir(path)
    return path


def _default_base() -> tuple[Path, str]:
    configured = os.environ.get(ENV_RUNTIME_DIR)
    if configured:
        if not os.path.isabs(configured):
            raise InsecurePath(Path(configured), f"{ENV_RUNTIME_DIR} must be an absolute path")
        return Path(configured), "configured"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        with contextlib.suppress(OSError, InsecurePath):
            check_private_dir(xdg)
            return Path(xdg) / "hotpatch", "xdg"
    return Path(tempfile.gettempdir()) / f"hotpatch-{os.getuid()}", "tmp"


def runtime_dir() -> Path:
    """The private runtime directory of this uid, created on first use (see the module docstring).

    Raises:
        InsecurePath: the directory exists but is not safe to use; nothing was changed.
    """
    path, kind = _default_base()
    if kind == "configured":
        return check_private_dir(path)
    return (
        private_dir(path.parent, path.name)
        if kind == "tmp"
        else private_dir(path.parent, "hotpatch")
    )


def _open_private_file(path: Path, flags: int) -> int:
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InsecurePath(path, "is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InsecurePath(path, "is not a regular file")
        if st.st_uid != os.getuid():
            raise InsecurePath(path, f"is owned by uid {st.st_uid}, not {os.getuid()}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_READ_BYTES) -> bytes:
    """The content of a regular file of this uid, never through a link, at most ``max_bytes``.

    A FIFO or a device in its place is refused without blocking.

    Raises:
        InsecurePath: a link, not a regular file, or someone else's file.
        ValueError: longer than ``max_bytes``.
        OSError: it cannot be opened or read (``FileNotFoundError`` when it is missing).
    """
    path = Path(path)
    fd = _open_private_file(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path}: larger than {max_bytes} bytes")
    return data


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (a new 0600 file renamed over it).

    The temporary file is created with ``O_EXCL | O_NOFOLLOW`` next to ``path``, so a link planted
    under its name makes the write fail instead of writing through it. ``path`` itself is replaced
    by the rename, never opened: a link there is replaced, not followed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_trusted_ancestor(path: Path, st: os.stat_result) -> None:
    uid = os.getuid()
    if st.st_uid not in (0, uid):
        raise InsecurePath(
            path, f"is owned by uid {st.st_uid}: only this uid ({uid}) or root may own its parents"
        )
    if stat.S_ISLNK(st.st_mode):
        return  # a link only its owner (us or root) can change; its target is checked too
    if not stat.S_ISDIR(st.st_mode):
        raise InsecurePath(path, "exists and is not a directory")
    is_shared_sticky = st.st_uid == 0 and st.st_mode & stat.S_ISVTX
    if st.st_mode & 0o022 and not is_shared_sticky:
        raise InsecurePath(
            path,
            f"has mode {stat.S_IMODE(st.st_mode):04o}: other users could replace what is in it",
        )


def trusted_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create (or accept) the private directory ``path`` below directories only we or root control.

    Missing ancestors are created one at a time (mode 0700); existing ones are checked, never
    changed (see the module docstring).

    Raises:
        InsecurePath: an ancestor or the directory itself fails its check.
        OSError: a directory cannot be created.
    """
    path = Path(os.path.abspath(path))
    if path == path.parent:
        raise InsecurePath(path, "the root directory cannot be a private directory")
    for ancestor in reversed(path.parents):
        with contextlib.suppress(FileExistsError):
            os.mkdir(ancestor, 0o700)
        _check_trusted_ancestor(ancestor, os.lstat(ancestor))
    real_parent = Path(os.path.realpath(path.parent))
    for ancestor in [*reversed(real_parent.parents), real_parent]:
        _check_trusted_ancestor(ancestor, os.lstat(ancestor))
    return private_dir(path.parent, path.name)


def durable_dir() -> Path:
    """hotpatch's private directory for what temp cleaners must not remove (see the docstring).

    ``$XDG_STATE_HOME/hotpatch`` when set to an absolute path, else ``<home>/.local/state/hotpatch``
    with ``<home>`` from ``$HOME`` (or this uid's password entry when ``$HOME`` is unset).

    Raises:
        InsecurePath: the directory or one of its ancestors is not safe (e.g. a ``$HOME`` that
            ``sudo`` kept from another user).
        OSError: it cannot be created (a read-only or missing home directory).
    """
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):
        return trusted_private_dir(Path(xdg) / "hotpatch")
    home = os.environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
    if not os.path.isabs(home):
        raise InsecurePath(Path(home), "the home directory is not an absolute path")
    if not os.path.isdir(home):  # a service user's /nonexistent: never create a home
        raise FileNotFoundError(errno.ENOENT, "the home directory does not exist", home)
    return trusted_private_dir(Path(home) / ".local" / "state" / "hotpatch")


def own_subdirs(parent: Path, pattern: re.Pattern[str]) -> Iterator[tuple[Path, re.Match[str]]]:
    """The real directories of this uid directly in ``parent`` whose whole name matches ``pattern``.

    For clean-ups of hotpatch's own leftovers: a link, a file, or anything of another uid under a
    matching name is never yielded. Entries that vanish while listed are skipped; an unlistable
    ``parent`` yields nothing.
    """
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return
    uid = os.getuid()
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        path = parent / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            yield path, match
