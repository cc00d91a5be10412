"""Broken ASGI release: a bare app that answers ``lifespan.startup.failed`` (and does not raise)."""

import os

VERSION = "__VERSION__"


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send(
                {
                    "type": "lifespan.startup.failed",
                    "message": "Traceback ...\ndatabase unreachable",
                }
            )
        return
    body = f"version={VERSION} pid={os.getpid()}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
