"""``hotpatch patch --pid PID``: apply the code on disk to a running process that listens."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hotpatch.control import send_request
from hotpatch.errors import HotpatchError

NAME = "patch"
HELP = (
    "hot-patch a running process (one that called hotpatch.listen) with the code now on disk: "
    "exit 0 when applied or unchanged, 1 when refused"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_process_arguments(parser)
    parser.add_argument(
        "--check",
        action="store_true",
        help="only run the guard (load, compile, execute, compatibility, verify): a dry run",
    )


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pid`` and ``--timeout``, shared with ``hotpatch rollback``."""
    parser.add_argument("--pid", type=int, required=True, help="the process's pid")
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="default: 60"
    )


def run(args: argparse.Namespace) -> int:
    return request(NAME, args.pid, "check" if args.check else "patch", timeout_s=args.timeout)


def request(command: str, pid: int, action: str, **options: Any) -> int:
    """Send one request to process ``pid``, print its result, return the exit code."""
    try:
        result = send_request(pid, action, **options)
    except HotpatchError as exc:
        print(f"hotpatch {command}: {exc}", file=sys.stderr)
        return 2
    return report(result)


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
        return 0
    if outcome == "unchanged":
        print(f"process {pid}: the code on disk is what runs; nothing to do")
        return 0
    if outcome == "rolled_back":
        print(f"process {pid}: {result.get('module')} rolled back to {result.get('version')}")
        return 0
    if outcome == "refused":
        print(f"refused: {result.get('message')}", file=sys.stderr)
        print(f"process {pid} still runs the previous version", file=sys.stderr)
        return 1
    print(f"error: {result.get('message')}", file=sys.stderr)
    return 2
