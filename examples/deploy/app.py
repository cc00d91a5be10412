"""A small WSGI app for the in-place deploy example: its answer shows the code that runs."""

import os

VERSION = "1"


def greeting():
    return f"hello from version {VERSION}"


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/healthz":
        body = b"ok\n"
    else:
        body = f"{greeting()} (worker {os.getpid()})\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
