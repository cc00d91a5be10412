"""A small Flask app for hotpatch's rolling reload: its version in every answer, and /healthz."""

import os

from flask import Flask

VERSION = "1"

app = Flask(__name__)


@app.get("/")
def index() -> str:
    return f"version={VERSION} pid={os.getpid()}\n"


@app.get("/healthz")
def healthz() -> tuple[str, int]:
    # Check what this worker needs to serve (database, caches, ...); answer 2xx when it can.
    return "ok\n", 200
