"""The Kubernetes example's WSGI app: its version in every answer, and a health path.

``/healthz`` answers 200 while the worker can serve (check what your app needs here: a database,
a cache); it is the path of ``HOTPATCH_HEALTH_PATH``, probed by hotpatch in every new worker and
by the kubelet's readiness and liveness probes.
"""

import os

VERSION = "1"


def greeting():
    return f"hello from version {VERSION}"


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/healthz":
        body = b"ok\n"
    else:
        body = f"{greeting()} (pod {os.environ.get('HOSTNAME', '?')}, worker {os.getpid()})\n"
        body = body.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
