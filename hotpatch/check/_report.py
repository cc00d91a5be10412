"""What ``hotpatch check`` reports: a verdict per changed module, the files it skipped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hotpatch.errors import HotpatchError

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
ORPHAN_MARGIN_S = 10.0  # the subprocess ends itself this long after the deadline (parent gone)


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
