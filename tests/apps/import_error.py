"""Broken release: an exception at import time (line 8)."""

VERSION = "__VERSION__"
SETTINGS = {"db": "sqlite://"}


def _connect():
    raise RuntimeError("cannot connect to the database: " + SETTINGS["db"])


_connection = _connect()


def app(environ, start_response):
    start_response("200 OK", [])
    return [b""]
