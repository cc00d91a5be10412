"""Logging that follows the application: structlog's API, the host application's sink.

hotpatch runs inside other people's processes: a web app, a gunicorn master, a test run. Its
events (``patch.committed``, ``rollout.started``) are written with structlog's API, but a library
that calls ``structlog.get_logger()`` while the application never configured structlog prints
every event, debug included, to standard output, whatever the application decided about logging.
An app that set stdlib logging to WARNING still saw hotpatch's info lines, and under gunicorn the
events went to stdout instead of gunicorn's error log.

So the sink is decided by the application, at each call (never frozen at import): when the
application configured structlog itself (``structlog.is_configured()``), events go through its
pipeline, exactly as ``structlog.get_logger(__name__)`` would send them. Otherwise they are stdlib
``logging`` records of the logger named after the module (``hotpatch.engine.pipeline``), filtered
by that logger's effective level and handled by the application's handlers; the message reads
``event key=value ...``, the record carries ``hotpatch_event`` and ``hotpatch_fields`` for
structured handlers, its file and line are those of the hotpatch call, and ``exc_info`` makes a
traceback the stdlib way. Inside gunicorn (its ``gunicorn.error`` logger is set up) and unless the
application configured the ``hotpatch`` logger itself, records go to gunicorn's error logger, so
events land where gunicorn's error log goes, at its ``--log-level``.

The mechanism is ``get_logger(name)``: a cheap proxy holding a name and bound context, with
structlog's bound-logger methods (``bind``, ``debug`` ... ``exception``). The stdlib path never
imports structlog (importing it costs more than hotpatch's engine) and nothing here configures
logging: no handler is added anywhere, ``structlog.configure`` is never called. A failure inside
the application's structlog pipeline falls back to the stdlib path, so logging never raises into
hotpatch's callers (a gunicorn master loop among them).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["Logger", "get_logger"]

_METHOD_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_PLAIN_UNSAFE = frozenset(" \t\r\n=\"'\\")
_stdlib_loggers: dict[str, logging.Logger] = {}


class Logger:
    """A structlog-style bound logger whose sink is chosen when each event is logged.

    Use ``get_logger(__name__)`` at module scope and ``bind()`` inside functions, as with
    structlog. Every method takes the event name (``<noun>.<past_tense_verb>``) and context as
    keyword arguments; ``exc_info`` is honoured by every method and implied by ``exception``.
    """

    __slots__ = ("_context", "_name")

    def __init__(self, name: str, context: Mapping[str, Any] | None = None) -> None:
        self._name = name
        self._context: dict[str, Any] = dict(context or {})

    @property
    def name(self) -> str:
        """The logger's name (the module's ``__name__``)."""
        return self._name

    def bind(self, **new_values: Any) -> Logger:
        """Return a new logger whose events also carry ``new_values``."""
        return Logger(self._name, {**self._context, **new_values})

    def debug(self, event: str, *args: Any, **kw: Any) -> None:
        """Log ``event`` at debug level."""
        self._emit("debug", event, args, kw)

    def info(self, event: str, *args: Any, **kw: Any) -> None:
        """Log ``event`` at info level."""
        self._emit("info", event, args, kw)

    def warning(self, event: str, *args: Any, **kw: Any) -> None:
        """Log ``event`` at warning level."""
        self._emit("warning", event, args, kw)

    warn = warning

    def error(self, event: str, *args: Any, **kw: Any) -> None:
        """Log ``event`` at error level."""
        self._emit("error", event, args, kw)

    def critical(self, event: str, *args: Any, **kw: Any) -> None:
        """Log ``event`` at critical level."""
        self._emit("critical", event, args, kw)

    def exception(self, event: str, *args: Any, **kw: Any) -> None:
        """Log ``event`` at error level with the exception being handled (its traceback)."""
        kw.setdefault("exc_info", True)
        self._emit("error", event, args, kw)

    def _emit(self, method: str, event: str, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        structlog = sys.modules.get("structlog")
        if structlog is not None and structlog.is_configured():
            try:
                bound = structlog.get_logger(self._name, **self._context)
                getattr(bound, method)(event, *args, **kw)
            except Exception:  # the app's pipeline failed: the event still goes somewhere
                pass
            else:
                return
        self._to_stdlib(_METHOD_LEVELS[method], event, args, kw)

    def _to_stdlib(self, level: int, event: str, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        logger = _stdlib_loggers.get(self._name)
        if logger is None:  # logging keeps every logger it made: the same object for a name
            logger = _stdlib_loggers.setdefault(self._name, logging.getLogger(self._name))
        target = _gunicorn_error_log(logger) or logger
        if not target.isEnabledFor(level):
            return
        try:
            exc_info = _exc_info(kw.pop("exc_info", None))
            if args:
                event = _percent_format(event, args)
            fields = dict(self._context)
            contextvars = sys.modules.get("structlog.contextvars")
            if contextvars is not None:
                fields = {**contextvars.get_contextvars(), **fields}
            fields.update(kw)
            message = " ".join(
                [event, *(f"{key}={_render(value)}" for key, value in fields.items())]
            )
            caller = sys._getframe(3)  # _to_stdlib <- _emit <- Logger.info <- the hotpatch code
            record = target.makeRecord(
                self._name,
                level,
                caller.f_code.co_filename,
                caller.f_lineno,
                message,
                (),
                exc_info,
                func=caller.f_code.co_name,
                extra={"hotpatch_event": event, "hotpatch_fields": fields},
            )
            target.handle(record)
        except Exception:  # a logging failure must never become the caller's failure
            with contextlib.suppress(Exception):
                sys.stderr.write(f"hotpatch: could not log event {event!r}\n")


def get_logger(name: str) -> Logger:
    """The logger for module ``name``: call at module scope (``get_logger(__name__)``).

    Returns:
        A proxy with structlog's bound-logger methods that decides at each event whether it goes
        through the application's structlog configuration or to stdlib ``logging``.
    """
    return Logger(name)


def _gunicorn_error_log(logger: logging.Logger) -> logging.Logger | None:
    """gunicorn's error logger when this process is gunicorn's and ``hotpatch`` is not configured.

    gunicorn sets up ``gunicorn.error`` (level and handlers) from ``--log-level`` and
    ``--error-logfile`` in the master before any hook runs; workers inherit it. An application
    that gave ``hotpatch`` (or a sub-logger) its own level, handlers or propagation keeps them.
    """
    if "gunicorn" not in sys.modules:
        return None
    error_log = logging.Logger.manager.loggerDict.get("gunicorn.error")
    if not isinstance(error_log, logging.Logger) or not error_log.handlers:
        return None
    current: logging.Logger | None = logger
    while current is not None and current.name.startswith("hotpatch"):
        if current.handlers or current.level != logging.NOTSET or not current.propagate:
            return None
        current = current.parent
    return error_log


def _exc_info(value: object) -> Any:
    """``exc_info`` as stdlib logging takes it: an exception, a triple, or True (the current one)."""
    if value is None or value is False:
        return None
    if isinstance(value, BaseException):
        return (type(value), value, value.__traceback__)
    if isinstance(value, tuple):
        return value
    info = sys.exc_info()
    return info if info[0] is not None else None


def _percent_format(event: str, args: tuple[Any, ...]) -> str:
    try:
        return event % args
    except Exception:
        return " ".join([event, *map(_render, args)])


def _render(value: object) -> str:
    """A value as it reads after ``key=``: plain when unambiguous, else its ``repr``."""
    try:
        if (
            isinstance(value, str)
            and value
            and value.isprintable()
            and _PLAIN_UNSAFE.isdisjoint(value)
        ):
            return value
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"
