"""Broken ASGI release: imports fine, but its lifespan startup raises (line 15)."""

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

VERSION = "__VERSION__"


@asynccontextmanager
async def lifespan(app):
    if VERSION:
        raise RuntimeError("lifespan: cannot open the connection pool")
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/", response_class=PlainTextResponse)
async def index():
    return f"version={VERSION} pid={os.getpid()}\n"


@app.get("/healthz", response_class=PlainTextResponse)
async def healthz():
    return "ok\n"
