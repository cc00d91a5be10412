"""A uvicorn worker class with the lifespan protocol off (``-k asgi_workers.NoLifespanWorker``)."""

from uvicorn_worker import UvicornWorker


class NoLifespanWorker(UvicornWorker):
    CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "lifespan": "off"}  # noqa: RUF012 (uvicorn-worker's own form)
