"""Shared output of the commands: one rendering of each event, console or JSON, ``NO_COLOR``.

The command line is the one place where hotpatch configures logging (it is the application
there). Events reach standard error in two ways: log events of the library (``patch.applied``,
``watch.change_refused``), and lines a command prints itself because it can say the same fact
better to a person (``hotpatch run``'s "applied greeting.py in 25 ms"). Printing both wrote every
event twice, and with ``--log-format json`` half the lines were not JSON.

So there is one rule per format. JSON: every event line on standard error is a JSON object (the
library's events, rendered by structlog); a command's human lines are not printed. Console: a
command prints its human line, and the library events it renders that way (its ``RENDERS``) are
dropped from the log, so each event appears once. Colours only on a terminal, never when
``NO_COLOR`` is set to anything but the empty string (https://no-color.org).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Collection, MutableMapping
from typing import Any, TextIO

import structlog

FORMATS = ("auto", "console", "json")
LEVELS = ("debug", "info", "warning", "error")

_json = False
_rendered: frozenset[str] = frozenset()
_watchdog_handler: logging.Handler | None = None


def resolve_format(log_format: str, stream: TextIO) -> str:
    """``auto`` is ``console`` on a terminal and ``json`` otherwise."""
    if log_format == "auto":
        return "console" if stream.isatty() else "json"
    return log_format


def use_color(stream: TextIO) -> bool:
    """Colours on a terminal, unless ``NO_COLOR`` is set (and not empty)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def configure_logging(
    log_format: str = "auto", level: str = "info", *, renders: Collection[str] = ()
) -> str:
    """Configure structlog for the command line; returns the format in force.

    Args:
        log_format: ``auto``, ``console`` or ``json``.
        level: the lowest level shown.
        renders: event names the command prints itself in console mode (dropped from the log
            there, so that each event is printed once).

    Returns:
        ``console`` or ``json``.
    """
    global _json, _rendered
    stream = sys.stderr
    resolved = resolve_format(log_format, stream)
    _json = resolved == "json"
    _rendered = frozenset(renders)
    stamp: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    render: list[structlog.typing.Processor]
    if _json:
        render = [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        render = [structlog.dev.ConsoleRenderer(colors=use_color(stream))]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, _drop_rendered, *stamp, *render],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _render_watchdog(stream, level, [structlog.stdlib.add_logger_name, *stamp], render)
    return resolved


def _render_watchdog(
    stream: TextIO,
    level: str,
    stamp: list[structlog.typing.Processor],
    render: list[structlog.typing.Processor],
) -> None:
    """watchdog (the observer of ``hotpatch run`` and ``watch``) logs through the standard library.

    With no handler anywhere its records reached standard error raw, through logging's last
    resort, and a ``--log-format json`` stream had lines that were not JSON. Its records are now
    rendered like hotpatch's own events, by one handler on the ``watchdog`` logger, which stops
    them there (the program's own root handlers, if it configures any, would print them again).
    """
    global _watchdog_handler
    watchdog_log = logging.getLogger("watchdog")
    if _watchdog_handler is not None:
        watchdog_log.removeHandler(_watchdog_handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=stamp,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
        )
    )
    handler.setLevel(logging.getLevelName(level.upper()))
    watchdog_log.addHandler(handler)
    watchdog_log.propagate = False
    _watchdog_handler = handler


def is_json() -> bool:
    """Whether events are rendered as JSON lines."""
    return _json


def human(text: str, *, file: TextIO | None = None) -> None:
    """Print a command's own line for an event: in console mode only (JSON has the event)."""
    if not _json:
        print(text, file=file or sys.stderr, flush=True)


def _drop_rendered(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if not _json and event_dict.get("event") in _rendered:
        raise structlog.DropEvent
    return event_dict
