"""``hotpatch rollout``: roll a gunicorn master's workers to the code on disk, one at a time.

Exit codes (also in ``--help`` and docs/gunicorn.md): 0 every worker runs the new release; 1 the
rollout failed, was rolled back or refused; 2 it could not be started (bad arguments, no such
master, no trustworthy state); 3 the outcome is unknown: the client stopped waiting (``--timeout``)
and the rollout is still running in the master.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hotpatch.cli import _args
from hotpatch.errors import HotpatchError
from hotpatch.gunicorn._client import (
    RolloutStillRunning,
    read_pidfile,
    rollout_error,
    start_rollout,
    wait_for_rollout,
)

NAME = "rollout"
EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_NOT_STARTED = 2
EXIT_STILL_RUNNING = 3
HELP = (
    "start a rolling reload of a gunicorn master running hotpatch's hooks and show its progress; "
    "exit 0: every worker runs the new release, 1: failed, rolled back or refused, 2: could not "
    "start, 3: outcome unknown, still running in the master after --timeout"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_master_arguments(parser)
    parser.add_argument(
        "--timeout",
        type=_args.wait_seconds,
        default=600.0,
        metavar="SECONDS",
        help="stop waiting after this long; the rollout goes on in the master and the exit code "
        "is 3, outcome unknown (default: 600; 0: do not wait)",
    )


def add_master_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pid`` / ``--pidfile`` / ``--state-dir``, shared with ``hotpatch status``."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--pid", type=_args.pid, help="the gunicorn master's pid")
    which.add_argument("--pidfile", help="gunicorn's pidfile (its -p option)")
    parser.add_argument(
        "--state-dir",
        help="the master's state directory, when it was started with HOTPATCH_STATE_DIR",
    )


def master_pid(args: argparse.Namespace) -> int:
    """The pid from ``--pid`` or ``--pidfile``.

    Raises:
        ConfigError: not a positive process id (the message names the argument).
    """
    if args.pid is None:
        return read_pidfile(args.pidfile)
    return int(args.pid)


def describe_event(event: dict[str, Any]) -> str:
    """One progress line for a rollout event."""
    name = str(event.get("event"))
    try:
        t = f"{float(event.get('t', 0.0)):7.2f}s"
    except (TypeError, ValueError):  # the master writes a number; show anything else as unknown
        t = "      ?s"
    pid = event.get("worker_pid")
    release = event.get("release")
    texts = {
        "rollout.started": f"rollout of {release} started (known-good {event.get('known_good')}, "
        f"{event.get('size')} workers)",
        "worker.spawned": f"worker {pid} spawned on {release}",
        "worker.healthy": f"worker {pid} healthy ({event.get('check_s')} s check)",
        "worker.retired": f"worker {pid} ({release}) retired",
        "worker.failed": f"worker {pid} FAILED: {event.get('reason')}",
        "worker.killed": f"worker {pid} killed: {event.get('reason')}",
        "rollout.failed": f"rollout FAILED: {event.get('reason')}; rolling back to "
        f"{event.get('known_good')}",
        "rollout.completed": f"rollout completed: every worker runs {release}",
        "rollout.rolled_back": f"rolled back: every worker runs {release}",
        "rollout.rollback_failed": f"ROLLBACK FAILED: {event.get('reason')}",
        "canary.passed": "canary passed: the rest of the workers roll",
        "canary.failed": f"canary FAILED: {event.get('reason')}; retiring it",
    }
    return f"{t}  {texts.get(name, name)}"


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    try:
        pid = master_pid(args)
        timeout_s = args.timeout
        state_dir = args.state_dir
        rollout_id = start_rollout(pid, state_dir)
    except HotpatchError as exc:
        print(f"hotpatch rollout: {exc}", file=sys.stderr)
        return EXIT_NOT_STARTED
    print(f"rollout {rollout_id} requested from gunicorn master {pid}", file=out, flush=True)
    try:
        record = wait_for_rollout(
            pid,
            rollout_id,
            timeout_s=timeout_s,
            state_dir=state_dir,
            on_event=lambda event: print(describe_event(event), file=out, flush=True),
        )
    except RolloutStillRunning as exc:
        print(f"UNKNOWN: {exc}", file=sys.stderr)
        return EXIT_STILL_RUNNING
    except HotpatchError as exc:  # the master exited: the rollout did not complete
        print(f"FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    error = rollout_error(record)
    if error is None:
        print(
            f"OK: rollout {rollout_id} completed in {record.get('duration_s')} s; "
            f"release {record.get('release')} is live",
            file=out,
        )
        return EXIT_COMPLETED
    back = "rolled back" if error.rolled_back else "NOT rolled back"
    print(
        f"FAILED: rollout {record.get('id')} {record.get('outcome')} ({back}): {error.reason}",
        file=sys.stderr,
    )
    if record.get("error"):
        print(str(record["error"]).rstrip(), file=sys.stderr)
    return EXIT_FAILED
