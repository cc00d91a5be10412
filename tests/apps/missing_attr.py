"""Broken release: imports fine, but has no ``app`` attribute (it was renamed)."""

import os

VERSION = "__VERSION__"


def application(environ, start_response):
    body = f"version={VERSION} pid={os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
