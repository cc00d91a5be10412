"""``hotpatch rollback --pid PID MODULE``: restore a module's previous version in a process."""

from __future__ import annotations

import argparse

from hotpatch.cli._patch import add_process_arguments, request

NAME = "rollback"
HELP = (
    "roll a module of a running process (one that called hotpatch.listen) back to its previous "
    "version, or to --to VERSION from its history (`hotpatch history --pid`); exit codes as patch"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_process_arguments(parser)
    parser.add_argument("module", help="the module to roll back, e.g. myapp.pricing")
    parser.add_argument("--to", metavar="VERSION", help="a version id from the module's history")


def run(args: argparse.Namespace) -> int:
    return request(
        NAME, args.pid, "rollback", module=args.module, to=args.to, timeout_s=args.timeout
    )
