"""What a release contains: the snapshot rule and the one tree walk that applies it.

A release must hold what the app imports and needs at run time: its packages and modules, and the
files it opens next to them (templates, static assets such as a Flask ``static_folder="dist"``,
data). It must not hold what only happens to sit in the working directory: version control,
virtual environments, tool caches, byte code, editor swap files, and what the server itself keeps
writing there (``gunicorn.log``, a pid file): a log file in the release makes every snapshot look
"changed" and makes watch mode roll out on every request.

The rule (``SnapshotRule``, pure, unit-tested): everything under the app directory except
directories named in ``IGNORED_DIRS``, ``*.egg-info``, virtual environments (a directory holding
``pyvenv.cfg``), files matching ``IGNORED_FILE_PATTERNS`` (byte code, logs, pid files, editor
swap and backup files), anything that is not a regular file, directory or symbolic link (sockets,
FIFOs, devices), and the user's own ``snapshot_exclude`` patterns (gitignore-like: ``name`` or
``*.sqlite3`` matches a name at any depth, ``data/cache`` or ``/uploads`` a path from the app
directory, a trailing ``/`` only directories). ``build/`` and ``dist/`` are kept: apps serve
assets from them. ``.gitignore`` is deliberately not read: it lists build output (``dist/``) that
apps serve.

``walk`` applies the rule, iteratively (a tree 1,100 directories deep costs no stack; deeper than
``MAX_DEPTH`` is refused with a clear error), with names kept as bytes (a file name that is not
valid UTF-8 is an ordinary file here, shown with ``show_path``), symbolic links reported, never
followed. The snapshot (``_releases``) and the watch-mode scan (``_watch``) both walk with it, so
what triggers a rollout is exactly what a release would contain.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

IGNORED_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".bzr",
        "__pycache__",
        ".venv",
        "venv",
        ".tox",
        ".nox",
        ".eggs",
        "node_modules",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".ipynb_checkpoints",
        ".idea",
        ".vscode",
        ".cache",
    }
)
"""Directory names never part of a release, at any depth."""

IGNORED_FILE_PATTERNS = (
    "*.pyc",
    "*.pyo",
    "*.log",
    "*.log.[0-9]*",
    "*.pid",
    "nohup.out",
    ".coverage",
    ".coverage.*",
    "*.swp",
    "*.swo",
    "*.swx",
    "*~",
    ".#*",
    "#*#",
    "4913",
    "*.tmp",
    "*.bak",
    "*.orig",
    ".DS_Store",
)
"""File name patterns never part of a release: byte code, what servers write next to the app
(logs, rotated logs, pid files), editor swap, backup and probe files."""

MAX_DEPTH = 128
"""A tree nested deeper than this is refused (no Python app needs it; a runaway tree does)."""

VENV_MARKER = b"pyvenv.cfg"


class WalkError(Exception):
    """The tree cannot be walked completely (an unreadable directory, a too-deep tree).

    Attributes:
        path: the path at fault (bytes, as on disk).
        message: what is wrong with it.
    """

    def __init__(self, path: bytes, message: str) -> None:
        super().__init__(f"{show_path(path)}: {message}")
        self.path = path
        self.message = message


def show_path(path: bytes | str) -> str:
    """A path for messages: text when it decodes as UTF-8, else its ``repr`` (never raises)."""
    if isinstance(path, str):
        path = os.fsencode(path)
    try:
        return path.decode("utf-8")
    except UnicodeDecodeError:
        return repr(path)[2:-1]  # b'...' -> ..., with \xNN escapes for the undecodable bytes


@dataclass(frozen=True)
class Pattern:
    """One ``snapshot_exclude`` pattern, gitignore-like (see the module docstring)."""

    glob: bytes
    is_anchored: bool
    is_dir_only: bool

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """Parse ``text``; raises ``ValueError`` for an empty pattern."""
        raw = text.strip()
        is_dir_only = raw.endswith("/")
        raw = raw.rstrip("/")
        is_anchored = "/" in raw
        raw = raw.lstrip("/")
        if not raw:
            raise ValueError(f"empty exclude pattern: {text!r}")
        return cls(os.fsencode(raw), is_anchored, is_dir_only)

    def matches(self, rel: bytes, name: bytes, *, is_dir: bool) -> bool:
        if self.is_dir_only and not is_dir:
            return False
        return fnmatch.fnmatchcase(rel if self.is_anchored else name, self.glob)


def _compile(globs: Iterable[str | bytes]) -> re.Pattern[bytes] | None:
    """One regular expression matching any of ``globs`` (one match per name, not one per glob)."""
    parts = [fnmatch.translate(os.fsdecode(g)) for g in globs]
    return re.compile(os.fsencode("|".join(parts))) if parts else None


_IGNORED_DIRS_B = frozenset(os.fsencode(n) for n in IGNORED_DIRS)
_IGNORED_FILES_RE = _compile(IGNORED_FILE_PATTERNS)


@dataclass(frozen=True)
class SnapshotRule:
    """Which entries of the app directory belong to a release. Pure: asks the disk nothing.

    Args:
        exclude: the user's patterns (``snapshot_exclude``).
        exclude_paths: absolute paths never included (hotpatch's own state and releases when they
            are inside the app directory), compared with the walk's own spelling of each path.
    """

    exclude: tuple[Pattern, ...] = ()
    exclude_paths: frozenset[bytes] = field(default_factory=frozenset)

    @classmethod
    def build(
        cls, patterns: Iterable[str] = (), exclude_paths: Iterable[str | bytes] = ()
    ) -> SnapshotRule:
        return cls(
            tuple(Pattern.parse(p) for p in patterns),
            frozenset(os.fsencode(os.path.abspath(p)) for p in exclude_paths),
        )

    def includes(self, rel: bytes, *, is_dir: bool, full_path: bytes = b"") -> bool:
        """Whether the entry at ``rel`` (``/``-separated, relative to the app directory) belongs.

        Args:
            rel: the relative path.
            is_dir: it is a directory (not a link to one).
            full_path: its absolute path, checked against ``exclude_paths``.
        """
        name = rel.rsplit(b"/", 1)[-1]
        if full_path and full_path in self.exclude_paths:
            return False
        if is_dir:
            if name in _IGNORED_DIRS_B or name.endswith(b".egg-info"):
                return False
        elif _IGNORED_FILES_RE is not None and _IGNORED_FILES_RE.match(name):
            return False
        return not any(p.matches(rel, name, is_dir=is_dir) for p in self.exclude)


BUILTIN_RULE = SnapshotRule()


@dataclass(frozen=True)
class Found:
    """One entry the walk yields.

    Attributes:
        rel: path relative to the root, ``/``-separated, bytes.
        path: the absolute path (bytes).
        kind: ``"F"`` regular file, ``"L"`` symbolic link (never followed), ``"D"`` directory.
        st: its ``lstat`` (``None`` for a directory: not needed, not asked).
    """

    rel: bytes
    path: bytes
    kind: str
    st: os.stat_result | None


OnError = Callable[[bytes, OSError], None]


def raise_error(path: bytes, exc: OSError) -> None:
    """The snapshot's error policy: an unreadable entry fails the walk (never a partial copy)."""
    reason = exc.strerror or str(exc)
    raise WalkError(path, f"cannot list or examine it: {reason}") from exc


