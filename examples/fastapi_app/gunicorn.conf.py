"""gunicorn config for the FastAPI example: uvicorn workers, plus hotpatch's rolling reload hooks."""

import hotpatch.gunicorn

workers = 4
worker_class = "uvicorn_worker.UvicornWorker"  # pip install 'hotpatch[asgi]'
graceful_timeout = 10

# Adds the seven hooks (post_fork, post_worker_init, ...) to this module, chaining any defined above.
hotpatch.gunicorn.install(globals(), health_path="/healthz", boot_timeout_s=30, health_timeout_s=5)
