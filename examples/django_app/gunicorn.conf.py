"""gunicorn config for the Django example: sync workers, plus hotpatch's rolling reload hooks."""

import hotpatch.gunicorn

workers = 4
worker_class = "sync"
graceful_timeout = 10
raw_env = ["DJANGO_SETTINGS_MODULE=mysite.settings"]
# No preload_app: each worker must import the app itself, so a new worker can load new code.

# Adds the seven hooks (post_fork, post_worker_init, ...) to this module, chaining any defined above.
hotpatch.gunicorn.install(globals(), health_path="/healthz", boot_timeout_s=30, health_timeout_s=5)
