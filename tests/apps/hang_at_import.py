"""Broken release: hangs at import (a worker that would never boot)."""

import time

VERSION = "__VERSION__"
time.sleep(3600)


def app(environ, start_response):
    start_response("200 OK", [])
    return [b""]
