"""Argument checks for the public engine and watch APIs: fail at once, in one line, naming the argument.

A wrong argument found late is worse than one refused at the call: ``Engine(safepoint_timeout_s="abc")``
used to be accepted and fail inside the first commit with a ``TypeError`` from a comparison, and a
NaN timeout compared false with everything, so it meant "wait forever" or "never wait" depending on
the comparison. Each setting is checked here when it is given, with the argument's name in the
message: a value of the wrong type raises ``TypeError``, a value of the right type that cannot be
used raises ``ConfigError`` (a ``ValueError``). Pure functions, no state.
"""

from __future__ import annotations

import math
import sys
import types

from hotpatch.errors import ConfigError


def check_seconds(name: str, value: object, *, allow_zero: bool = True) -> float:
    """Return ``value`` as a float number of seconds, or raise naming ``name``.

    Raises:
        TypeError: not an int or a float (``bool`` included: ``True`` is not a duration).
        ConfigError: NaN, infinite, negative, or zero when ``allow_zero`` is false.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise ConfigError(f"{name} must be a finite number of seconds, got {value!r}")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound} seconds, got {value!r}")
    return seconds


def check_optional_seconds(name: str, value: object) -> float | None:
    """``None`` (use the default) or a valid number of seconds (``check_seconds``)."""
    return None if value is None else check_seconds(name, value)


def check_count(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` as an int of at least ``minimum``, or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value!r}")
    return value


def check_module_name(name: str, value: object) -> str:
    """A non-empty ``str`` module name, or raise naming the argument ``name``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a module name (str), not {type(value).__name__}")
    if not value or value.strip() != value:
        raise ConfigError(f"{name} must be a module name, got {value!r}")
    return value


def require_imported(name: str, module: str, *, hint: str = "") -> types.ModuleType:
    """The imported module ``module``, or ``ConfigError`` naming the argument ``name``."""
    found = sys.modules.get(module)
    if not isinstance(found, types.ModuleType):
        raise ConfigError(f"{name}: module {module!r} is not imported{hint}")
    return found
