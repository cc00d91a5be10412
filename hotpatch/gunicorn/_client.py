"""Talking to a running master from outside: read its state, start a rollout, follow it.

Used by ``hotpatch rollout`` / ``hotpatch status``, the demo, the tests and the benchmark.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hotpatch.errors import ConfigError, HealthCheckTimeout, RolloutFailed
from hotpatch.gunicorn._state import default_state_dir, read_json

POLL_INTERVAL_S = 0.05


def state_dir_for(pid: int, state_dir: str | os.PathLike[str] | None = None) -> Path:
    """The state directory of master ``pid`` (``HOTPATCH_STATE_DIR`` when set, as the master)."""
    if state_dir is not None:
        return Path(state_dir)
    env = os.environ.get("HOTPATCH_STATE_DIR", "").strip()
    return Path(env) if env else default_state_dir(pid)


def read_pidfile(path: str | os.PathLike[str]) -> int:
    """The pid in a gunicorn pidfile.

    Raises:
        ConfigError: the file is missing or holds no pid.
    """
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
        return int(text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the pidfile: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{path}: no pid in the pidfile") from None


def read_state(pid: int, state_dir: Path | None = None) -> dict[str, Any] | None:
    """The master's published state, or ``None`` when it publishes none."""
    data = read_json(state_dir_for(pid, state_dir) / "state.json")
    return data if isinstance(data, dict) else None


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_rollout(pid: int, state_dir: Path | None = None) -> int:
    """Send SIGHUP to master ``pid``; returns the id the resulting rollout will have.

    Raises:
        ConfigError: the process is not a gunicorn master running hotpatch's hooks.
    """
    if not is_alive(pid):
        raise ConfigError(f"no process with pid {pid}")
    state = read_state(pid, state_dir)
    if state is None:
        raise ConfigError(
            f"pid {pid} publishes no hotpatch state in {state_dir_for(pid, state_dir)}: is it a "
            "gunicorn master started with hotpatch's hooks (-c python:hotpatch.gunicorn)?"
        )
    rollout_id = int(state["next_rollout_id"])
    os.kill(pid, signal.SIGHUP)
    return rollout_id


def wait_for_rollout(
    pid: int,
    rollout_id: int,
    *,
    timeout_s: float = 600.0,
    state_dir: Path | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Follow rollout ``rollout_id`` until it ends; returns its record (``last_rollout``).

    Args:
        pid: the master.
        rollout_id: from ``start_rollout``.
        timeout_s: give up after this long.
        state_dir: the master's state directory, when not the default.
        on_event: called with each progress event (``worker.spawned``, ``worker.healthy``, ...)
            as it appears.

    Raises:
        HealthCheckTimeout: the rollout did not end in time.
        RolloutFailed: the master went away.
    """
    deadline = time.monotonic() + timeout_s
    shown = 0
    while True:
        state = read_state(pid, state_dir)
        if state is None:
            if not is_alive(pid):
                raise RolloutFailed(f"master {pid} exited during the rollout", rolled_back=False)
        else:
            current = state.get("rollout") or {}
            last = state.get("last_rollout") or {}
            record = None
            if current.get("id") == rollout_id:
                record = current
            elif last.get("id") == rollout_id:
                record = last
            if record is not None:
                events = record.get("events") or []
                for event in events[shown:]:
                    if on_event is not None:
                        on_event(event)
                shown = len(events)
            if record is last or last.get("id", 0) > rollout_id:  # (or merged into a later one)
                return {**last}
        if time.monotonic() > deadline:
            raise HealthCheckTimeout(
                f"rollout {rollout_id} of master {pid} did not end within {timeout_s:g} s",
                rolled_back=False,
            )
        time.sleep(POLL_INTERVAL_S)


def rollout_error(record: dict[str, Any]) -> RolloutFailed | None:
    """The ``RolloutFailed`` a finished rollout's record amounts to, or ``None`` if it completed."""
    if record.get("outcome") == "completed":
        return None
    reason = str(record.get("reason") or record.get("outcome"))
    pid = record.get("worker_pid")
    return RolloutFailed(
        reason, rolled_back=bool(record.get("rolled_back")), worker_pid=int(pid) if pid else None
    )
