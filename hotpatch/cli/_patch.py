"""``hotpatch patch --pid PID``: apply the code on disk to a running process that listens.

Exit codes, shared by ``patch``, ``rollback`` and ``history``:

- 0: done (applied, unchanged, would apply, rolled back, history shown);
- 1: refused (the process still runs the previous version);
- 2: error (wrong argument, no such process, not listening, unsafe path, request error);
- 3: outcome unknown (no answer in time, or the connection broke after the request was sent):
  the request may still be running in the process; ``hotpatch history --pid`` tells.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hotpatch.cli import _args
from hotpatch.control import OutcomeUnknown, send_request
from hotpatch.errors import HotpatchError

NAME = "patch"
HELP = (
    "hot-patch a running process (one that called hotpatch.listen) with the code now on disk: "
    "exit 0 applied or unchanged, 1 refused, 2 error, 3 outcome unknown (no answer in time)"
)
EXIT_DONE, EXIT_REFUSED, EXIT_ERROR, EXIT_UNKNOWN = 0, 1, 2, 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_process_arguments(parser)
    parser.add_argument(
        "--check",
        action="store_true",
        help="only run the guard (load, compile, execute, compatibility, verify): a dry run",
    )


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pid`` and ``--timeout``, shared with ``hotpatch rollback`` and ``hotpatch history``."""
    parser.add_argument("--pid", type=_args.pid, required=True, help="the process's pid")
    parser.add_argument(
        "--timeout",
        type=_args.seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the answer (default: 60); when it passes, exit 3: the "
        "request may still be running in the process",
    )


def run(args: argparse.Namespace) -> int:
    return request(NAME, args.pid, "check" if args.check else "patch", timeout_s=args.timeout)


def ask(command: str, pid: int, action: str, **options: Any) -> dict[str, Any] | int:
    """Send one request; its answer, or the exit code after printing why there is none."""
    try:
        return send_request(pid, action, **options)
    except OutcomeUnknown as exc:
        print(f"hotpatch {command}: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    except HotpatchError as exc:
        print(f"hotpatch {command}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def request(command: str, pid: int, action: str, **options: Any) -> int:
    """Send one request to process ``pid``, print its result, return the exit code."""
    answer = ask(command, pid, action, **options)
    return answer if isinstance(answer, int) else report(answer)


def report(result: dict[str, Any]) -> int:
    """Print a request's result; the exit code: 0 done, 1 refused, 2 error."""
    outcome = result.get("outcome")
    pid = result.get("pid")
    if outcome in ("applied", "patchable"):
        verb = "applied" if outcome == "applied" else "would apply (dry run)"
        for item in result.get("results", []):
            changed = ", ".join(item.get("changed") or []) or "nothing"
            print(
                f"{verb} {item['module']} {item['previous']} -> {item['version']}: changed {changed}"
                + (f"; added {', '.join(item['added'])}" if item.get("added") else "")
                + (f"; removed {', '.join(item['removed'])}" if item.get("removed") else "")
            )
        return EXIT_DONE
    if outcome == "unchanged":
        print(f"process {pid}: the code on disk is what runs; nothing to do")
        return EXIT_DONE
    if outcome == "rolled_back":
        print(f"process {pid}: {result.get('module')} rolled back to {result.get('version')}")
        return EXIT_DONE
    if outcome == "refused":
        print(f"refused: {result.get('message')}", file=sys.stderr)
        print(f"process {pid} still runs the previous version", file=sys.stderr)
        return EXIT_REFUSED
    print(f"error: {result.get('message')}", file=sys.stderr)
    return EXIT_ERROR
