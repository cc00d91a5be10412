"""Broken ASGI release: its lifespan startup never finishes (waits on a server that never answers)."""

import asyncio
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

VERSION = "__VERSION__"


@asynccontextmanager
async def lifespan(app):
    await asyncio.sleep(3600)
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/", response_class=PlainTextResponse)
async def index():
    return f"version={VERSION} pid={os.getpid()}\n"


@app.get("/healthz", response_class=PlainTextResponse)
async def healthz():
    return "ok\n"
