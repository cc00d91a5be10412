"""Broken release: serves ``/`` but its health endpoint answers 500."""

import os

VERSION = "__VERSION__"


def app(environ, start_response):
    if environ["PATH_INFO"] == "/healthz":
        start_response("500 Internal Server Error", [("Content-Length", "8")])
        return [b"db down\n"]
    body = f"version={VERSION} pid={os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
