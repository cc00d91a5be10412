"""Broken ASGI release: its health endpoint never answers."""

import asyncio
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
    await asyncio.sleep(3600)
    return "ok\n"
