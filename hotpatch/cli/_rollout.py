"""``hotpatch rollout``: roll a gunicorn master's workers to the code on disk, one at a time."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hotpatch.errors import HotpatchError
from hotpatch.gunicorn._client import (
    read_pidfile,
    rollout_error,
    start_rollout,
    wait_for_rollout,
)

NAME = "rollout"
HELP = (
    "start a rolling reload of a gunicorn master running hotpatch's hooks, show its progress, "
    "exit 0 when every worker runs the new release (1 when it was rolled back)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_master_arguments(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up waiting after this long (default: 600)",
    )


def add_master_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pid`` / ``--pidfile`` / ``--state-dir``, shared with ``hotpatch status``."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--pid", type=int, help="the gunicorn master's pid")
    which.add_argument("--pidfile", help="gunicorn's pidfile (its -p option)")
    parser.add_argument(
        "--state-dir",
        help="the master's state directory, when it was started with HOTPATCH_STATE_DIR",
    )


def master_pid(args: argparse.Namespace) -> int:
    return int(args.pid) if args.pid is not None else read_pidfile(args.pidfile)


def describe_event(event: dict[str, Any]) -> str:
    """One progress line for a rollout event."""
    name = str(event.get("event"))
    t = f"{float(event.get('t', 0.0)):7.2f}s"
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
    }
    return f"{t}  {texts.get(name, name)}"


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    try:
        pid = master_pid(args)
        state_dir = args.state_dir
        rollout_id = start_rollout(pid, state_dir)
        print(f"rollout {rollout_id} requested from gunicorn master {pid}", file=out, flush=True)
        record = wait_for_rollout(
            pid,
            rollout_id,
            timeout_s=args.timeout,
            state_dir=state_dir,
            on_event=lambda event: print(describe_event(event), file=out, flush=True),
        )
    except HotpatchError as exc:
        print(f"hotpatch rollout: {exc}", file=sys.stderr)
        return 2
    error = rollout_error(record)
    if error is None:
        print(
            f"OK: rollout {rollout_id} completed in {record.get('duration_s')} s; "
            f"release {record.get('release')} is live",
            file=out,
        )
        return 0
    print(
        f"FAILED: rollout {record.get('id')} {record.get('outcome')}: {error.reason}",
        file=sys.stderr,
    )
    if record.get("error"):
        print(str(record["error"]).rstrip(), file=sys.stderr)
    return 1
