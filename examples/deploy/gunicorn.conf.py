"""gunicorn settings of the deploy example: four workers, hotpatch's hooks, a health path."""

import hotpatch.gunicorn

workers = 4
bind = "127.0.0.1:8000"
hotpatch.gunicorn.install(globals(), health_path="/healthz")
