"""Files of ``hotpatch check``: file -> module, and reading/writing trees without following links.

Work-tree files are read, and the temporary tree written, one directory at a time through file
descriptors opened with ``O_NOFOLLOW``: no link is followed, whoever planted it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence

from hotpatch.check._report import MAX_FILE_BYTES


# -- file -> module -------------------------------------------------------------------------------
def import_roots(root: str) -> tuple[str, ...]:
    """Where modules are imported from, relative to the root: ``src/`` first in a src layout."""
    try:
        src = os.lstat(os.path.join(root, "src"))
    except OSError:
        return ("",)
    if stat.S_ISDIR(src.st_mode) and not os.path.lexists(os.path.join(root, "src", "__init__.py")):
        return ("src", "")
    return ("",)


def module_for(path: str, roots: Sequence[str]) -> tuple[str | None, str]:
    """The module name ``path`` (relative to the root, ``/``-separated) is imported as.

    Returns:
        ``(name, "")``, or ``(None, why not)``.
    """
    if not path.endswith(".py"):
        return None, "not a Python file"
    for prefix in roots:
        if prefix and not path.startswith(prefix + "/"):
            continue
        parts = path[len(prefix) + 1 if prefix else 0 : -3].split("/")
        if parts[-1] == "__main__":
            return None, "a program's entry point (__main__), not an imported module"
        if parts[-1] == "__init__":
            parts.pop()
        if not parts or not all(p.isidentifier() for p in parts):
            return None, "not importable as a module (a part of its path is not an identifier)"
        return ".".join(parts), ""
    return None, "not under an import root"


# -- reading and writing files without following links --------------------------------------------
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def _parent_fd(top: str, raw: bytes, *, create: bool) -> Iterator[tuple[int, bytes]]:
    """The directory fd holding ``raw`` (relative to ``top``), walked without following a link.

    With ``create``, missing directories are made, and anything but a directory in the way (in
    our own temporary tree only) is removed first.
    """
    parts = raw.split(b"/")
    if any(p in (b"", b".", b"..") for p in parts):
        raise OSError(errno.EINVAL, f"unexpected path {raw!r}")
    fd = os.open(top, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if not create or exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                if exc.errno != errno.ENOENT:
                    os.unlink(part, dir_fd=fd)
                os.mkdir(part, 0o700, dir_fd=fd)
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        yield fd, parts[-1]
    finally:
        os.close(fd)


def read_work_file(root: str, raw: bytes) -> bytes:
    """A regular file of the work tree, never through a link, at most ``MAX_FILE_BYTES``."""
    with _parent_fd(root, raw, create=False) as (dir_fd, name):
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            data = fh.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_FILE_BYTES} bytes")
    return data


def _write_tree_file(top: str, raw: bytes, data: bytes | None) -> None:
    """Put ``data`` at ``raw`` in our temporary tree (``None``: remove it); links are replaced."""
    with _parent_fd(top, raw, create=data is not None) as (dir_fd, name):
        if data is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
            return
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(name, dir_fd=dir_fd)  # whatever was there (a link from the base) goes
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
