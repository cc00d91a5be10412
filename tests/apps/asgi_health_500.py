"""Broken ASGI release: serves ``/`` but its health endpoint answers 500."""

import os

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

VERSION = "__VERSION__"

app = FastAPI()


@app.get("/", response_class=PlainTextResponse)
async def index():
    return f"version={VERSION} pid={os.getpid()}\n"


@app.get("/healthz", response_class=PlainTextResponse)
async def healthz():
    return PlainTextResponse("db down\n", status_code=500)
