"""Broken ASGI release: an exception at import time (line 11)."""

from fastapi import FastAPI

VERSION = "__VERSION__"
SETTINGS = {"db": "postgresql://db"}
app = FastAPI()


def _connect():
    raise RuntimeError("cannot connect to the database: " + SETTINGS["db"])


_connection = _connect()
