"""Files shared by the master, its workers and the ``hotpatch`` command line.

```
<state dir>/                 default: <tmp>/hotpatch-<uid>/gunicorn-<master pid>/  (mode 0700)
  state.json                 the master's published state (written atomically with rename)
  releases/<release id>/     snapshots of the app directory
  reports/<worker pid>.json  what each worker reported: loaded, healthy, failed, recycled
```
Workers wake the master after writing a report by sending it ``WAKE_SIGNAL``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

WAKE_SIGNAL = signal.SIGURG
"""Ignored by default, unused by gunicorn: a worker sends it to the master after each report."""

ReportStage = Literal["loaded", "healthy", "failed", "recycled"]


def default_state_dir(master_pid: int) -> Path:
    """Where a master with this pid keeps its state when ``HOTPATCH_STATE_DIR`` is not set."""
    return Path(tempfile.gettempdir()) / f"hotpatch-{os.getuid()}" / f"gunicorn-{master_pid}"


def prepare_state_dir(path: Path) -> None:
    """Create the state directory (private to this user) and its sub-directories."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    (path / "releases").mkdir(exist_ok=True)
    (path / "reports").mkdir(exist_ok=True)


def write_json_atomic(path: Path, data: object) -> None:
    """Write ``data`` as JSON so that readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True, default=str)
    tmp.replace(path)


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or ``None`` when the file is missing or unreadable."""
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class StageReport:
    """One step a worker reports.

    Attributes:
        stage: ``loaded`` (the app imported), ``healthy`` (checks passed), ``failed`` (load or
            health failed), ``recycled`` (leaving after ``max_requests``).
        failed_at: for ``failed``: ``load`` or ``health``.
        reason: one line, naming the file and line when there is one.
        error: the error output (traceback text).
        duration_s: how long the step took.
    """

    stage: ReportStage
    failed_at: str = ""
    reason: str = ""
    error: str = ""
    duration_s: float = 0.0


@dataclass
class WorkerReport:
    """Everything one worker has reported so far (rewritten whole at each step)."""

    pid: int
    release: str
    stages: list[StageReport] = field(default_factory=list)


def report_path(state_dir: Path, pid: int) -> Path:
    return state_dir / "reports" / f"{pid}.json"


def write_report(state_dir: Path, report: WorkerReport, master_pid: int) -> None:
    """Publish ``report`` and wake the master."""
    write_json_atomic(report_path(state_dir, report.pid), asdict(report))
    with contextlib.suppress(OSError):
        os.kill(master_pid, WAKE_SIGNAL)


def read_report(state_dir: Path, pid: int) -> WorkerReport | None:
    """The report of worker ``pid``, if it wrote one."""
    data = read_json(report_path(state_dir, pid))
    if not isinstance(data, dict):
        return None
    try:
        stages = [StageReport(**s) for s in data.get("stages", [])]
        return WorkerReport(pid=int(data["pid"]), release=str(data["release"]), stages=stages)
    except (KeyError, TypeError, ValueError):
        return None


def remove_report(state_dir: Path, pid: int) -> None:
    with contextlib.suppress(OSError):
        report_path(state_dir, pid).unlink()
