"""The parent side of ``hotpatch check``: plan the run, drive the subprocess, decide the verdicts."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from hotpatch._log import get_logger
from hotpatch.check._files import _write_tree_file, import_roots, module_for, read_work_file
from hotpatch.check._git import FileChange, _git, changed_files, resolve_base
from hotpatch.check._report import (
    _PHRASES,
    DEFAULT_TIMEOUT_S,
    MAX_EVENTS_BYTES,
    MAX_OVERLAY_BYTES,
    MAX_REASON_CHARS,
    ORPHAN_MARGIN_S,
    RELOAD_STAGES,
    CheckError,
    CheckReport,
    ModuleVerdict,
    Skipped,
    Verdict,
)
from hotpatch.engine.arguments import check_seconds

log = get_logger(__name__)

_CHILD_BOOT = (
    "import sys; sys.path[:] = [p for p in sys.path if p]; "
    "from hotpatch.check._child import main; main()"
)


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
                "parent_pid": os.getpid(),  # orphaned (this process killed), it ends at once
                "exit_after_s": self.timeout_s + ORPHAN_MARGIN_S,  # and in any case by then
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
