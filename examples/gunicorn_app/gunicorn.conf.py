"""gunicorn config for the example: your own settings, plus hotpatch's rolling reload hooks."""

import hotpatch.gunicorn
from hotpatch.gunicorn import (
    child_exit,
    nworkers_changed,
    on_exit,
    post_fork,
    post_worker_init,
    when_ready,
    worker_exit,
)

workers = 4
worker_class = "sync"
graceful_timeout = 10

hotpatch.gunicorn.configure(health_path="/healthz", boot_timeout_s=20, health_timeout_s=5)

__all__ = [
    "child_exit",
    "nworkers_changed",
    "on_exit",
    "post_fork",
    "post_worker_init",
    "when_ready",
    "worker_exit",
]
