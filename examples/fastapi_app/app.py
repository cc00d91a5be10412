"""A FastAPI app served by gunicorn with uvicorn workers, under hotpatch's rolling reload.

The lifespan startup opens what the app needs (here a stand-in for a database pool) and
``/healthz`` answers 200 only once it is open: hotpatch probes ``/healthz`` inside each new worker,
after the startup and before the worker takes its first request.
"""

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

VERSION = "1"


class Pool:
    """Stands in for a database connection pool opened at startup."""

    def __init__(self) -> None:
        self.is_open = True

    async def close(self) -> None:
        self.is_open = False


@asynccontextmanager
async def lifespan(app: FastAPI):
    pool = Pool()  # a real app: await asyncpg.create_pool(...), which may fail
    yield {"pool": pool}  # lifespan state: every request sees it as request.state.pool
    await pool.close()


app = FastAPI(lifespan=lifespan)


@app.get("/", response_class=PlainTextResponse)
async def index() -> str:
    return f"version={VERSION} pid={os.getpid()}\n"


@app.get("/healthz", response_class=PlainTextResponse)
async def healthz(request: Request) -> PlainTextResponse:
    if not request.state.pool.is_open:
        return PlainTextResponse("database pool closed\n", status_code=503)
    return PlainTextResponse("ok\n")
