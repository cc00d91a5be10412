"""Watch mode of the gunicorn hook: notice saved code from the master loop, with no thread.

The master cannot run a watchdog observer (a thread in the master makes Python 3.12+ warn at every
fork, and gunicorn forks all the time). Instead the controller polls: every ``interval_s`` it
takes a stat *signature* of the files a release would contain (relative path -> mtime, size, inode), which
costs one ``stat`` per file and no reads, and feeds it to a ``ChangeDetector``:

- ``scan_sources`` walks the app directory (the only part here that touches the disk) with the
  release snapshot's own rule and walk (``_fileset``): a file triggers a rollout exactly when a
  release would contain it (sources, templates, static assets; not ``__pycache__``, ``.git``,
  virtual environments, editor swap files, nor the log and pid files the server writes there);
- ``changed_paths`` diffs two signatures (pure);
- ``ChangeDetector`` (pure, clock and file hashing passed in) debounces with
  ``hotpatch.watch.debounce.Debouncer``: a path whose stat changed is released once a scan has seen
  no further change for ``quiet_period_s`` (at most ``max_delay_s`` after the first one); then
  the content hashes of the released paths are compared with the last ones seen, so a touch or a
  save of identical text does nothing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hotpatch.gunicorn._fileset import BUILTIN_RULE, SnapshotRule, walk
from hotpatch.watch.debounce import Debouncer

QUIET_PERIOD_S = 0.2
"""A change is acted on once a scan has seen the tree unchanged for this long ..."""
MAX_DELAY_S = 2.0
"""... or this long after it was first seen, for files that keep changing."""
DEFAULT_INTERVAL_S = 0.25
MAX_DUTY_CYCLE = 0.1
"""A scan that takes longer than this fraction of the interval stretches the interval."""


@dataclass(frozen=True)
class FileStat:
    """What a scan records of one file: enough to notice a write, a rename over it, a truncation."""

    mtime_ns: int
    size: int
    inode: int


Signature = Mapping[str, FileStat]
"""Relative path (``/``-separated) -> ``FileStat`` of every watched file."""


def scan_sources(root: str, *, rule: SnapshotRule = BUILTIN_RULE) -> dict[str, FileStat]:
    """The stat signature of the files under ``root`` that a release would contain.

    Links are recorded, not followed; ``root`` itself may be one (a ``current`` symlink is
    followed at each scan). Files that vanish during the scan and directories that cannot be
    listed are left out (the snapshot, not the scan, refuses an unreadable tree).

    Args:
        root: the app directory.
        rule: the snapshot rule (it excludes the state and releases directories).

    Returns:
        The signature (relative paths decoded with ``os.fsdecode``), empty when ``root`` is
        missing.

    Raises:
        WalkError: the tree is nested deeper than the snapshot accepts.
    """
    signature: dict[str, FileStat] = {}
    for found in walk(root, rule, on_error=_skip):
        st = found.st
        if st is not None:
            signature[os.fsdecode(found.rel)] = FileStat(st.st_mtime_ns, st.st_size, st.st_ino)
    return signature


def _skip(_path: bytes, _exc: OSError) -> None:
    return None


def changed_paths(old: Signature, new: Signature) -> frozenset[str]:
    """Paths added, removed, or whose stat differs between two signatures."""
    changed = {path for path, stat in new.items() if old.get(path) != stat}
    changed.update(path for path in old if path not in new)
    return frozenset(changed)


def hash_file(path: str) -> str | None:
    """The SHA-256 of a file's bytes (a link's target), ``None`` when it cannot be read."""
    try:
        if os.path.islink(path):
            return hashlib.sha256(os.fsencode(os.readlink(path))).hexdigest()
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        digest = hashlib.sha256()
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None


def hash_sources(root: str, paths: frozenset[str] | set[str] | list[str]) -> dict[str, str]:
    """Content hashes of ``paths`` (relative to ``root``); unreadable files are left out."""
    hashes: dict[str, str] = {}
    for rel in paths:
        digest = hash_file(os.path.join(root, rel))
        if digest is not None:
            hashes[rel] = digest
    return hashes


@dataclass(frozen=True)
class Observation:
    """What one scan led to.

    Attributes:
        changed: files whose content differs from the last content seen (a rollout is due when
            not empty).
        unchanged: files of the released batch whose stat changed but whose content did not
            (touches, identical saves).
    """

    changed: frozenset[str] = frozenset()
    unchanged: frozenset[str] = frozenset()

    @property
    def is_batch(self) -> bool:
        """Whether a debounced batch was released by this scan."""
        return bool(self.changed or self.unchanged)


class ChangeDetector:
    """Decides, scan after scan, when saved files make a rollout due. Pure: no disk, no clock.

    Args:
        signature: the signature at start.
        hashes: the content hash of each file at start (relative path -> hex digest).
        now: the current time (``time.monotonic()`` in real use).
        interval_s: the time between scans.
        quiet_period_s: how long a scan must see no further change before a batch is released.
        max_delay_s: a batch is released this long after its first change, however busy.
    """

    def __init__(
        self,
        signature: Signature,
        hashes: Mapping[str, str],
        *,
        now: float,
        interval_s: float = DEFAULT_INTERVAL_S,
        quiet_period_s: float = QUIET_PERIOD_S,
        max_delay_s: float = MAX_DELAY_S,
    ) -> None:
        self.interval_s = interval_s
        self._signature: dict[str, FileStat] = dict(signature)
        self._hashes: dict[str, str] = dict(hashes)
        self._debouncer: Debouncer[str] = Debouncer(
            quiet_period_s=quiet_period_s, max_delay_s=max_delay_s
        )
        self._next_scan = now + interval_s

    @property
    def is_pending(self) -> bool:
        """Whether changed stats are waiting for their quiet period."""
        return not self._debouncer.is_empty

    def next_scan_at(self) -> float:
        """When the next scan is due: the interval, or sooner when a pending batch becomes due."""
        due = self._debouncer.due_at()
        return self._next_scan if due is None else min(self._next_scan, due)

    def is_scan_due(self, now: float) -> bool:
        return now >= self.next_scan_at()

    def observe(
        self,
        signature: Signature,
        *,
        now: float,
        hash_of: Callable[[str], str | None],
        scan_s: float = 0.0,
    ) -> Observation:
        """Feed one scan, finished at ``now``.

        Args:
            signature: what the scan found.
            now: when it finished.
            hash_of: ``hash_of(relative path)``, the content hash, ``None`` for a missing file;
                called only for the files of a released batch.
            scan_s: how long the scan took: a slow scan stretches the interval so that scanning
                never takes more than ``MAX_DUTY_CYCLE`` of the master's time.

        Returns:
            The files whose content changed, once their batch is released.
        """
        for path in changed_paths(self._signature, signature):
            self._debouncer.add(path, now=now)
        self._signature = dict(signature)
        self._next_scan = now + max(self.interval_s, scan_s / MAX_DUTY_CYCLE)
        batch = self._debouncer.take_due(now=now)
        if batch is None:
            return Observation()
        changed: set[str] = set()
        unchanged: set[str] = set()
        for path in batch.items:
            digest = hash_of(path)
            if digest == self._hashes.get(path):
                unchanged.add(path)
                continue
            changed.add(path)
            if digest is None:
                self._hashes.pop(path, None)
            else:
                self._hashes[path] = digest
        return Observation(frozenset(changed), frozenset(unchanged))
