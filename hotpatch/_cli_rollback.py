"""``hotpatch rollback --pid PID MODULE``: restore a module's previous version in a process."""

from __future__ import annotations

import argparse
import sys

from hotpatch._cli_patch import report
from hotpatch.control import send_request
from hotpatch.errors import HotpatchError

NAME = "rollback"
HELP = (
    "roll a module of a running process (one that called hotpatch.listen) back to its previous "
    "version, or to --to VERSION from its history"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pid", type=int, required=True, help="the process's pid")
    parser.add_argument("module", help="the module to roll back, e.g. myapp.pricing")
    parser.add_argument("--to", metavar="VERSION", help="a version id from the module's history")
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="default: 60"
    )


def run(args: argparse.Namespace) -> int:
    try:
        result = send_request(
            args.pid, "rollback", module=args.module, to=args.to, timeout_s=args.timeout
        )
    except HotpatchError as exc:
        print(f"hotpatch {NAME}: {exc}", file=sys.stderr)
        return 2
    return report(result)
