"""The routing key from a request: ``RoutingKeyMiddleware`` (WSGI), ``ASGIRoutingKeyMiddleware``.

The ASGI form is exercised through real ASGI calls: ``hotpatch.health.probe_asgi`` (the ASGI
protocol in process) and a real uvicorn server on 127.0.0.1 answering HTTP requests. The app
answers the routing key it sees (and the bucket a run would give it).
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from hotpatch.demo.harness import wait_until
from hotpatch.health import probe_asgi, probe_wsgi
from hotpatch.routing import (
    MAX_KEY_BYTES,
    ASGIRoutingKeyMiddleware,
    RoutingKeyMiddleware,
    bucket,
    current_routing_key,
    routing_key,
)

RUN = "trial-42"


def _answer() -> bytes:
    key = current_routing_key()
    return b"none" if key is None else key + b" %.12f" % bucket(RUN)


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        message = await receive()
        assert message["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete", "key": current_routing_key()})
        return
    in_task = await asyncio.create_task(asyncio.sleep(0, current_routing_key()))
    body = _answer() + b" task=" + (in_task or b"none")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def ask_asgi(app: Any, headers: dict[str, str] | None = None) -> str:
    async def call() -> str:
        result = await probe_asgi(app, "/", headers=headers, timeout_s=10)
        assert result.status == 200
        return result.body.decode()

    return asyncio.run(call())


def test_asgi_key_from_a_header_any_case_reaches_the_request_and_its_tasks() -> None:
    app = ASGIRoutingKeyMiddleware(asgi_app, header="X-User-Id")
    answer = ask_asgi(app, {"x-user-id": "alice"})
    expected = bucket(RUN, "alice")
    assert answer == f"salice {expected:.12f} task=salice"
    assert current_routing_key() is None  # nothing leaks out of the request


def test_asgi_key_from_a_cookie_when_the_header_is_absent() -> None:
    app = ASGIRoutingKeyMiddleware(asgi_app, header="x-user-id", cookie="uid")
    assert ask_asgi(app, {"cookie": 'theme=dark; uid="bob"; x=1'}).startswith("sbob ")
    assert ask_asgi(app, {"x-user-id": "carol", "cookie": "uid=bob"}).startswith("scarol ")
    only_cookie = ASGIRoutingKeyMiddleware(asgi_app, cookie="uid")
    assert ask_asgi(only_cookie, {"x-user-id": "carol", "cookie": "uid=dan"}).startswith("sdan ")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-user-id": ""},
        {"x-user-id": "u" * (MAX_KEY_BYTES + 1)},
        {"cookie": ";;=;uid;==;"},
        {"cookie": "uid=" + "u" * 20_000},
        {"cookie": "uid="},
    ],
    ids=["none", "empty", "too-long", "malformed-cookie", "huge-cookie", "empty-cookie"],
)
def test_asgi_request_without_a_usable_key_is_served_without_one(headers: dict[str, str]) -> None:
    app = ASGIRoutingKeyMiddleware(asgi_app, header="x-user-id", cookie="uid")
    assert ask_asgi(app, headers) == "none task=none"


def test_asgi_odd_scope_headers_are_skipped_and_the_lifespan_passes_through() -> None:
    app = ASGIRoutingKeyMiddleware(asgi_app, header="x-user-id")
    sent: list[Any] = []

    async def run() -> None:
        async def receive() -> Any:
            return {"type": "lifespan.startup"}

        async def send(message: Any) -> None:
            sent.append(message)

        await app({"type": "lifespan", "headers": [(b"x-user-id", b"eve")]}, receive, send)
        odd = {"type": "http", "headers": [None, (b"x-user-id",), ("x-user-id", "str"), 7]}
        await app({**odd, "headers": [*odd["headers"], (b"X-USER-ID", b"\xe9ve")]}, receive, send)

    asyncio.run(run())
    assert sent[0] == {"type": "lifespan.startup.complete", "key": None}
    assert sent[-1]["body"].startswith("s\u00e9ve".encode())  # latin-1, as WSGI servers decode


def test_asgi_key_restores_an_outer_key_after_the_request() -> None:
    app = ASGIRoutingKeyMiddleware(asgi_app, header="x-user-id")
    with routing_key("outer"):
        assert ask_asgi(app, {"x-user-id": "inner"}).startswith("sinner ")
        assert ask_asgi(app, {}).startswith("souter ")  # no key in the request: the outer one
        assert current_routing_key() == b"souter"


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"first=" + (current_routing_key() or b"none")
    yield b" later=" + _answer()  # a streamed body, iterated after the app returned


def test_wsgi_key_from_a_header_or_cookie_holds_while_the_body_streams() -> None:
    app = RoutingKeyMiddleware(wsgi_app, header="X-User-Id", cookie="uid")
    result = probe_wsgi(app, "/", headers={"X-User-Id": "alice"})
    assert result.body.decode() == f"first=salice later=salice {bucket(RUN, 'alice'):.12f}"
    result = probe_wsgi(app, "/", headers={"Cookie": "uid=bob"})
    assert result.body.decode().startswith("first=sbob later=sbob ")
    result = probe_wsgi(app, "/", headers={"X-User-Id": "x" * (MAX_KEY_BYTES + 1)})
    assert result.body.decode() == "first=none later=none"
    assert current_routing_key() is None


@pytest.mark.parametrize("middleware", [RoutingKeyMiddleware, ASGIRoutingKeyMiddleware])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "give the header or the cookie"),
        ({"header": "X User"}, "header must be"),
        ({"header": ""}, "header must be"),
        ({"cookie": "a=b"}, "cookie must be"),
        ({"cookie": "caf\u00e9"}, "cookie must be"),
    ],
)
def test_a_middleware_without_a_usable_source_is_refused(
    middleware: Any, options: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        middleware(asgi_app, **options)


@pytest.fixture(name="uvicorn_port")
def _uvicorn_port() -> Iterator[int]:
    uvicorn = pytest.importorskip("uvicorn")
    sock = socket.create_server(("127.0.0.1", 0))
    app = ASGIRoutingKeyMiddleware(asgi_app, header="x-user-id", cookie="uid")
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve(sockets=[sock])), name="uvicorn", daemon=True
    )
    thread.start()
    try:
        wait_until(lambda: server.started, timeout_s=20, what="uvicorn serving")
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def test_a_real_uvicorn_server_routes_each_user_by_header_or_cookie(uvicorn_port: int) -> None:
    def get(headers: dict[str, str]) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", uvicorn_port, timeout=10)
        try:
            conn.request("GET", "/", headers=headers)
            response = conn.getresponse()
            assert response.status == 200
            return response.read().decode()
        finally:
            conn.close()

    for user in ("alice", "bob", "42"):
        expected = f"s{user} {bucket(RUN, user):.12f} task=s{user}"
        assert get({"X-User-Id": user}) == expected
        assert get({"Cookie": f"uid={user}"}) == expected  # the same key by either route
    assert get({}) == "none task=none"
