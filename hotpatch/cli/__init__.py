"""The ``hotpatch`` command line (also ``python -m hotpatch``).

Owns the commands: each sub-command lives in its own private module of this package, listed in
``COMMANDS``; a module provides ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Only this module configures logging (a library never does).

May import every other part of hotpatch (it sits at the top of the layering, with ``demo``);
nothing in hotpatch imports it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

import structlog

from hotpatch._version import __version__

COMMANDS: tuple[str, ...] = (
    "hotpatch.cli._demo",
    "hotpatch.cli._run",
    "hotpatch.cli._rollout",
    "hotpatch.cli._status",
    "hotpatch.cli._patch",
    "hotpatch.cli._rollback",
    "hotpatch.cli._history",
)


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Console rendering on a terminal, JSON lines otherwise (or when asked)."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_json:
        processors.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotpatch", description="Zero-downtime code changes for Python applications."
    )
    parser.add_argument("--version", action="version", version=f"hotpatch {__version__}")
    parser.add_argument(
        "--log-format",
        choices=("auto", "console", "json"),
        default="auto",
        help="log rendering (default: console on a terminal, JSON otherwise)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="lowest log level shown (default: info)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        command = importlib.import_module(module_name)
        command_parser = sub.add_parser(command.NAME, help=command.HELP, description=command.HELP)
        command.add_arguments(command_parser)
        command_parser.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    configure_logging(args.log_format, args.log_level)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
