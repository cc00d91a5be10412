"""ASGI twin of good.py: a FastAPI app whose health endpoint depends on its lifespan startup.

The startup stands for opening a database pool: it sets ``app.state.ready`` and yields lifespan
state, and ``/healthz`` answers 200 only when both are there. Each startup appends this worker's
pid to ``$HOTPATCH_TEST_STARTUPS`` (when set), so a test can count how often it ran.
"""

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

VERSION = "__VERSION__"


@asynccontextmanager
async def lifespan(app):
    if os.environ.get("HOTPATCH_TEST_STARTUPS"):
        with open(os.environ["HOTPATCH_TEST_STARTUPS"], "a") as f:
            f.write(f"{os.getpid()}\n")
    app.state.ready = True
    yield {"started_in": os.getpid()}
    app.state.ready = False


app = FastAPI(lifespan=lifespan)


@app.get("/", response_class=PlainTextResponse)
async def index():
    return f"version={VERSION} pid={os.getpid()}\n"


@app.get("/healthz", response_class=PlainTextResponse)
async def healthz(request: Request):
    if not getattr(request.app.state, "ready", False) or request.state.started_in != os.getpid():
        return PlainTextResponse("not started\n", status_code=503)
    return "ok\n"
