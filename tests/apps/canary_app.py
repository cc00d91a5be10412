"""The canary tests' app: answers ``version=<v> pid=<pid>``; the ``bad`` variant fails some requests.

``__VERSION__`` and ``__VARIANT__`` are replaced by the test. ``bad``: every tenth request to any
path but ``/healthz`` answers 500 with the body ``canary-error pid=<pid>`` (10% of what this
worker serves). ``/raise`` raises (gunicorn answers 500). ``/imported`` answers whether ``prometheus_client`` was imported in this worker.
"""

import itertools
import os
import sys
import threading

VERSION = "__VERSION__"
VARIANT = "__VARIANT__"
_count = itertools.count(1)
_lock = threading.Lock()


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    status = "200 OK"
    if path == "/healthz":
        body = b"ok\n"
    elif path == "/raise":
        raise RuntimeError("the app raised, as asked")
    elif path == "/imported":
        body = f"prometheus_client={'prometheus_client' in sys.modules}\n".encode()
    else:
        with _lock:
            n = next(_count)
        if VARIANT == "bad" and n % 10 == 0:
            status = "500 Internal Server Error"
            body = f"canary-error pid={os.getpid()}\n".encode()
        else:
            body = f"version={VERSION} pid={os.getpid()}\n".encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
