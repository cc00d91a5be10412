"""Broken release: the third new worker fails at import, the others load fine.

Workers count themselves with a file next to this module (``boot-count``), under a lock.
"""

import fcntl
import os
from pathlib import Path

VERSION = "__VERSION__"
_COUNTER = Path(os.environ["HOTPATCH_TEST_COUNTER"])

with open(_COUNTER.with_suffix(".lock"), "w") as _lock:
    fcntl.flock(_lock, fcntl.LOCK_EX)
    _n = int(_COUNTER.read_text() or "0") + 1 if _COUNTER.exists() else 1
    _COUNTER.write_text(str(_n))
if _n == 3:
    raise RuntimeError("the third worker cannot start")


def app(environ, start_response):
    body = f"version={VERSION} pid={os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
