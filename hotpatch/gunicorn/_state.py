"""What the master keeps on disk, how workers report to it, and how a client recognises it.

The problem: the master trusts what it reads, and the ``hotpatch`` command line acts on it. A state
file decides which pid gets SIGHUP; a worker's report decides whether a release goes live. In a
shared ``/tmp`` another user could plant, link or replace those files, and a pid recorded yesterday
may belong to another process today. Under ``gunicorn --user`` the workers run as another uid than
the master, and cannot even reach the master's private directory to write a report.

The mechanism, in three parts:

- **State directory.** ``<runtime dir>/gunicorn-<master pid>/`` (``hotpatch.rundir``: owned by
  this uid, mode 0700, never through a link), or ``HOTPATCH_STATE_DIR``, which must pass the same
  check. ``state.json`` is written with ``write_private`` and read with ``read_private`` (regular
  file of this uid, ``O_NOFOLLOW``, size cap); anything else is refused with the reason.
- **Reports through a pipe.** The master opens one pipe per worker just before forking it; the
  worker inherits the write end and sends one JSON line per step (``loaded``, ``healthy``,
  ``failed``, ``recycled``). Nothing is on disk, so nothing can be planted, and the channel works
  whatever uid the worker runs as. The read end is set ``O_ASYNC`` with the master as owner and
  ``WAKE_SIGNAL`` as the signal (``F_SETSIG``), so the kernel wakes the master when a line arrives
  (a worker running as another uid could not signal a root master itself). The master reads
  without blocking, caps what it buffers, and validates every field: a malformed or oversized
  report is rejected and logged, never trusted.
- **Master identity.** ``state.json`` records the master's pid, uid and start time
  (``/proc/<pid>/stat``, field 22). A client signals a pid only when the state directory and the
  file are its own, the record names that pid, and the live process with that pid has that start
  time and uid (checked through a pidfd where the kernel has them, so the pid cannot be reused
  between the check and the signal).

- **Requests to the master** (``hotpatch deploy``). A client writes one small JSON file into
  ``requests/`` (``write_request``: private, ``write_private``), then sends ``WAKE_SIGNAL`` through
  a pidfd to the verified master; the master reads each file once (``take_requests``:
  ``read_private``, capped, then removed), acts from its own loop, and publishes the answer in
  ``state.json`` under the request's random token (``deploy_acks``).

```
<state dir>/                 default: <runtime dir>/gunicorn-<master pid>/  (mode 0700)
  state.json                 the master's published state (write_private: temp file + rename)
  releases/<release id>/     snapshots of the app directory
  requests/<token>.json      a client's request to the master, removed when read
```
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hotpatch.rundir import (
    check_private_dir,
    own_subdirs,
    private_dir,
    read_private,
    runtime_dir,
    write_private,
)

WAKE_SIGNAL = signal.SIGURG
"""Ignored by default, unused by gunicorn: the kernel sends it to the master when a report arrives."""

STATE_FILE = "state.json"
REQUESTS_DIR = "requests"
MAX_REQUEST_FILE_BYTES = 16 << 10
_TOKEN = re.compile(r"[0-9a-f]{32}")
_REQUEST_NAME = re.compile(r"[0-9a-f]{32}\.json")
_STATE_DIR_NAME = re.compile(r"gunicorn-([1-9][0-9]{0,9})")
MAX_STATE_BYTES = 4 << 20
"""The state holds at most 200 events per rollout and one line per worker: far below this."""
MAX_REPORT_BYTES = 256 << 10
"""What one worker may send in all; beyond it the master stops reading that worker's pipe."""
MAX_REASON_CHARS = 2_000
MAX_ERROR_CHARS = 32_000

ReportStage = Literal["loaded", "healthy", "failed", "recycled", "listening"]
_STAGES = frozenset({"loaded", "healthy", "failed", "recycled", "listening"})
_FAILED_AT = frozenset({"", "release", "load", "health"})


class StateError(Exception):
    """The state directory or ``state.json`` is missing, unsafe or malformed (the message says)."""


def state_dir_for(master_pid: int, configured: Path | None = None) -> Path:
    """Where master ``master_pid`` keeps its state: ``configured``, else in the runtime directory.

    Raises:
        InsecurePath: the runtime directory is not safe to use.
    """
    if configured is not None:
        return configured
    return runtime_dir() / f"gunicorn-{master_pid}"


def prepare_state_dir(path: Path) -> Path:
    """Create (or accept) the private state directory and its ``releases`` directory.

    Only the last component is created (mode 0700); it must then be a real directory of this uid
    with no access for others, as the ``releases`` directory in it.

    Raises:
        InsecurePath: the directory (or ``releases``) is a link, someone else's, or open to others.
        OSError: it cannot be created (a missing parent, for ``HOTPATCH_STATE_DIR``).
    """
    state_dir = private_dir(path.parent, path.name)
    private_dir(state_dir, "releases")
    private_dir(state_dir, REQUESTS_DIR)
    return state_dir


