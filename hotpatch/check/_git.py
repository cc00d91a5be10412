"""The git side of ``hotpatch check``: the base commit, and what changed since it.

Nothing from outside is trusted: the ref is resolved with ``git rev-parse --verify
--end-of-options`` (a ref spelled like an option stays a ref), path arguments are literal
pathspecs, and file names stay bytes until decoded with ``os.fsdecode``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from hotpatch.check._report import Change, CheckError

_GIT_TIMEOUT_S = 120.0


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
