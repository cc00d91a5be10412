"""Talking to a running master from outside: read its state, start a rollout, follow it.

Used by ``hotpatch rollout`` / ``hotpatch status``, the demo, the tests and the benchmark.

A pid is signalled only on the word of a record that can be trusted (``_state.py``): the state
directory and ``state.json`` belong to this uid and are private; the record names that pid; the
live process with that pid belongs to this uid and started when the record says the master
started. The signal goes through a pidfd opened before that check, so a pid reused between the
check and the signal cannot receive it.

What a client reports is what the master published: a rollout that has not ended when the client
stops waiting is reported as still running (``RolloutStillRunning``), never as failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hotpatch.errors import ConfigError, HotpatchError, RolloutFailed
from hotpatch.gunicorn._state import (
    WAKE_SIGNAL,
    StateError,
    load_state_file,
    process_start_time,
    process_uid,
    state_dir_for,
    write_request,
)

POLL_INTERVAL_S = 0.05
ACK_POLL_INTERVAL_S = 0.005
MAX_PIDFILE_BYTES = 64


class RolloutStillRunning(HotpatchError, TimeoutError):
    """The client stopped waiting; the rollout goes on in the master and its outcome is unknown.

    Attributes:
        pid: the master.
        rollout_id: the rollout.
    """

    def __init__(self, pid: int, rollout_id: int, timeout_s: float) -> None:
        self.pid = pid
        self.rollout_id = rollout_id
        super().__init__(
            f"rollout {rollout_id} of master {pid} had not ended after {timeout_s:g} s: its outcome "
            f"is unknown and it is still running in the master; see `hotpatch status --pid {pid}`"
        )


def _state_dir(pid: int, state_dir: str | os.PathLike[str] | None) -> Path:
    configured = state_dir
    if configured is None:
        configured = os.environ.get("HOTPATCH_STATE_DIR", "").strip() or None
    try:
        return state_dir_for(pid, Path(configured).absolute() if configured else None)
    except PermissionError as exc:  # InsecurePath: the runtime directory itself
        raise ConfigError(str(exc)) from None


def state_dir_for_pid(pid: int, state_dir: str | os.PathLike[str] | None = None) -> Path:
    """The state directory of master ``pid`` (``HOTPATCH_STATE_DIR`` when set, as the master).

    Raises:
        ConfigError: the runtime directory is not safe to use.
    """
    return _state_dir(pid, state_dir)


def read_pidfile(path: str | os.PathLike[str]) -> int:
    """The pid in a gunicorn pidfile.

    Raises:
        ConfigError: the file is missing, too long, or holds no positive pid.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_PIDFILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the pidfile: {exc.strerror}") from None
    try:
        if len(raw) > MAX_PIDFILE_BYTES:
            raise ValueError
        pid = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"{path}: no pid in the pidfile") from None
    if pid <= 0:
        raise ConfigError(f"{path}: no pid in the pidfile (found {pid})")
    return pid