def write_request(state_dir: Path, token: str, request: dict[str, Any]) -> None:
    """Leave ``request`` for the master (client side); ``token`` names it and its answer.

    Raises:
        InsecurePath: the state or requests directory is not private to this uid.
        ValueError: ``token`` is not 32 hex digits or the request is too large.
        OSError: it cannot be written.
    """
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"not a request token: {token!r:.80}")
    data = json.dumps(request, sort_keys=True).encode()
    if len(data) > MAX_REQUEST_FILE_BYTES:
        raise ValueError(f"request larger than {MAX_REQUEST_FILE_BYTES} bytes")
    check_private_dir(state_dir)
    directory = state_dir / REQUESTS_DIR
    check_private_dir(directory)
    write_private(directory / f"{token}.json", data)


def take_requests(state_dir: Path, *, limit: int = 16) -> list[tuple[str, dict[str, Any] | str]]:
    """The requests waiting for the master, each removed once read: ``(token, request)``, or
    ``(token, why it was refused)`` for a file that is unsafe, too large or not a JSON object."""
    directory = state_dir / REQUESTS_DIR
    try:
        names = sorted(n for n in os.listdir(directory) if _REQUEST_NAME.fullmatch(n))[:limit]
    except OSError:
        return []
    taken: list[tuple[str, dict[str, Any] | str]] = []
    for name in names:
        path = directory / name
        token = name[: -len(".json")]
        try:
            raw = read_private(path, max_bytes=MAX_REQUEST_FILE_BYTES)
        except (OSError, ValueError) as exc:
            taken.append((token, f"unreadable request: {exc}"))
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        with contextlib.suppress(OSError):
            path.unlink()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        taken.append((token, data if isinstance(data, dict) else "not a JSON object"))
    return taken


def write_state(state_dir: Path, state: dict[str, Any]) -> None:
    """Publish ``state`` as ``state.json`` (readers see the old file or the new one, never a part)."""
    data = json.dumps(state, indent=1, sort_keys=True, default=str).encode()
    write_private(state_dir / STATE_FILE, data)


def load_state_file(state_dir: Path) -> dict[str, Any]:
    """The state in ``state_dir``, after checking the directory and the file.

    Raises:
        StateError: missing, unsafe (a link, a FIFO, someone else's, open to others), larger than
            ``MAX_STATE_BYTES``, not JSON or not an object; the message names the path.
    """
    path = state_dir / STATE_FILE
    try:
        check_private_dir(state_dir)
        raw = read_private(path, max_bytes=MAX_STATE_BYTES)
    except FileNotFoundError as exc:
        raise StateError(f"{exc.filename or path}: does not exist") from None
    except PermissionError as exc:  # InsecurePath is one too; its message names the path
        raise StateError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise StateError(f"{path}: cannot be read: {exc}") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise StateError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict):
        raise StateError(f"{path}: not a JSON object")
    return data


def remove_stale_state_dirs(parent: Path, *, keep: Path) -> list[str]:
    """Remove the state directories of this uid's gunicorn masters that are gone; their names.

    Only ``gunicorn-<pid>`` directories of this uid directly in ``parent`` (the runtime
    directory) are considered. A master is gone when its recorded pid no longer runs with the
    recorded start time (a reused pid is another process), or, without a readable record, when
    no process has that pid. Links are never followed (``rmtree`` works on descriptors).
    """
    removed: list[str] = []
    for path, match in own_subdirs(parent, _STATE_DIR_NAME):
        if path == keep:
            continue
        pid = int(match[1])
        try:
            record = load_state_file(path)
        except StateError:
            record = {}
        recorded_start = record.get("master_start_time")
        running_start = process_start_time(pid)
        if running_start is not None and (
            not isinstance(recorded_start, int) or recorded_start == running_start
        ):
            continue  # that master (or, with no record, some process with its pid) still runs
        try:
            shutil.rmtree(path)
        except OSError:
            continue
        removed.append(path.name)
    return removed