def walk(
    root: str | bytes,
    rule: SnapshotRule = BUILTIN_RULE,
    *,
    on_error: OnError = raise_error,
    max_depth: int = MAX_DEPTH,
) -> Iterator[Found]:
    """Every entry under ``root`` that ``rule`` includes, parents before children.

    Iterative; names stay bytes. An entry that vanishes while it is walked is left out (it is not
    on disk any more). A directory that holds ``pyvenv.cfg`` (a virtual environment) is left out
    with its content.

    Args:
        root: the directory to walk (followed if it is itself a link, e.g. ``current``).
        rule: what to include.
        on_error: called with the path and the error when a directory cannot be listed or an
            entry cannot be examined; the default raises ``WalkError``. When it returns, the entry
            is left out.
        max_depth: directories nested deeper than this raise ``WalkError`` (whatever
            ``on_error`` does).

    Raises:
        WalkError: see ``on_error`` and ``max_depth``.
    """
    top = os.fsencode(root)
    stack: list[tuple[bytes, bytes, int]] = [(top, b"", 0)]
    while stack:
        directory, prefix, depth = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            on_error(directory, exc)
            continue
        subdirs: list[tuple[bytes, bytes, int]] = []
        for entry in entries:
            rel = prefix + entry.name
            st = None
            try:  # the type comes from the directory listing; only files and links are stat'ed
                if entry.is_symlink():
                    kind = "L"
                elif entry.is_dir(follow_symlinks=False):
                    kind = "D"
                elif entry.is_file(follow_symlinks=False):
                    kind = "F"
                else:
                    continue  # sockets, FIFOs, devices: never code, never opened
                if not rule.includes(rel, is_dir=kind == "D", full_path=entry.path):
                    continue
                if kind != "D":
                    st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                on_error(entry.path, exc)
                continue
            if kind == "D":
                if os.path.lexists(os.path.join(entry.path, VENV_MARKER)):
                    continue
                if depth + 1 > max_depth:
                    raise WalkError(
                        entry.path,
                        f"nested more than {max_depth} directories deep; exclude it "
                        "(HOTPATCH_SNAPSHOT_EXCLUDE) or point HOTPATCH_APP_DIR at the app's code",
                    )
                subdirs.append((entry.path, rel + b"/", depth + 1))
            yield Found(rel, entry.path, kind, st)
        stack.extend(reversed(subdirs))
