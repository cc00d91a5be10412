"""hotpatch: zero-downtime code changes for Python.

Swap a module inside a running process behind a verification guard, or roll gunicorn workers one at
a time; either way a broken change is refused or rolled back before it can hurt.

Package map (docs/architecture.md has the full table): ``engine/`` the in-process pipeline,
``watch/`` saves -> change sets, ``control/`` patching a running process from outside,
``gunicorn/`` the rolling engine, ``cli/`` the command line, ``demo/`` the live demonstration.
"""

from hotpatch._version import __version__
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
from hotpatch.watch import watch

__all__ = [
    "ConfigError",
    "Engine",
    "HealthCheckTimeout",
    "HotpatchError",
    "Listener",
    "PatchRejected",
    "PatchResult",
    "RolloutFailed",
    "Version",
    "__version__",
    "default_engine",
    "health_check",
    "history",
    "listen",
    "patch",
    "patch_many",
    "rollback",
    "track",
    "verifier",
    "watch",
]