# -- process identity -------------------------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot), or ``None`` if there is none."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read(4096)
    except OSError:
        return None
    try:  # the command name (field 2) is in parentheses and may contain anything
        fields = text.rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def process_uid(pid: int) -> int | None:
    """The real uid of process ``pid`` (the owner of ``/proc/<pid>``), or ``None``."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


# -- worker reports ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StageReport:
    """One step a worker reports.

    Attributes:
        stage: ``loaded`` (the app imported), ``healthy`` (checks passed), ``failed`` (load or
            health failed), ``recycled`` (leaving after ``max_requests``), ``listening`` (its
            control socket is open: it can take part in deploys).
        release: the release the worker runs.
        failed_at: for ``failed``: ``release`` (its release failed verification), ``load`` or
            ``health``.
        reason: one line, naming the file and line when there is one.
        error: the error output (traceback text).
        duration_s: how long the step took.
    """

    stage: ReportStage
    release: str = ""
    failed_at: str = ""
    reason: str = ""
    error: str = ""
    duration_s: float = 0.0


def encode_report(report: StageReport) -> bytes:
    """One report as the line a worker writes to its pipe (long texts are cut)."""
    data = {
        "v": 1,
        "stage": report.stage,
        "release": report.release[:200],
        "failed_at": report.failed_at,
        "reason": report.reason[:MAX_REASON_CHARS],
        "error": report.error[-MAX_ERROR_CHARS:],
        "duration_s": report.duration_s,
    }
    return json.dumps(data, ensure_ascii=True).encode() + b"\n"


def decode_report(line: bytes) -> StageReport:
    """Parse and check one line from a worker.

    Raises:
        ValueError: not a version-1 report with fields of the right types and values.
    """
    try:
        data = json.loads(line)
    except RecursionError:
        raise ValueError("nested too deep") from None
    if not isinstance(data, dict) or data.get("v") != 1:
        raise ValueError("not a version-1 report object")
    unknown = set(data) - {"v", "stage", "release", "failed_at", "reason", "error", "duration_s"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    stage = data.get("stage")
    if stage not in _STAGES:
        raise ValueError(f"unknown stage {stage!r:.40}")
    texts = {k: data.get(k, "") for k in ("release", "failed_at", "reason", "error")}
    for key, value in texts.items():
        if not isinstance(value, str):
            raise ValueError(f"{key} is not a string")
    if texts["failed_at"] not in _FAILED_AT:
        raise ValueError(f"unknown failed_at {texts['failed_at']!r:.40}")
    duration = data.get("duration_s", 0.0)
    if isinstance(duration, bool) or not isinstance(duration, (int, float)):
        raise ValueError("duration_s is not a number")
    if not math.isfinite(duration) or duration < 0:
        raise ValueError("duration_s is not a non-negative finite number")
    return StageReport(
        stage=stage,
        release=texts["release"][:200],
        failed_at=texts["failed_at"],
        reason=texts["reason"][:MAX_REASON_CHARS],
        error=texts["error"][-MAX_ERROR_CHARS:],
        duration_s=float(duration),
    )


def open_report_pipe(master_pid: int) -> tuple[int, int]:
    """A pipe for one worker's reports: ``(read end for the master, write end for the worker)``.

    The read end is non-blocking and signals ``WAKE_SIGNAL`` to ``master_pid`` when data arrives.
    """
    read_fd, write_fd = os.pipe()
    try:
        os.set_blocking(read_fd, False)
        fcntl.fcntl(read_fd, fcntl.F_SETOWN, master_pid)
        with contextlib.suppress(AttributeError, OSError):  # without it: SIGIO (also handled)
            fcntl.fcntl(read_fd, fcntl.F_SETSIG, WAKE_SIGNAL)
        flags = fcntl.fcntl(read_fd, fcntl.F_GETFL)
        fcntl.fcntl(read_fd, fcntl.F_SETFL, flags | os.O_ASYNC)
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    return read_fd, write_fd


def send_report(fd: int, report: StageReport) -> None:
    """Write one report to the master (worker side); blocks only if the master stopped reading."""
    data = memoryview(encode_report(report))
    while data:
        try:
            written = os.write(fd, data)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        data = data[written:]


class ReportReader:
    """The master's end of one worker's report pipe: reads what arrived, returns checked reports.

    Args:
        fd: the read end (non-blocking); closed by ``close``.
        max_bytes: what the worker may send in all.
    """

    def __init__(self, fd: int, *, max_bytes: int = MAX_REPORT_BYTES) -> None:
        self.fd: int | None = fd
        self.max_bytes = max_bytes
        self.received = 0
        self._buffer = b""
        self.rejected: list[str] = []
        """Why lines were refused since the last ``read`` (the caller logs them)."""

    def read(self) -> list[StageReport]:
        """Every complete, valid report that arrived since the last call."""
        self.rejected = []
        fd = self.fd
        if fd is None:
            return []
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:  # pragma: no cover
                    continue
                self.rejected.append(f"cannot read the report pipe: {exc}")
                self.close()
                break
            if not chunk:
                break
            self.received += len(chunk)
            if self.received > self.max_bytes:
                self.rejected.append(
                    f"the worker sent more than {self.max_bytes} bytes of reports; no more are read"
                )
                self._buffer = b""
                self.close()
                return []
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        reports = []
        for line in lines:
            if not line.strip():
                continue
            try:
                reports.append(decode_report(line))
            except ValueError as exc:
                self.rejected.append(f"malformed report ({exc}): {line[:120]!r}")
        return reports

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
