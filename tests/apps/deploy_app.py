"""The in-place deploy tests' app: answers with its version; variants refuse or fail in one worker.

``__VARIANT__`` is replaced by the test: ``good``; ``refuse_one`` (the module raises while it
executes in the worker whose pid is in the file ``$DEPLOY_TARGET``: a phase-1 refusal there
only); ``unhealthy_one`` (``/healthz`` answers 500 in that worker only: a phase-3 failure);
``incompatible`` (the public function ``helper`` is removed: not hot-patchable, needs a restart);
``slow_health_one`` (``/healthz`` takes 4 s in that worker: it outlasts the coordinator).
"""

import os
import time

VERSION = "__VERSION__"
VARIANT = "__VARIANT__"


def _is_target():
    try:
        with open(os.environ["DEPLOY_TARGET"], encoding="ascii") as fh:
            return int(fh.read().strip() or 0) == os.getpid()
    except (KeyError, OSError, ValueError):
        return False


if VARIANT == "refuse_one" and _is_target():
    raise RuntimeError(f"this version refuses to load in worker {os.getpid()}")


def helper():  # __HELPER__
    return VERSION


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    status = "200 OK"
    if path == "/healthz":
        body = b"ok\n"
        if VARIANT == "unhealthy_one" and _is_target():
            status, body = "500 Internal Server Error", b"unhealthy in this worker\n"
        if VARIANT == "slow_health_one" and _is_target():
            time.sleep(4)
    else:
        body = f"version={VERSION} pid={os.getpid()}\n".encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
