"""Broken release: its health endpoint never answers."""

import os
import time

VERSION = "__VERSION__"


def app(environ, start_response):
    if environ["PATH_INFO"] == "/healthz":
        time.sleep(3600)
    body = f"version={VERSION} pid={os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
