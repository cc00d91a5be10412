"""hotpatch: zero-downtime code changes for Python.

Swap a module inside a running process behind a verification guard, or roll gunicorn workers one at
a time; either way a broken change is refused or rolled back before it can hurt.

Package map (docs/architecture.md has the full table): ``engine/`` the in-process pipeline,
``watch/`` saves -> change sets, ``control/`` patching a running process from outside,
``trial/`` parallel runs (canary, shadow, experiment),
``gunicorn/`` the rolling engine, ``cli/`` the command line, ``demo/`` the live demonstration.

The names below load on first use (PEP 562 ``__getattr__``): ``import hotpatch`` costs almost
nothing, so a process (or a pytest run, through the plugin) that has hotpatch installed but does
not use it pays nothing, and ``from hotpatch import patch`` loads the in-process engine and no
more (no watchdog, no gunicorn, no control socket). Static type checkers read the imports under
``TYPE_CHECKING``; ``__all__`` and ``dir()`` list every public name.
"""

import sys

from hotpatch._version import __version__

# typing.TYPE_CHECKING without importing typing (and re, functools, ... with it); type checkers
# treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from hotpatch.control import Listener, listen
    from hotpatch.engine import (
        Engine,
        PatchResult,
        default_engine,
        health_check,
        history,
        patch,
        patch_many,
        rollback,
        track,
        verifier,
    )
    from hotpatch.engine.history import Version
    from hotpatch.errors import (
        ConfigError,
        HealthCheckTimeout,
        HotpatchError,
        PatchRejected,
        RolloutFailed,
    )
    from hotpatch.routing import ASGIRoutingKeyMiddleware, RoutingKeyMiddleware, routing_key
    from hotpatch.trial import Trial, TrialResult, canary, experiment, record, shadow
    from hotpatch.watch import watch

__all__ = [
    "ASGIRoutingKeyMiddleware",
    "ConfigError",
    "Engine",
    "HealthCheckTimeout",
    "HotpatchError",
    "Listener",
    "PatchRejected",
    "PatchResult",
    "RolloutFailed",
    "RoutingKeyMiddleware",
    "Trial",
    "TrialResult",
    "Version",
    "__version__",
    "canary",
    "default_engine",
    "experiment",
    "health_check",
    "history",
    "listen",
    "patch",
    "patch_many",
    "record",
    "rollback",
    "routing_key",
    "shadow",
    "track",
    "verifier",
    "watch",
]

# Where each public name lives; imported on first access.
_SOURCES = {
    "Listener": "hotpatch.control",
    "listen": "hotpatch.control",
    **dict.fromkeys(
        (
            "Engine",
            "PatchResult",
            "default_engine",
            "health_check",
            "history",
            "patch",
            "patch_many",
            "rollback",
            "track",
            "verifier",
        ),
        "hotpatch.engine",
    ),
    "Version": "hotpatch.engine.history",
    **dict.fromkeys(
        ("ConfigError", "HealthCheckTimeout", "HotpatchError", "PatchRejected", "RolloutFailed"),
        "hotpatch.errors",
    ),
    "watch": "hotpatch.watch",
    **dict.fromkeys(
        ("Trial", "TrialResult", "canary", "experiment", "record", "shadow"), "hotpatch.trial"
    ),
    **dict.fromkeys(
        ("ASGIRoutingKeyMiddleware", "RoutingKeyMiddleware", "routing_key"), "hotpatch.routing"
    ),
}
# Parts that ``import hotpatch`` used to load, still reachable as attributes.
_PARTS = frozenset({"control", "engine", "errors"})


class _Facade(type(sys)):  # type: ignore[misc]  # types.ModuleType, without importing types
    """The ``hotpatch`` module: keeps ``hotpatch.watch`` the function.

    Importing the subpackage ``hotpatch.watch`` makes the import system set the attribute
    ``watch`` of this package to the subpackage; the public name is the function, as it was when
    every name was imported eagerly. The subpackage stays in ``sys.modules``.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in _SOURCES and isinstance(value, type(sys)):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Facade

if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        import importlib

        if name in _SOURCES:
            value = getattr(importlib.import_module(_SOURCES[name]), name)
        elif name in _PARTS:
            value = importlib.import_module(f"{__name__}.{name}")
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})


del TYPE_CHECKING  # not a public name
