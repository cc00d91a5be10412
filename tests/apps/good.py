"""A tiny WSGI app that answers with its version (the integration tests' "good" release)."""

import os

VERSION = "__VERSION__"


def app(environ, start_response):
    body = f"version={VERSION} pid={os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
