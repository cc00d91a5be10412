"""The history of each module: its versions, newest first, and which of them rollback can reach.

Every applied version keeps the exact inverse of the change set that made it live (its *undo*), so
the versions below it can be restored with the very same objects. ``history_limit`` bounds how many
undos are kept; older versions stay listed but can no longer be restored. Pure bookkeeping: nothing
here touches a live module.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Literal

from hotpatch.engine.candidate import Source
from hotpatch.engine.changeset import ChangeSet
from hotpatch.errors import HotpatchError

Outcome = Literal["baseline", "applied", "rejected", "rolled_back"]


@dataclass(frozen=True)
class Version:
    """One entry of a module's history.

    Attributes:
        id: the first 12 hex digits of ``sha256`` ("baseline" when the first source is unknown).
        module: the module's name.
        sha256: the content hash of the source, when known.
        time: when it was recorded (seconds since the epoch).
        outcome: ``baseline`` (as first imported), ``applied``, ``rejected`` or ``rolled_back``.
        is_live: whether the live module runs this version now.
        stage: for a rejected version, the stage that refused it.
        reason: for a rejected or rolled-back version, why.
    """

    id: str
    module: str
    sha256: str | None
    time: float
    outcome: Outcome
    is_live: bool = False
    stage: str | None = None
    reason: str | None = None


def version_id(sha: str | None) -> str:
    return sha[:12] if sha else "baseline"


@dataclass
class Entry:
    version: Version
    source: Source | None = None
    undo: ChangeSet | None = None  # restores the version below this one; None once unrestorable

    def update(self, **changes: object) -> None:
        self.version = dataclasses.replace(self.version, **changes)  # type: ignore[arg-type]


@dataclass
class ModuleHistory:
    """The versions of one module, oldest first, with exactly one live."""

    name: str
    limit: int
    entries: list[Entry] = field(default_factory=list)

    @classmethod
    def start(cls, name: str, baseline: Source | None, *, limit: int) -> ModuleHistory:
        sha = baseline.sha256 if baseline else None
        version = Version(version_id(sha), name, sha, time.time(), "baseline", is_live=True)
        return cls(name, limit, [Entry(version, baseline)])

    def live(self) -> Entry:
        return next(e for e in reversed(self.entries) if e.version.is_live)

    def stack(self) -> list[Entry]:
        """Versions that rollback can reach, oldest first, ending with the live one.

        The chain ends where a version's undo was freed (``limit``) or at the baseline.
        """
        chain = [e for e in self.entries if e.version.outcome in ("baseline", "applied")]
        reachable = [chain[-1]]
        for below, above in zip(reversed(chain[:-1]), reversed(chain[1:])):
            if above.undo is None:
                break
            reachable.insert(0, below)
        return reachable

    def learn_live_source(self, source: Source) -> None:
        """A version compiled and found to change nothing (``source``: a no-op version, or the
        live text compiled to re-derive what it computes from another module): the live version is
        ``source`` if its baseline was unknown; else the live version keeps ``source``'s
        statements' code for the next version to be compiled from (``Source.pieces``)."""
        live = self.live()
        if live.source is None:
            live.source = source
            live.update(id=version_id(source.sha256), sha256=source.sha256)
        elif source.pieces is not None and live.source.pieces is not source.pieces:
            live.source = dataclasses.replace(live.source, pieces=source.pieces)

    def add_applied(self, source: Source, undo: ChangeSet) -> tuple[Version, Version]:
        """Record a committed version; returns (previous, new)."""
        previous = self.live()
        previous.update(is_live=False)
        version = Version(
            version_id(source.sha256),
            self.name,
            source.sha256,
            time.time(),
            "applied",
            is_live=True,
        )
        self.entries.append(Entry(version, source, undo))
        if previous.source is not None and previous.source.pieces is not None:
            # Only the live version keeps its statements' code (the next version is compiled
            # from it): older ones would hold code taken out of service, for nothing.
            previous.source = dataclasses.replace(previous.source, pieces=None)
        self._trim()
        return previous.version, version

    def add_rejected(self, sha: str | None, stage: str, reason: str) -> None:
        version = Version(
            version_id(sha), self.name, sha, time.time(), "rejected", stage=stage, reason=reason
        )
        self.entries.append(Entry(version))
        self._trim()

    def plan_rollback(self, to: str | None) -> tuple[Entry, list[Entry]]:
        """The version to restore and the ones to undo (newest last).

        Raises:
            HotpatchError: nothing to roll back to, or ``to`` is not restorable.
        """
        stack = self.stack()
        if to is None:
            if len(stack) < 2:
                raise HotpatchError(f"{self.name!r} has no earlier version to roll back to")
            index = len(stack) - 2
        else:
            found = [i for i, e in enumerate(stack[:-1]) if _matches(e.version, to)]
            if not found:
                known = ", ".join(e.version.id for e in stack[:-1]) or "none"
                raise HotpatchError(
                    f"{self.name!r} has no restorable version {to!r} below the live one "
                    f"(restorable: {known})"
                )
            index = found[-1]
        return stack[index], stack[index + 1 :]

    def mark_rolled_back(self, target: Entry, undone: list[Entry], *, reason: str) -> None:
        for entry in undone:
            entry.undo = None
            entry.update(outcome="rolled_back", is_live=False, reason=reason)
        target.update(is_live=True)

    def _trim(self) -> None:
        stack = self.stack()
        if len(stack) > self.limit:
            stack[-self.limit].undo = None  # frees the old code objects and values it held
        reachable = {id(e) for e in self.stack()}
        for entry in self.entries:
            if id(entry) not in reachable:
                entry.undo = None
                entry.source = None
        while len(self.entries) > 2 * self.limit:
            oldest = next(e for e in self.entries if id(e) not in reachable)
            self.entries.remove(oldest)


def _matches(version: Version, wanted: str) -> bool:
    return version.id == wanted or (
        version.sha256 is not None and len(wanted) >= 7 and version.sha256.startswith(wanted)
    )