def load_state(pid: int, state_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The state master ``pid`` publishes, after checking that it is really that master's.

    Raises:
        ConfigError: no such process, no state, an unsafe or malformed state, or a record that
            belongs to another process (the message says which).
    """
    if pid <= 0:
        raise ConfigError(f"not a process id: {pid}")
    directory = _state_dir(pid, state_dir)
    start_time = process_start_time(pid)
    if start_time is None:
        raise ConfigError(f"no process with pid {pid}")
    try:
        state = load_state_file(directory)
    except StateError as exc:
        raise ConfigError(
            f"pid {pid}: no usable hotpatch state: {exc} (is it a gunicorn master started with "
            "hotpatch's hooks, -c python:hotpatch.gunicorn, and as this user?)"
        ) from None
    if state.get("master_pid") != pid:
        raise ConfigError(
            f"{directory}: the state names master {state.get('master_pid')!r:.20}, not {pid}"
        )
    if state.get("master_start_time") != start_time:
        raise ConfigError(
            f"{directory}: the state was written by an earlier process with pid {pid} (start "
            "times differ): that master is gone and the pid now belongs to another process"
        )
    owner = process_uid(pid)
    if owner != os.getuid():
        raise ConfigError(f"process {pid} belongs to uid {owner}, not to this user ({os.getuid()})")
    return state


def read_state(pid: int, state_dir: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """``load_state``, or ``None`` when there is no trustworthy state (yet)."""
    try:
        return load_state(pid, state_dir)
    except ConfigError:
        return None


def is_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether process ``pid`` exists (and, with ``start_time``, is still the same process)."""
    now = process_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def start_rollout(pid: int, state_dir: str | os.PathLike[str] | None = None) -> int:
    """Send SIGHUP to master ``pid``; returns the id the resulting rollout will have.

    Raises:
        ConfigError: the process is not a gunicorn master of this user running hotpatch's hooks.
    """
    pidfd = _pidfd_open(pid)
    try:
        state = load_state(pid, state_dir)
        rollout_id = state.get("next_rollout_id")
        if isinstance(rollout_id, bool) or not isinstance(rollout_id, int) or rollout_id < 1:
            raise ConfigError(f"pid {pid}: the state has no valid next_rollout_id")
        _send(pid, pidfd, signal.SIGHUP)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return rollout_id


def _pidfd_open(pid: int) -> int | None:
    if pid <= 0:
        raise ConfigError(f"not a process id: {pid}")
    opener = getattr(os, "pidfd_open", None)
    if opener is None:  # pragma: no cover - Linux < 5.3 or not Linux
        return None
    try:
        return int(opener(pid))
    except ProcessLookupError:
        raise ConfigError(f"no process with pid {pid}") from None
    except OSError:  # pragma: no cover - kernel without pidfds
        return None


def _send(pid: int, pidfd: int | None, sig: int) -> None:
    try:
        if pidfd is not None and hasattr(signal, "pidfd_send_signal"):
            signal.pidfd_send_signal(pidfd, sig)
        else:  # pragma: no cover - no pidfds: a (small) window for pid reuse remains
            os.kill(pid, sig)
    except ProcessLookupError:
        raise ConfigError(f"master {pid} exited before it could be signalled") from None


def wait_for_rollout(
    pid: int,
    rollout_id: int,
    *,
    timeout_s: float = 600.0,
    state_dir: str | os.PathLike[str] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Follow rollout ``rollout_id`` until it ends; returns its record (``last_rollout``).

    Args:
        pid: the master.
        rollout_id: from ``start_rollout``.
        timeout_s: stop waiting after this long (the rollout goes on in the master).
        state_dir: the master's state directory, when not the default.
        on_event: called with each progress event (``worker.spawned``, ``worker.healthy``, ...)
            as it appears.

    Raises:
        RolloutStillRunning: the rollout had not ended by then; its outcome is unknown.
        RolloutFailed: the master went away (its record can no longer be read).
        ConfigError: ``timeout_s`` is negative or not a number.
    """
    if not timeout_s >= 0:
        raise ConfigError(f"timeout_s must be a non-negative number of seconds, got {timeout_s!r}")
    start_time = process_start_time(pid)
    deadline = time.monotonic() + timeout_s
    shown = 0
    while True:
        state = None
        if is_alive(pid, start_time):
            with contextlib.suppress(ConfigError):
                state = load_state(pid, state_dir)
        if state is None:
            if not is_alive(pid, start_time):
                raise RolloutFailed(
                    f"master {pid} exited during rollout {rollout_id}; its outcome is unknown",
                    rolled_back=False,
                )
        else:
            current = state.get("rollout") or {}
            last = state.get("last_rollout") or {}
            current = current if isinstance(current, dict) else {}
            last = last if isinstance(last, dict) else {}
            record = None
            if current.get("id") == rollout_id:
                record = current
            elif last.get("id") == rollout_id:
                record = last
            if record is not None:
                events = record.get("events") or []
                for event in events[shown:]:
                    if on_event is not None and isinstance(event, dict):
                        on_event(event)
                shown = len(events)
            last_id = last.get("id", 0)
            if record is last or (isinstance(last_id, int) and last_id > rollout_id):
                return {**last}  # (a later id: merged into a queued rollout that ran after it)
        if time.monotonic() >= deadline:
            raise RolloutStillRunning(pid, rollout_id, timeout_s)
        time.sleep(min(POLL_INTERVAL_S, max(deadline - time.monotonic(), 0.0)) or 0.001)


def rollout_error(record: dict[str, Any]) -> RolloutFailed | None:
    """The ``RolloutFailed`` a finished rollout's record amounts to, or ``None`` if it completed."""
    if record.get("outcome") == "completed":
        return None
    reason = str(record.get("reason") or record.get("outcome"))
    pid = record.get("worker_pid")
    return RolloutFailed(
        reason,
        rolled_back=record.get("rolled_back") is True,
        worker_pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
    )


class MasterNoAnswer(HotpatchError, TimeoutError):
    """A request to the master got no answer in time: whether it acted is unknown."""


def ask_master(
    pid: int,
    request: dict[str, Any],
    *,
    timeout_s: float = 10.0,
    state_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Hand ``request`` to master ``pid`` (``hotpatch deploy``'s steps) and return its answer.

    The request goes into the master's private state directory; the master is woken with
    ``WAKE_SIGNAL`` through a pidfd opened before its record was checked (as ``start_rollout``),
    and answers in its published state under the request's random token.

    Raises:
        ConfigError: no such master of this user running hotpatch's hooks (nothing was sent).
        MasterNoAnswer: no answer within ``timeout_s`` (the master may still act on it).
        RolloutFailed: the master exited before it answered.
    """
    token = os.urandom(16).hex()
    pidfd = _pidfd_open(pid)
    try:
        state = load_state(pid, state_dir)
        start_time = state.get("master_start_time")
        directory = _state_dir(pid, state_dir)
        try:
            write_request(directory, token, request)
        except (OSError, ValueError) as exc:  # InsecurePath is an OSError
            raise ConfigError(
                f"{directory}: cannot leave a request for the master: {exc}"
            ) from None
        _send(pid, pidfd, WAKE_SIGNAL)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(ConfigError):
            acks = load_state(pid, state_dir).get("deploy_acks") or {}
            ack = acks.get(token) if isinstance(acks, dict) else None
            if isinstance(ack, dict):
                return ack
        if not is_alive(pid, start_time if isinstance(start_time, int) else None):
            raise RolloutFailed(f"master {pid} exited before it answered", rolled_back=False)
        if time.monotonic() >= deadline:
            raise MasterNoAnswer(
                f"master {pid} did not answer {request.get('op')!r} within {timeout_s:g} s; "
                f"whether it acted is unknown: see `hotpatch status --pid {pid}`"
            )
        time.sleep(ACK_POLL_INTERVAL_S)
