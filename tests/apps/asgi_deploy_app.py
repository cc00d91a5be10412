"""ASGI twin of deploy_app.py and canary_app.py (raw ASGI: a uvicorn worker boots it in no time).

``__VERSION__`` and ``__VARIANT__`` are replaced by the test. ``good``; ``refuse_one`` (the module
raises while it executes in the worker whose pid is in the file ``$DEPLOY_TARGET``: a phase-1
refusal there only); ``unhealthy_one`` (``/healthz`` answers 500 in that worker only: a phase-3
failure); ``bad`` (every tenth request but ``/healthz`` answers 500 ``canary-error``).

``render`` is a coroutine whose code changes with the version and that suspends once per
request, so under load requests are suspended inside code a deploy replaces; one that resumed on
the old code after a commit would answer ``version=<old>-mixed``. ``/healthz``
answers 200 only with the lifespan state this worker's startup set: a probe outside the serving
loop's lifespan would not have it.
"""

import asyncio
import itertools
import os

VERSION = "__VERSION__"
VARIANT = "__VARIANT__"
_count = itertools.count(1)


def _is_target():
    try:
        with open(os.environ["DEPLOY_TARGET"], encoding="ascii") as fh:
            return int(fh.read().strip() or 0) == os.getpid()
    except (KeyError, OSError, ValueError):
        return False


if VARIANT == "refuse_one" and _is_target():
    raise RuntimeError(f"this version refuses to load in worker {os.getpid()}")


def helper():
    return VERSION


async def render():
    await asyncio.sleep(0)  # a request suspended in the code a deploy replaces
    # resumed after a commit, an old render would see the new VERSION: the answer says "mixed"
    mixed = "" if helper() == "__VERSION__" else "-mixed"
    return f"version=__VERSION__{mixed} pid={os.getpid()}\n"


def health(state):
    if state.get("started_in") != os.getpid():
        return 503, b"lifespan state missing\n"
    if VARIANT == "unhealthy_one" and _is_target():
        return 500, b"unhealthy in this worker\n"
    return 200, b"ok\n"


async def lifespan(scope, receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            scope["state"]["started_in"] = os.getpid()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await lifespan(scope, receive, send)
        return
    if scope["path"] == "/healthz":
        status, body = health(scope.get("state") or {})
    elif VARIANT == "bad" and next(_count) % 10 == 0:
        status, body = 500, f"canary-error pid={os.getpid()}\n".encode()
    else:
        status, body = 200, (await render()).encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
