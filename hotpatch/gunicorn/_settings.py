"""Settings of the rolling engine: defaults, ``configure(...)`` in a config file, environment.

Precedence follows gunicorn's own (config file < ``GUNICORN_CMD_ARGS``): a value set by
``configure()`` is overridden by the matching ``HOTPATCH_*`` environment variable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hotpatch.errors import ConfigError

HealthCheckFn = Callable[[Any], object]
"""A check, called in each new worker with its loaded WSGI app: raise or return False to fail."""

ENV_VARS: dict[str, str] = {
    "health_path": "HOTPATCH_HEALTH_PATH",
    "boot_timeout_s": "HOTPATCH_BOOT_TIMEOUT",
    "health_timeout_s": "HOTPATCH_HEALTH_TIMEOUT",
    "settle_s": "HOTPATCH_SETTLE_TIME",
    "retire_timeout_s": "HOTPATCH_RETIRE_TIMEOUT",
    "app_dir": "HOTPATCH_APP_DIR",
    "state_dir": "HOTPATCH_STATE_DIR",
    "watch": "HOTPATCH_WATCH",
    "watch_interval_s": "HOTPATCH_WATCH_INTERVAL",
    "releases_dir": "HOTPATCH_RELEASES_DIR",
    "snapshot_exclude": "HOTPATCH_SNAPSHOT_EXCLUDE",
    "metrics_path": "HOTPATCH_METRICS_PATH",
    "metrics_port": "HOTPATCH_METRICS_PORT",
    "metrics_addr": "HOTPATCH_METRICS_ADDR",
}
_SECONDS = ("boot_timeout_s", "health_timeout_s", "settle_s", "retire_timeout_s")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
MIN_WATCH_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Settings:
    """How rollouts run.

    Attributes:
        health_path: the path each new worker requests from its own app (expects 2xx); ``None``
            means "``GET /`` answers without a 5xx".
        boot_timeout_s: a new worker that has not loaded the app by then is killed (rollout fails).
        health_timeout_s: the deadline for the health probe plus the user's checks.
        settle_s: after the last old worker is retired, how long every new worker must stay up
            before the rollout counts as completed.
        retire_timeout_s: a retired worker still running after this is killed (``None``: gunicorn's
            ``graceful_timeout`` plus 5 s).
        app_dir: the directory snapshotted as a release (``None``: gunicorn's ``chdir``).
        state_dir: where releases and ``state.json`` live (``None``: ``gunicorn-<master pid>`` in
            the runtime directory, see ``_state.state_dir_for``); it must be private to the
            master's user (mode 0700), or not exist yet under an existing parent.
        checks: extra checks run in each new worker after the health probe.
        watch: development mode: the master polls the app directory's Python sources and runs a
            rollout when one is saved with new content (instead of gunicorn's ``--reload``).
        watch_interval_s: the time between two polls of the app directory in watch mode.
        releases_dir: where release snapshots are kept (``None``: ``$XDG_STATE_HOME/hotpatch/
            releases`` or ``~/.local/state/hotpatch/releases``, out of temp cleaners' reach).
        snapshot_exclude: gitignore-like patterns of what a release leaves out, on top of the
            built-in rule (``hotpatch.gunicorn._fileset``); also never triggers watch mode.
        metrics_path: Prometheus metrics served by each worker's middleware at this WSGI path
            (needs ``hotpatch[prometheus]``; docs/metrics.md).
        metrics_port: Prometheus metrics of every worker served by the master on this port.
        metrics_addr: the address ``metrics_port`` listens on (default ``127.0.0.1``).
    """

    health_path: str | None = None
    boot_timeout_s: float = 30.0
    health_timeout_s: float = 10.0
    settle_s: float = 1.0
    retire_timeout_s: float | None = None
    app_dir: Path | None = None
    state_dir: Path | None = None
    checks: tuple[HealthCheckFn, ...] = field(default=())
    watch: bool = False
    watch_interval_s: float = 0.25
    releases_dir: Path | None = None
    snapshot_exclude: tuple[str, ...] = ()
    metrics_path: str | None = None
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"

    @property
    def exports_metrics(self) -> bool:
        """Whether Prometheus metrics are exported (a path or a port is set)."""
        return self.metrics_path is not None or self.metrics_port is not None


_configured: dict[str, Any] = {}


def configure(
    *,
    health_path: str | None = None,
    boot_timeout_s: float | None = None,
    health_timeout_s: float | None = None,
    settle_s: float | None = None,
    retire_timeout_s: float | None = None,
    app_dir: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    checks: Sequence[HealthCheckFn] | None = None,
    watch: bool | None = None,
    watch_interval_s: float | None = None,
    releases_dir: str | os.PathLike[str] | None = None,
    snapshot_exclude: Sequence[str] | None = None,
    metrics_path: str | None = None,
    metrics_port: int | None = None,
    metrics_addr: str | None = None,
) -> None:
    """Set rollout settings from a gunicorn config file (see ``Settings`` for each one).

    Arguments left as ``None`` keep their current value. Environment variables still win.

    Raises:
        ConfigError: a value is out of range or of the wrong type.
    """
    given: dict[str, Any] = {
        "health_path": health_path,
        "boot_timeout_s": boot_timeout_s,
        "health_timeout_s": health_timeout_s,
        "settle_s": settle_s,
        "retire_timeout_s": retire_timeout_s,
        "app_dir": app_dir,
        "state_dir": state_dir,
        "watch": watch,
        "watch_interval_s": watch_interval_s,
        "releases_dir": releases_dir,
        "snapshot_exclude": snapshot_exclude,
        "metrics_path": metrics_path,
        "metrics_port": metrics_port,
        "metrics_addr": metrics_addr,
    }
    for name, value in given.items():
        if value is not None:
            _configured[name] = _validate(name, value, source=f"configure({name}=...)")
    if checks is not None:
        for check in checks:
            if not callable(check):
                raise ConfigError(f"configure(checks=...): {check!r} is not callable")
        _configured["checks"] = tuple(checks)


def reset_configuration() -> None:
    """Forget every ``configure()`` call (for tests)."""
    _configured.clear()


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Merge defaults, ``configure()`` values and the environment into validated settings.

    Raises:
        ConfigError: an environment variable has a value hotpatch cannot use.
    """
    env = os.environ if environ is None else environ
    values = dict(_configured)
    for name, var in ENV_VARS.items():
        raw = env.get(var)
        if raw is not None and raw.strip() != "":
            values[name] = _validate(name, raw.strip(), source=f"environment variable {var}")
    return replace(Settings(), **values)


def _validate(name: str, value: object, *, source: str) -> Any:
    if name == "metrics_port":
        return _port(value, source=source)
    if name == "metrics_addr":
        if not isinstance(value, str) or not value or any(c.isspace() for c in value):
            raise ConfigError(f"{source}: expected an address to listen on, got {value!r}")
        return value
    if name in ("health_path", "metrics_path"):
        kind = name.split("_", maxsplit=1)[0]
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(f"{source}: the {kind} path must start with '/', got {value!r}")
        if any(c.isspace() for c in value):
            raise ConfigError(f"{source}: the {kind} path must not contain spaces: {value!r}")
        return value
    if name == "watch":
        return _flag(value, source=source)
    if name == "watch_interval_s":
        seconds = _seconds(value, source=source)
        if seconds < MIN_WATCH_INTERVAL_S:
            raise ConfigError(
                f"{source}: the watch interval must be at least {MIN_WATCH_INTERVAL_S} s "
                f"(shorter keeps the master busy scanning), got {value!r}"
            )
        return seconds
    if name in _SECONDS:
        return _seconds(value, source=source, allow_zero=name == "settle_s")
    if name == "snapshot_exclude":
        return _patterns(value, source=source)
    if name in ("app_dir", "state_dir", "releases_dir"):
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise ConfigError(f"{source}: expected a directory path, got {value!r}")
        path = Path(value).expanduser().absolute()
        if name == "app_dir" and not path.is_dir():
            raise ConfigError(f"{source}: {str(path)!r} is not a directory")
        return path
    raise ConfigError(f"{source}: unknown setting {name!r}")  # pragma: no cover


def _port(value: object, *, source: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{source}: expected a TCP port (1 to 65535), got {value!r}")
    try:
        port: int = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: expected a TCP port (1 to 65535), got {value!r}") from None
    if isinstance(value, float) or not 1 <= port <= 65535:
        raise ConfigError(f"{source}: expected a TCP port (1 to 65535), got {value!r}")
    return port


def _patterns(value: object, *, source: str) -> tuple[str, ...]:
    items: object = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise ConfigError(f"{source}: expected a list of patterns (comma-separated), got {value!r}")
    patterns = tuple(p.strip() for p in items if p.strip())
    for pattern in patterns:
        if not pattern.strip("/"):
            raise ConfigError(
                f"{source}: {pattern!r} is not a pattern (it would exclude everything)"
            )
    return patterns


def _seconds(value: object, *, source: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{source}: expected a number of seconds, got {value!r}")
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: expected a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ConfigError(f"{source}: expected {kind} number of seconds, got {value!r}")
    return seconds


def _flag(value: object, *, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ConfigError(
        f"{source}: expected one of 1, true, yes, on (watch) or 0, false, no, off (do not watch), "
        f"got {value!r}"
    )
