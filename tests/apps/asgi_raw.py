"""A bare ASGI 3 app without lifespan support; a version ending in ``-sick`` fails /healthz."""

import os

VERSION = "__VERSION__"


async def app(scope, receive, send):
    assert scope["type"] == "http", "no lifespan support"  # uvicorn (auto): "unsupported"
    if scope["path"] == "/healthz" and VERSION.endswith("-sick"):
        status, body = 500, b"sick\n"
    else:
        status, body = 200, f"version={VERSION} pid={os.getpid()}\n".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
