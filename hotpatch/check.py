"""``hotpatch check``: is a git diff hot-patchable? Decided without a server, by the engine itself.

A CI job wants to know, for a pull request, whether its change can ship as an in-place hot patch or
needs a rolling reload, before any server sees it. The only trustworthy answer is the engine's own:
a second rule set written for CI would drift from what ``Engine.patch_many`` accepts, and the
verdict would be a guess. And the engine judges a new version against a *live* module, so the old
version must really run somewhere: there is no process running the base, and the checker's own
process must not import project code (it may hang, exit, or never import at all).

So the base version is materialized into a private temporary directory (``git read-tree`` into a
temporary index, then ``git checkout-index --prefix``: the repository's index and work tree are
never touched), and a subprocess started for the purpose imports the changed modules from there
(with a deadline over the whole run), records them as the engine's baselines (``Engine.track``),
and reports each step on a pipe of its own (project code may print anything on its standard
output). Then the temporary tree is brought to the work tree's content, file by file, as a deploy
writes new files under a running server, and the subprocess runs ``Engine.patch_many`` on the
changed modules, exactly what ``hotpatch patch`` runs in a live process: dependency order, one
change set, all or nothing, post-commit checks included (committing is harmless there: the process
is thrown away). Each module gets a verdict: ``hot-patchable``, ``needs-reload`` (the engine refused
at ``compatibility`` or ``safepoint``: a removed public name, a changed class layout, derived state
it cannot redo), ``refused`` (the new code itself fails: ``load``, ``compile``, ``execute``,
``verify``, ``health``) or ``unknown`` (the base does not import, the deadline passed, the
subprocess died, or the module imports one that was refused). All or nothing means one refusal
names one module: so the refused module is set aside with the modules that import it (directly or
through the change; they cannot be guarded without it: ``unknown``), and the rest is guarded again,
until a set is accepted or nothing is left; a verdict reached that way says what was set aside.
New modules are imported after the patch (``new`` when they import, else ``refused``); a deleted
module ``needs-reload`` (a running process keeps it loaded; only a restart drops it).

Importing runs project code: ``hotpatch check`` gives the repository the same trust as running
its test suite. Nothing else from outside is trusted: the ref is resolved with ``git rev-parse
--verify --end-of-options`` (a ref spelled like an option stays a ref), path arguments are literal
pathspecs, file names stay bytes until decoded with ``os.fsdecode``, work-tree files are read and
the temporary tree written one directory at a time through file descriptors with ``O_NOFOLLOW``
(no link is followed), and only the process group this module started is ever signalled.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from hotpatch._log import get_logger
from hotpatch.engine.arguments import check_seconds
from hotpatch.errors import HotpatchError

log = get_logger(__name__)

Verdict = Literal["hot-patchable", "needs-reload", "refused", "unknown", "new"]
Change = Literal["modified", "new", "deleted"]

#: Verdicts that let ``hotpatch check`` exit 0.
FINE: frozenset[str] = frozenset({"hot-patchable", "new"})
#: Engine stages whose refusal means "a rolling reload can carry this; an in-place patch cannot".
RELOAD_STAGES: frozenset[str] = frozenset({"compatibility", "safepoint"})
_PHRASES = {"needs-reload": "needs a rolling reload", "refused": "was refused"}

DEFAULT_TIMEOUT_S = 120.0
MAX_FILE_BYTES = 64 * 1024 * 1024  # one changed file copied into the temporary tree
MAX_OVERLAY_BYTES = 512 * 1024 * 1024  # all of them
MAX_EVENTS_BYTES = 16 * 1024 * 1024  # everything the subprocess may report
MAX_REASON_CHARS = 2000
_GIT_TIMEOUT_S = 120.0
ORPHAN_MARGIN_S = 10.0  # the subprocess ends itself this long after the deadline (parent gone)
_CHILD_BOOT = (
    "import sys; sys.path[:] = [p for p in sys.path if p]; "
    "from hotpatch.check import _child_main; _child_main()"
)


class CheckError(HotpatchError):
    """``hotpatch check`` could not run: not a git work tree, unknown ref, git missing (exit 2)."""


@dataclass(frozen=True)
class ModuleVerdict:
    """The verdict on one changed Python module.

    Attributes:
        path: the file, relative to the repository root (``os.fsdecode`` of git's bytes).
        module: the module name it is imported as.
        change: ``modified``, ``new`` or ``deleted``.
        verdict: ``hot-patchable``, ``needs-reload``, ``refused``, ``unknown`` or ``new``.
        stage: where it was decided: an engine stage (``load`` ... ``health``), ``base`` (importing
            the base version), ``deleted``, ``deadline`` or ``process``; ``None`` when accepted.
        reason: why, in one line.
        filename: the file the reason points at (relative to the root when it is in the tree).
        lineno: the line in ``filename``, when there is one.
    """

    path: str
    module: str
    change: Change
    verdict: Verdict
    stage: str | None = None
    reason: str = ""
    filename: str | None = None
    lineno: int | None = None
    changed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    derived: tuple[str, ...] = ()
    renamed_from: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "module": self.module,
            "change": self.change,
            "verdict": self.verdict,
            "stage": self.stage,
            "reason": self.reason,
            "filename": self.filename,
            "lineno": self.lineno,
            "changed": list(self.changed),
            "added": list(self.added),
            "removed": list(self.removed),
            "derived": list(self.derived),
            "renamed_from": self.renamed_from,
        }


@dataclass(frozen=True)
class Skipped:
    """A changed file that is not checked (not Python, not importable as a module, a link)."""

    path: str
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class CheckReport:
    """What ``check`` found: one verdict per changed module, and the files it did not check."""

    base: str
    commit: str
    root: str
    modules: tuple[ModuleVerdict, ...]
    skipped: tuple[Skipped, ...] = ()

    @property
    def verdict(self) -> str:
        """``unchanged``, ``hot-patchable``, or the worst module verdict."""
        if not self.modules:
            return "unchanged"
        verdicts = {m.verdict for m in self.modules}
        for worst in ("refused", "needs-reload", "unknown"):
            if worst in verdicts:
                return worst
        return "hot-patchable"

    @property
    def exit_code(self) -> int:
        """0 when every changed module is hot-patchable (or new, or nothing changed), else 1."""
        return 0 if all(m.verdict in FINE for m in self.modules) else 1

    def to_json(self) -> dict[str, object]:
        return {
            "base": self.base,
            "commit": self.commit,
            "root": self.root,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "modules": [m.to_json() for m in self.modules],
            "skipped": [s.to_json() for s in self.skipped],
        }


# -- git ------------------------------------------------------------------------------------------
def _git(args: Sequence[str], *, cwd: str, env: dict[str, str] | None = None, what: str) -> bytes:
    """Run git (literal pathspecs, no pager, no optional locks); its stdout, or ``CheckError``."""
    full_env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0", **(env or {})}
    command = ["git", "--no-pager", "--literal-pathspecs", *args]
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        raise CheckError("git is not installed (or not on PATH); hotpatch check needs it") from None
    except subprocess.TimeoutExpired:
        raise CheckError(f"git did not finish {what} in {_GIT_TIMEOUT_S:.0f} s") from None
    except OSError as exc:
        raise CheckError(f"cannot run git ({what}): {exc}") from None
    if done.returncode != 0:
        message = os.fsdecode(done.stderr).strip().splitlines()
        raise CheckError(f"{what}: {message[-1] if message else f'git exited {done.returncode}'}")
    return done.stdout


def resolve_base(cwd: str, ref: str) -> tuple[str, str]:
    """The repository root and the commit ``ref`` names.

    Raises:
        CheckError: ``cwd`` is not in a git work tree, ``ref`` names no commit, git is missing.
    """
    if not isinstance(ref, str) or not ref or "\0" in ref:
        raise CheckError(f"--base must name a commit, not {ref!r}")
    top = _git(["rev-parse", "--show-toplevel"], cwd=cwd, what="finding the git work tree")
    root = os.fsdecode(top.rstrip(b"\n"))
    if not root:
        raise CheckError(f"{cwd}: not inside a git work tree")
    try:
        out = _git(
            ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"],
            cwd=root,
            what=f"resolving --base {ref!r}",
        )
    except CheckError:
        raise CheckError(f"--base {ref!r} names no commit in {root}") from None
    commit = out.decode("ascii", "replace").strip()
    if not commit or any(c not in "0123456789abcdef" for c in commit):
        raise CheckError(f"--base {ref!r} names no commit in {root}")
    return root, commit


@dataclass(frozen=True)
class FileChange:
    """One changed path (bytes as git gave them; ``path`` is their ``os.fsdecode``)."""

    raw: bytes
    change: Change
    renamed_from: bytes | None = None

    @property
    def path(self) -> str:
        return os.fsdecode(self.raw)


def changed_files(root: str, commit: str, paths: Sequence[str], *, cwd: str) -> list[FileChange]:
    """Paths changed between ``commit`` and the work tree (staged, unstaged, untracked).

    Args:
        root: the repository root.
        commit: the base commit (a full hash).
        paths: limit to these (relative to ``cwd``, taken literally); empty: the whole tree.
        cwd: where ``paths`` are relative to.
    """
    where = cwd if paths else root
    spec = ["--", *paths]
    diff = _git(
        ["diff", "--name-status", "-z", "-M", "--no-relative", "--no-ext-diff", commit, *spec],
        cwd=where,
        what="listing changed files (git diff)",
    )
    changes: list[FileChange] = []
    fields = diff.split(b"\0")
    i = 0
    while i < len(fields) and fields[i]:
        status = fields[i][:1]
        if status in (b"R", b"C"):
            old, new = fields[i + 1], fields[i + 2]
            i += 3
            if status == b"R":
                changes.append(FileChange(old, "deleted"))
            changes.append(FileChange(new, "new", renamed_from=old if status == b"R" else None))
            continue
        name = fields[i + 1]
        i += 2
        if status == b"D":
            changes.append(FileChange(name, "deleted"))
        elif status == b"A":
            changes.append(FileChange(name, "new"))
        else:  # M, T (type), U (unmerged): the work tree holds a different version
            changes.append(FileChange(name, "modified"))
    untracked = _git(
        ["ls-files", "-z", "--others", "--exclude-standard", "--full-name", *spec],
        cwd=where,
        what="listing untracked files (git ls-files)",
    )
    changes += [FileChange(name, "new") for name in untracked.split(b"\0") if name]
    return changes


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


# -- the check ------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What the subprocess is asked to do, and what the parent already knows."""

    guard: dict[str, FileChange] = field(default_factory=dict)  # module -> file (modified)
    new: dict[str, FileChange] = field(default_factory=dict)  # module -> file (new)
    verdicts: list[ModuleVerdict] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    overlay: list[tuple[bytes, bytes | None]] = field(default_factory=list)  # path, new content


def check(
    *,
    base: str = "HEAD",
    paths: Sequence[str] = (),
    cwd: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> CheckReport:
    """Classify every Python module changed between ``base`` and the work tree.

    Args:
        base: a git ref naming the version running servers have (default ``HEAD``).
        paths: limit the check to these files or directories (relative to ``cwd``).
        cwd: a directory inside the work tree (default: the current directory).
        timeout_s: deadline for the whole subprocess (importing the base, the guard); when it
            passes, what was not decided is ``unknown``.

    Returns:
        The report; ``report.exit_code`` is 0 when everything is hot-patchable.

    Raises:
        CheckError: not a git work tree, unknown ref, git missing, the base cannot be written.
        ConfigError: ``timeout_s`` is not a positive number of seconds.
        TypeError: ``paths`` is a single string instead of a sequence of them.
    """
    timeout_s = check_seconds("timeout_s", timeout_s, allow_zero=False)
    if isinstance(paths, str | bytes) or not all(isinstance(p, str) for p in paths):
        raise TypeError("check(paths) takes a sequence of path strings")
    cwd = os.path.abspath(cwd or os.getcwd())
    root, commit = resolve_base(cwd, base)
    roots = import_roots(root)
    _check_paths(root, commit, paths, cwd=cwd)
    everything = changed_files(root, commit, (), cwd=cwd)  # the files a deploy would write
    selected = changed_files(root, commit, paths, cwd=cwd) if paths else everything
    plan = _plan(root, roots, selected, everything)
    clog = log.bind(base=base, commit=commit[:12])
    clog.info(
        "check.started",
        modified=sorted(plan.guard),
        new=sorted(plan.new),
        skipped=len(plan.skipped),
    )
    if plan.guard or plan.new:
        plan.verdicts += _run_subprocess(root, commit, roots, plan, timeout_s=timeout_s)
    report = CheckReport(
        base,
        commit,
        root,
        tuple(sorted(plan.verdicts, key=lambda m: (m.path, m.change))),
        tuple(sorted(plan.skipped, key=lambda s: s.path)),
    )
    clog.info("check.completed", verdict=report.verdict, modules=len(report.modules))
    return report


def _check_paths(root: str, commit: str, paths: Sequence[str], *, cwd: str) -> None:
    """Every PATH names something in the work tree or the base: a typo must not read as a pass."""
    for path in paths:
        full = os.path.normpath(os.path.join(cwd, path))
        if os.path.lexists(full):
            continue
        relative = os.path.relpath(full, root)
        if relative != ".." and not relative.startswith(".." + os.sep):
            try:
                _git(["cat-file", "-e", f"{commit}:{relative}"], cwd=root, what="")
                continue
            except CheckError:
                pass
        raise CheckError(f"{path}: no such file or directory in the work tree or in the base")


def _plan(
    root: str,
    roots: Sequence[str],
    selected: Iterable[FileChange],
    everything: Iterable[FileChange],
) -> _Plan:
    """Which modules to guard; the overlay holds every changed file, selected by PATH or not."""
    plan = _Plan()
    unreadable: dict[bytes, str] = {}
    total = 0
    for ch in everything:
        if ch.change == "deleted":
            plan.overlay.append((ch.raw, None))
            continue
        try:
            data = read_work_file(root, ch.raw)
            total += len(data)
            if total > MAX_OVERLAY_BYTES:
                raise OSError(errno.EFBIG, f"the changed files exceed {MAX_OVERLAY_BYTES} bytes")
            plan.overlay.append((ch.raw, data))
        except OSError as exc:
            why = "a symbolic link" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
            unreadable[ch.raw] = f"not checked: cannot read it safely ({why})"
    taken: dict[str, str] = {}
    for ch in selected:
        if ch.change != "deleted" and ch.raw in unreadable:
            plan.skipped.append(Skipped(ch.path, unreadable[ch.raw]))
            continue
        name, why = module_for(ch.path, roots)
        if name is None:
            plan.skipped.append(Skipped(ch.path, why))
            continue
        if name in taken and taken[name] != ch.path and ch.change != "deleted":
            plan.skipped.append(Skipped(ch.path, f"module {name} is {taken[name]}, found first"))
            continue
        if ch.change == "deleted":
            plan.verdicts.append(
                ModuleVerdict(
                    ch.path,
                    name,
                    "deleted",
                    "needs-reload",
                    "deleted",
                    "the module was deleted: a running process keeps it loaded (a hot patch "
                    "cannot unload it); only a restart drops it",
                )
            )
            continue
        taken[name] = ch.path
        if ch.change == "new":
            plan.new[name] = ch
        else:
            plan.guard[name] = ch
    return plan


def _run_subprocess(
    root: str, commit: str, roots: Sequence[str], plan: _Plan, *, timeout_s: float
) -> list[ModuleVerdict]:
    deadline = time.monotonic() + timeout_s
    tmp = tempfile.mkdtemp(prefix="hotpatch-check-")
    try:
        tree = os.path.join(tmp, "base")
        os.mkdir(tree, 0o700)
        _git(
            ["read-tree", commit],
            cwd=root,
            env={"GIT_INDEX_FILE": os.path.join(tmp, "index")},
            what="reading the base tree (git read-tree)",
        )
        _git(
            ["checkout-index", "--all", "--force", f"--prefix={tree}/"],
            cwd=root,
            env={"GIT_INDEX_FILE": os.path.join(tmp, "index")},
            what="writing the base tree (git checkout-index)",
        )
        with open(os.path.join(tmp, "output.log"), "w+b") as output:
            run = _ChildRun(tree, roots, plan, output, deadline=deadline, timeout_s=timeout_s)
            return run.verdicts()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.lexists(tmp):
            log.warning("check.cleanup_failed", path=tmp)


class _ChildRun:
    """One subprocess: base imports, the overlay, the guard; its reports read with a deadline."""

    def __init__(
        self,
        tree: str,
        roots: Sequence[str],
        plan: _Plan,
        output: IO[bytes],
        *,
        deadline: float,
        timeout_s: float,
    ) -> None:
        self.tree = tree
        self.plan = plan
        self.output = output
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.roots = [os.path.join(tree, r) if r else tree for r in roots]
        self.decided: dict[str, ModuleVerdict] = {}
        self.doing = "starting the check process"
        self.doing_modules: list[str] = []
        self.excluded: list[tuple[str, Verdict]] = []  # set aside after a refusal, in order

    # -- results ---------------------------------------------------------------------------------
    def _file(self, name: str) -> FileChange:
        return self.plan.guard.get(name) or self.plan.new[name]

    def _decide(
        self, name: str, verdict: Verdict, stage: str | None, reason: str, **kw: Any
    ) -> None:
        if name in self.decided or (name not in self.plan.guard and name not in self.plan.new):
            return
        ch = self._file(name)
        filename = kw.pop("filename", None)
        self.decided[name] = ModuleVerdict(
            ch.path,
            name,
            ch.change,
            verdict,
            stage,
            self._relative(reason),
            filename=self._relative(filename) if filename else None,
            renamed_from=os.fsdecode(ch.renamed_from) if ch.renamed_from else None,
            **kw,
        )

    def _relative(self, text: str) -> str:
        """Temporary-tree paths in a message, shown relative to the repository root."""
        text = text.replace(self.tree + os.sep, "").replace(self.tree, ".")
        return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."

    # -- the run ---------------------------------------------------------------------------------
    def verdicts(self) -> list[ModuleVerdict]:
        events_r, events_w = os.pipe()
        control_r, control_w = os.pipe()
        proc: subprocess.Popen[bytes] | None = None
        try:
            env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_BOOT, str(events_w), str(control_r)],
                cwd=self.tree,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self.output,
                stderr=subprocess.STDOUT,
                pass_fds=(events_w, control_r),
                start_new_session=True,
            )
            os.close(events_w)
            os.close(control_r)
            events_w = control_r = -1
            job: dict[str, object] = {
                "roots": self.roots,
                "tree": self.tree,
                "guard": list(self.plan.guard),
                "new": list(self.plan.new),
                "exit_after_s": self.timeout_s + ORPHAN_MARGIN_S,  # orphaned: it ends anyway
            }
            with contextlib.suppress(BrokenPipeError):  # it died: its exit says why, below
                os.write(control_w, json.dumps(job).encode() + b"\n")
            self._read_events(proc, events_r, control_w)
        finally:
            for fd in (events_r, events_w, control_r, control_w):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            if proc is not None:
                _stop(proc)
        return [self.decided[n] for n in [*self.plan.guard, *self.plan.new] if n in self.decided]

    def _read_events(self, proc: subprocess.Popen[bytes], events_r: int, control_w: int) -> None:
        buffer = b""
        total = 0
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self._undecided(
                    "deadline",
                    f"still running after {self.timeout_s:g} s while {self.doing} "
                    "(the check process was stopped)",
                    "not reached before the deadline",
                )
                return
            ready, _, _ = select.select([events_r], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(events_r, 65536)
            total += len(chunk)
            if not chunk or total > MAX_EVENTS_BYTES:
                self._died(proc, "closed its report pipe" if chunk == b"" else "reported too much")
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    event = json.loads(line)
                    if not isinstance(event, dict):
                        raise TypeError(type(event).__name__)
                    if self._on_event(event, control_w):
                        return
                except (ValueError, TypeError, KeyError, AttributeError):
                    self._died(proc, "sent a malformed report")
                    return

    def _on_event(self, event: dict[str, Any], control_w: int) -> bool:
        """Handle one report of the subprocess; True when it is done."""
        kind = event.get("event")
        name = str(event.get("module", ""))
        if kind == "importing":
            self.doing, self.doing_modules = f"importing the base version of {name}", [name]
        elif kind == "base_failed":
            self._decide(
                name,
                "unknown",
                "base",
                f"the base version does not import: {event.get('error')}",
                filename=event.get("filename"),
                lineno=event.get("lineno"),
            )
        elif kind == "based":
            self.doing, self.doing_modules = "writing the work tree's files", []
            for raw, data in self.plan.overlay:
                try:
                    _write_tree_file(self.tree, raw, data)
                except OSError as exc:
                    raise CheckError(
                        f"cannot write {os.fsdecode(raw)!r} into the temporary tree: {exc}"
                    ) from None
            with contextlib.suppress(BrokenPipeError):  # it died: the report pipe says so next
                os.write(control_w, b"go\n")
        elif kind == "guarding":
            mods = [str(m) for m in event.get("modules", [])]
            self.doing, self.doing_modules = f"guarding {', '.join(mods)}", mods
        elif kind == "guarded":
            for r in event.get("results", []):
                changed = tuple(r.get("changed", ()))
                what = "no change to its code" if not changed else f"changed {', '.join(changed)}"
                if self.excluded:
                    what += f"; hot-patchable on its own{self._without()}"
                self._decide(
                    str(r["module"]),
                    "hot-patchable",
                    None,
                    what,
                    changed=changed,
                    added=tuple(r.get("added", ())),
                    removed=tuple(r.get("removed", ())),
                    derived=tuple(r.get("derived", ())),
                )
        elif kind == "rejected":
            self._rejected(event)
        elif kind == "blocked":
            by = str(event.get("by"))
            phrase = next((_PHRASES[v] for m, v in self.excluded if m == by), "was refused")
            for m in [str(n) for n in event.get("modules", [])]:
                self._decide(
                    m,
                    "unknown",
                    "guard",
                    f"not decided: it imports {by} (directly or through other changed "
                    f"modules), which {phrase}: it cannot be guarded without it",
                )
        elif kind == "guard_error":
            for m in self.doing_modules:
                self._decide(m, "unknown", "process", f"the guard failed: {event.get('error')}")
        elif kind == "importing_new":
            self.doing, self.doing_modules = f"importing the new module {name}", [name]
        elif kind == "new_imported":
            self._decide(name, "new", None, "a new module: it imports; nothing live to patch")
        elif kind == "new_failed":
            stage = "compile" if event.get("syntax") else "execute"
            self._decide(
                name,
                "refused",
                stage,
                f"the new module does not import: {event.get('error')}",
                filename=event.get("filename"),
                lineno=event.get("lineno"),
            )
        elif kind == "done":
            self._undecided("process", "", "the check process ended without a verdict for it")
            return True
        return False

    def _rejected(self, event: dict[str, Any]) -> None:
        stage = str(event.get("stage"))
        verdict: Verdict = "needs-reload" if stage in RELOAD_STAGES else "refused"
        name = str(event.get("module"))
        reason = str(event.get("reason")) + self._without()
        where = {"filename": event.get("filename"), "lineno": event.get("lineno")}
        if name in self.doing_modules:
            self._decide(name, verdict, stage, reason, **where)
            self.excluded.append((name, verdict))
        else:  # a live module the engine re-derived refused: it speaks for the whole set
            for m in self.doing_modules:
                self._decide(m, verdict, stage, f"in dependent module {name}: {reason}", **where)

    def _without(self) -> str:
        """The note on a verdict reached after other modules were set aside."""
        if not self.excluded:
            return ""
        names = ", ".join(f"{m} ({_PHRASES[v]})" for m, v in self.excluded)
        return f" (guarded without {names})"

    def _undecided(self, stage: str, current: str, others: str) -> None:
        for m in self.doing_modules:
            self._decide(m, "unknown", stage, current or others)
        for m in [*self.plan.guard, *self.plan.new]:
            self._decide(m, "unknown", stage, others)

    def _died(self, proc: subprocess.Popen[bytes], what: str) -> None:
        code = _exit_status(proc, timeout_s=max(0.1, min(5.0, self.deadline - time.monotonic())))
        self.output.flush()
        self.output.seek(0, os.SEEK_END)
        size = self.output.tell()
        self.output.seek(max(0, size - 600))
        tail = self.output.read().decode("utf-8", "replace").strip().splitlines()
        last = f": {tail[-1]}" if tail else ""
        status = "is still running" if code is None else f"exited with code {code}"
        self._undecided(
            "process",
            f"the check process {what} and {status} while {self.doing}{last}",
            f"the check process {what} before deciding it",
        )


def _exit_status(proc: subprocess.Popen[bytes], *, timeout_s: float) -> int | None:
    """The child's exit code (negative: killed by that signal), without reaping it; None: running.

    Not reaping keeps its pid, and so its process group id, from being reused before ``_stop``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            return proc.returncode
        if info is not None:
            exited = info.si_code == os.CLD_EXITED
            return info.si_status if exited else -info.si_status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill the subprocess's group (what the project code started too), then reap the child.

    The group is signalled before the child is reaped: while its leader is alive or an unreaped
    zombie, its id cannot belong to anyone else.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


# -- the subprocess -------------------------------------------------------------------------------
def _child_main() -> None:  # pragma: no cover - runs in the check subprocess
    """Import the base versions, wait for the overlay, run the engine's patch, report each step."""
    events_fd, control_fd = int(sys.argv[1]), int(sys.argv[2])
    control = os.fdopen(control_fd, "rb")

    def emit(**event: object) -> None:
        os.write(events_fd, json.dumps(event, default=str).encode("ascii") + b"\n")

    from hotpatch.engine import default_engine
    from hotpatch.errors import PatchRejected

    job = json.loads(control.readline())
    import threading  # a last resort if the parent was killed while project code hangs here

    ender = threading.Timer(float(job["exit_after_s"]), os._exit, args=(124,))
    ender.daemon = True
    ender.start()
    sys.path[:0] = job["roots"]
    sys.dont_write_bytecode = True
    tree = os.path.realpath(job["tree"]) + os.sep
    engine = default_engine()  # the one the project's own verifiers and health checks join
    imported: list[str] = []
    for name in job["guard"]:
        emit(event="importing", module=name)
        try:
            module = __import__("importlib").import_module(name)
            filename = getattr(module, "__file__", None) or ""
            if not os.path.realpath(filename).startswith(tree):
                raise ImportError(f"{name} was imported from {filename or '?'}, not from the tree")
            engine.track(name)
        except BaseException as exc:
            emit(event="base_failed", module=name, **_describe(exc, tree))
            continue
        imported.append(name)
    emit(event="based")
    if control.readline() != b"go\n":
        os._exit(3)
    __import__("importlib").invalidate_caches()
    remaining = list(imported)
    while (
        remaining
    ):  # the change set, then what refusals leave of it (with nothing that needs them)
        emit(event="guarding", modules=remaining)
        try:
            results = engine.patch_many(remaining)
        except PatchRejected as exc:
            emit(event="rejected", **exc.details())
            if exc.module not in remaining:
                break
            needing = _needing(exc.module, remaining)
            if needing:
                emit(event="blocked", modules=needing, by=exc.module)
            remaining = [m for m in remaining if m != exc.module and m not in needing]
        except BaseException as exc:
            emit(event="guard_error", error=_describe(exc, tree)["error"])
            break
        else:
            fields = ("module", "changed", "added", "removed", "derived")
            emit(event="guarded", results=[{f: getattr(r, f) for f in fields} for r in results])
            break
    for name in job["new"]:
        emit(event="importing_new", module=name)
        try:
            __import__("importlib").import_module(name)
        except BaseException as exc:
            emit(event="new_failed", module=name, **_describe(exc, tree))
        else:
            emit(event="new_imported", module=name)
    emit(event="done")
    os._exit(0)  # project code's threads and atexit handlers are not ours to wait for


def _needing(blocker: str, names: Sequence[str]) -> list[str]:  # pragma: no cover
    """The modules of ``names`` that import ``blocker``, directly or through each other."""
    from hotpatch.engine.modulemap import imported_modules, package_of

    imports: dict[str, set[str]] = {}
    for name in names:
        filename = getattr(sys.modules.get(name), "__file__", None)
        try:
            with open(str(filename), "rb") as fh:
                text = fh.read(MAX_FILE_BYTES).decode("utf-8", "replace")
        except OSError:
            text = ""
        imports[name] = imported_modules(text, package=package_of(name))
    found: set[str] = set()
    frontier = {blocker}
    while frontier:
        frontier = {n for n in names if n not in found and n != blocker and imports[n] & frontier}
        found |= frontier
    return sorted(found)


def _describe(exc: BaseException, tree: str) -> dict[str, object]:  # pragma: no cover
    """An exception as a report (in the subprocess): type, message, the innermost tree file:line."""
    filename, lineno = None, None
    if isinstance(exc, SyntaxError) and exc.filename:
        filename, lineno = exc.filename, exc.lineno
    else:
        tb = exc.__traceback__
        while tb is not None:
            name = tb.tb_frame.f_code.co_filename
            if os.path.realpath(name).startswith(tree):
                filename, lineno = name, tb.tb_lineno
            tb = tb.tb_next
    message = f"{type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
    return {
        "error": message,
        "filename": filename,
        "lineno": lineno,
        "syntax": isinstance(exc, SyntaxError),
    }
