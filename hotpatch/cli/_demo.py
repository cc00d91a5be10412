"""``hotpatch demo``: a live demonstration on an embedded app (filled in below)."""

from __future__ import annotations

import argparse

from hotpatch.cli import _args

NAME = "demo"
HELP = "run a live demonstration: patches applied, refused and rolled back under load"
# The in-process part narrates these outcomes itself: on the console they are not logged again.
RENDERS = ("patch.applied", "patch.rejected", "patch.rolled_back", "health_check.failed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clients",
        type=_args.positive_int,
        default=4,
        help="concurrent HTTP clients in the in-process part (default: 4)",
    )


def run(args: argparse.Namespace) -> int:
    from hotpatch.demo import run_demo

    return run_demo(clients=args.clients)
