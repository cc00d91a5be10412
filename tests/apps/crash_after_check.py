"""Broken release: passes its health check, then the worker dies after its first real request.

The process exits (code 1) once the response has been sent in full, so no client sees an error:
what the rollout has to notice is a new worker dying right after it passed its check.
"""

import os

VERSION = "__VERSION__"


class _ThenCrash:
    def __init__(self, body):
        self._body = body

    def __iter__(self):
        yield self._body

    def close(self):
        os._exit(1)


def app(environ, start_response):
    body = f"version={VERSION} pid={os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    if environ["PATH_INFO"] == "/healthz":
        return [body]
    return _ThenCrash(body)
