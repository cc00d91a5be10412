"""The ``hotpatch`` command line (also ``python -m hotpatch``).

Owns the commands: each sub-command lives in its own private module of this package, listed in
``COMMANDS``; a module provides ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``, and may list in ``RENDERS`` the events it prints itself (``_output``). Only
the command line configures logging (a library never does): ``_output`` holds its rendering.

May import every other part of hotpatch (it sits at the top of the layering, with ``demo``);
nothing in hotpatch imports it.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from hotpatch._version import __version__
from hotpatch.cli import _args, _output

COMMANDS: tuple[str, ...] = (
    "hotpatch.cli._demo",
    "hotpatch.cli._run",
    "hotpatch.cli._rollout",
    "hotpatch.cli._deploy",
    "hotpatch.cli._status",
    "hotpatch.cli._patch",
    "hotpatch.cli._rollback",
    "hotpatch.cli._trial",
    "hotpatch.cli._history",
    "hotpatch.cli._check",
)


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Console rendering on a terminal, JSON lines otherwise (or when asked); see ``_output``."""
    _output.configure_logging(log_format, level)


def _logging_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """``--log-format``/``--log-level``, before or after the sub-command.

    The sub-command's copies default to ``SUPPRESS``, so they set the value only when given and
    never reset one given before the sub-command.
    """
    parser.add_argument(
        "--log-format",
        choices=_output.FORMATS,
        default="auto" if defaults else argparse.SUPPRESS,
        help="event rendering: console on a terminal, JSON lines otherwise (default: auto)",
    )
    parser.add_argument(
        "--log-level",
        choices=_output.LEVELS,
        default="info" if defaults else argparse.SUPPRESS,
        help="lowest level of the events shown (default: info)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _args.Parser(
        prog="hotpatch",
        description="Zero-downtime code changes for Python applications.",
        epilog="Colours only on a terminal and never with NO_COLOR set.",
    )
    parser.add_argument("--version", action="version", version=f"hotpatch {__version__}")
    _logging_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        command = importlib.import_module(module_name)
        command_parser = sub.add_parser(command.NAME, help=command.HELP, description=command.HELP)
        command.add_arguments(command_parser)
        _logging_options(command_parser, defaults=False)
        command_parser.set_defaults(run=command.run, renders=getattr(command, "RENDERS", ()))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    _output.configure_logging(args.log_format, args.log_level, renders=args.renders)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
