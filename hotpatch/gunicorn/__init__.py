"""Rolling, health-checked, automatically rolled-back reloads of gunicorn workers.

Use it as the whole gunicorn config::

    gunicorn -c python:hotpatch.gunicorn app:app

or from an existing ``gunicorn.conf.py``, either all at once::

    import hotpatch.gunicorn
    hotpatch.gunicorn.install(globals(), health_path="/healthz")

or hook by hook, calling hotpatch's functions from your own hooks (same names, same arity)::

    from hotpatch.gunicorn import nworkers_changed, when_ready, post_fork, post_worker_init
    from hotpatch.gunicorn import child_exit, worker_exit, on_exit

Then ``kill -HUP <master pid>`` (or ``hotpatch rollout --pid <master pid>``) replaces the workers
one at a time, each new one health-checked before an old one is retired, and rolls back to the
known-good release on any failure. See ``docs/gunicorn.md``.

Only hooks live at the top level of this module: gunicorn reads every module-level name that
matches one of its settings.

Owns the rolling engine: the config hook (here), the master side (``_master``: signals, the
rollout driven from gunicorn's loop, ``_watch``: the master's source scan), the pure rollout state
machine (``_machine``), the worker side (``_worker``: pinning, the in-worker health probe),
releases (``_releases``: snapshots and pinning), settings, the on-disk state and its client,
and deploys (``_deploy``: the pure decisions; ``_coordinator``: ``hotpatch deploy``'s two-phase
commit across the workers, which listen on the control channel).
May import: ``hotpatch.errors``, ``hotpatch.health``, ``hotpatch.rundir``, ``hotpatch.watch``'s
pure helpers, ``hotpatch.control`` (worker sockets, deploy sessions). Never imports cli or demo.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

from hotpatch.gunicorn._master import (
    check_settings,
    current_controller,
    install_controller,
    run_contained,
)
from hotpatch.gunicorn._settings import HealthCheckFn
from hotpatch.gunicorn._settings import configure as _configure
from hotpatch.gunicorn._worker import check_worker, note_worker_exit, prepare_worker

__all__ = [
    "HOOK_NAMES",
    "child_exit",
    "configure",
    "install",
    "nworkers_changed",
    "on_exit",
    "post_fork",
    "post_worker_init",
    "when_ready",
    "worker_exit",
]

HOOK_NAMES = (
    "nworkers_changed",
    "when_ready",
    "post_fork",
    "post_worker_init",
    "child_exit",
    "worker_exit",
    "on_exit",
)

configure = _configure


def nworkers_changed(server: Any, new_value: int, old_value: int | None) -> None:
    """gunicorn hook (master): at its first call, before gunicorn listens, check the settings.

    A bad ``HOTPATCH_*`` value prints one line naming it and stops gunicorn with exit code 2.
    """
    if old_value is None:
        check_settings(server)


def when_ready(server: Any) -> None:
    """gunicorn hook (master): snapshot the boot release and take over SIGHUP."""
    install_controller(server)


def post_fork(server: Any, worker: Any) -> None:
    """gunicorn hook (new worker, before the app loads): pin the worker to its release."""
    controller = current_controller()
    plan = controller.plan_for_new_worker() if controller is not None else None
    if plan is not None:
        prepare_worker(worker, plan)


def post_worker_init(worker: Any) -> None:
    """gunicorn hook (worker, app loaded, before the first request): run the health check."""
    check_worker(worker)


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook (master, a worker was reaped): tell the rollout."""
    controller = current_controller()
    if controller is not None and isinstance(worker.pid, int):
        run_contained("child_exit", controller.child_exited, None, worker.pid)
        if controller.exports_metrics:
            from hotpatch.gunicorn import _prometheus

            run_contained("child_exit", _prometheus.worker_exited, None, worker.pid)


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn hook (worker, exiting): note a ``max_requests`` recycling, which is no crash."""
    note_worker_exit(worker)


def on_exit(server: Any) -> None:
    """gunicorn hook (master, exiting): remove the state directory."""
    controller = current_controller()
    if controller is not None and controller.arbiter is server:
        run_contained("on_exit", controller.cleanup, None)


_HOOKS = {
    "nworkers_changed": nworkers_changed,
    "when_ready": when_ready,
    "post_fork": post_fork,
    "post_worker_init": post_worker_init,
    "child_exit": child_exit,
    "worker_exit": worker_exit,
    "on_exit": on_exit,
}


def install(
    namespace: MutableMapping[str, Any],
    *,
    health_path: str | None = None,
    boot_timeout_s: float | None = None,
    health_timeout_s: float | None = None,
    settle_s: float | None = None,
    checks: Sequence[HealthCheckFn] | None = None,
    **settings: Any,
) -> None:
    """Add hotpatch's hooks to a gunicorn config module's namespace (pass ``globals()``).

    A hook the config already defines is kept and called after hotpatch's (before it for
    ``on_exit``). Keyword arguments go to ``configure``.

    Raises:
        ConfigError: a setting is invalid.
    """
    configure(
        health_path=health_path,
        boot_timeout_s=boot_timeout_s,
        health_timeout_s=health_timeout_s,
        settle_s=settle_s,
        checks=checks,
        **settings,
    )
    for name, hook in _HOOKS.items():
        existing = namespace.get(name)
        if existing is None or existing is hook:
            namespace[name] = hook
        else:
            namespace[name] = _chain(name, hook, existing)


def _chain(name: str, ours: Any, theirs: Any) -> Any:
    first, second = (theirs, ours) if name == "on_exit" else (ours, theirs)
    if name == "post_worker_init":

        def chained_one(worker: Any) -> None:
            first(worker)
            second(worker)

        chained_one.__name__ = name
        return chained_one
    if name in ("when_ready", "on_exit"):

        def chained_server(server: Any) -> None:
            first(server)
            second(server)

        chained_server.__name__ = name
        return chained_server
    if name == "nworkers_changed":

        def chained_three(server: Any, new_value: int, old_value: int | None) -> None:
            first(server, new_value, old_value)
            second(server, new_value, old_value)

        chained_three.__name__ = name
        return chained_three

    def chained_two(server: Any, worker: Any) -> None:
        first(server, worker)
        second(server, worker)

    chained_two.__name__ = name
    return chained_two
