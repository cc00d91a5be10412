"""Health probes shared by both engines: an in-process WSGI or ASGI request, and a plain HTTP GET.

``probe_wsgi`` calls a WSGI application directly (no socket), the way a gunicorn worker checks its
own freshly loaded app before it accepts traffic. ``probe_asgi`` does the same for an ASGI 3
application (FastAPI, Starlette, ...): one ``http`` scope, a ``receive`` that hands over an empty
body and then waits for the response to end, a ``send`` that keeps the status and the first 64 KiB
of the body. It is a coroutine, so it runs in the event loop the app lives in (a uvicorn worker's,
after the lifespan startup, so objects the app bound to that loop stay valid); ``timeout_s`` bounds
it, and an app that never answers is cancelled. ``is_asgi_app`` tells the two kinds apart the way
uvicorn does: an ASGI 3 app is a coroutine function, or an object whose ``__call__`` is one.
``probe_http`` asks a running server.
"""

from __future__ import annotations

import http.client
import inspect
import io
import sys
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "ASGIApp",
    "ProbeResult",
    "WSGIApp",
    "is_asgi_app",
    "probe_asgi",
    "probe_http",
    "probe_wsgi",
]

_MAX_BODY_BYTES = 64 * 1024


class WSGIApp(Protocol):
    """Any WSGI application callable."""

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any], /
    ) -> Iterable[bytes]: ...


ASGIMessage = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[ASGIMessage]]
ASGISend = Callable[[ASGIMessage], Awaitable[None]]


class ASGIApp(Protocol):
    """Any ASGI 3 application callable."""

    def __call__(
        self, scope: MutableMapping[str, Any], receive: ASGIReceive, send: ASGISend, /
    ) -> Awaitable[None]: ...


@dataclass(frozen=True)
class ProbeResult:
    """What a probe got back.

    Attributes:
        status: the HTTP status code.
        body: the first 64 KiB of the response body.
    """

    status: int
    body: bytes

    @property
    def is_success(self) -> bool:
        """Whether the status is 2xx."""
        return 200 <= self.status < 300

    @property
    def is_server_error(self) -> bool:
        """Whether the status is 5xx."""
        return self.status >= 500


def probe_wsgi(
    app: WSGIApp,
    path: str = "/",
    *,
    host: str = "127.0.0.1",
    port: int = 80,
    headers: dict[str, str] | None = None,
) -> ProbeResult:
    """Send one ``GET path`` to a WSGI application in this process.

    Args:
        app: the WSGI application.
        path: the path, optionally with a query string (``/healthz?deep=1``).
        host: the ``Host`` header and ``SERVER_NAME``.
        port: ``SERVER_PORT``.
        headers: extra request headers.

    Returns:
        The status and the start of the body.

    Raises:
        Exception: whatever the application raises.
    """
    path_info, _, query = path.partition("?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path_info,
        "QUERY_STRING": query,
        "SERVER_NAME": host,
        "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": f"{host}:{port}",
        "HTTP_USER_AGENT": "hotpatch-health",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    statuses: list[str] = []

    def start_response(status: str, _headers: list[tuple[str, str]], _exc_info: Any = None) -> Any:
        statuses.append(status)
        return lambda _data: None

    result = app(environ, start_response)
    body = bytearray()
    try:
        for chunk in result:
            if len(body) < _MAX_BODY_BYTES:
                body.extend(chunk[: _MAX_BODY_BYTES - len(body)])
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if not statuses:
        raise RuntimeError(f"GET {path}: the application never called start_response")
    return ProbeResult(status=int(statuses[-1].split(" ", 1)[0]), body=bytes(body))


def is_asgi_app(app: object) -> bool:
    """Whether ``app`` is an ASGI 3 application (as uvicorn's ``interface="auto"`` decides).

    True for ``async def app(scope, receive, send)`` and for an object whose ``__call__`` is a
    coroutine function (FastAPI, Starlette, their middleware). A WSGI app (Flask, Django) is not.
    """
    if inspect.iscoroutinefunction(app):
        return True
    if inspect.isclass(app) or not callable(app):
        return False  # ASGI 2 (a class instantiated per scope) or anything else: not ASGI 3
    return inspect.iscoroutinefunction(type(app).__call__)


async def probe_asgi(
    app: ASGIApp,
    path: str = "/",
    *,
    timeout_s: float,
    host: str = "127.0.0.1",
    port: int = 80,
    headers: dict[str, str] | None = None,
    state: dict[str, Any] | None = None,
) -> ProbeResult:
    """Send one ``GET path`` to an ASGI 3 application in this process, in the running loop.

    The probe returns as soon as the response is complete; work the app does after that
    (background tasks) goes on in the loop, as it would under a server.

    Args:
        app: the ASGI application.
        path: the path, optionally with a query string (``/healthz?deep=1``).
        timeout_s: the deadline for the whole response.
        host: the ``Host`` header and the ``server`` of the scope.
        port: the server port of the scope.
        headers: extra request headers.
        state: the lifespan state; the request scope gets a shallow copy (as servers do).

    Returns:
        The status and the start of the body.

    Raises:
        TimeoutError: no complete response within ``timeout_s`` (the app call is cancelled).
        RuntimeError: the app broke the protocol (no ``http.response.start``, a malformed
            message, or it returned before the response was complete).
        Exception: whatever the application raises before the response is complete.
    """
    import asyncio  # here: probe_wsgi's users do not pay for it

    path_part, _, query = path.partition("?")
    raw_headers = [
        (b"host", f"{host}:{port}".encode("latin-1")),
        (b"user-agent", b"hotpatch-health"),
    ]
    raw_headers += [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in (headers or {}).items()
    ]
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": urllib.parse.unquote(path_part),
        "raw_path": path_part.encode("latin-1", "replace"),
        "query_string": query.encode("latin-1", "replace"),
        "root_path": "",
        "headers": raw_headers,
        "client": ("127.0.0.1", 0),
        "server": (host, port),
    }
    if state is not None:
        scope["state"] = dict(state)
    statuses: list[int] = []
    body = bytearray()
    finished = asyncio.Event()
    request_sent = False

    async def receive() -> ASGIMessage:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await finished.wait()  # like a server: the client "disconnects" once the response ends
        return {"type": "http.disconnect"}

    async def send(message: ASGIMessage) -> None:
        kind = message.get("type") if isinstance(message, MutableMapping) else None
        if kind == "http.response.start" and not statuses:
            status = message.get("status")
            if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
                raise RuntimeError(f"GET {path}: http.response.start with status {status!r:.40}")
            statuses.append(status)
        elif kind == "http.response.body" and statuses and not finished.is_set():
            chunk = message.get("body", b"")
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise RuntimeError(f"GET {path}: http.response.body with a {type(chunk).__name__}")
            if len(body) < _MAX_BODY_BYTES:
                body.extend(bytes(chunk[: _MAX_BODY_BYTES - len(body)]))
            if not message.get("more_body", False):
                finished.set()
        else:
            raise RuntimeError(f"GET {path}: unexpected ASGI message {kind!r:.60}")

    call = asyncio.ensure_future(app(scope, receive, send))
    ending = asyncio.ensure_future(finished.wait())
    try:
        done, _ = await asyncio.wait(
            {call, ending}, timeout=timeout_s, return_when="FIRST_COMPLETED"
        )
    finally:
        ending.cancel()
    if finished.is_set():
        if not call.done():
            _LINGERING.add(call)  # the app's work after the response goes on, as under a server
            call.add_done_callback(_forget)
        elif not call.cancelled():
            call.exception()  # retrieved: an error after a complete response is the app's own
        return ProbeResult(status=statuses[0], body=bytes(body))
    if call not in done:
        call.cancel()
        raise TimeoutError(f"GET {path}: no complete response within {timeout_s:g} s")
    call.result()  # raises what the app raised
    if not statuses:
        raise RuntimeError(f"GET {path}: the application never sent http.response.start")
    raise RuntimeError(f"GET {path}: the application returned before the response was complete")


_LINGERING: set[asyncio.Future[None]] = set()


def _forget(call: asyncio.Future[None]) -> None:
    _LINGERING.discard(call)
    if not call.cancelled():
        call.exception()  # retrieved, so asyncio does not log "exception was never retrieved"


def probe_http(host: str, port: int, path: str = "/", *, timeout_s: float = 5.0) -> ProbeResult:
    """Send one ``GET path`` over HTTP (a new connection, closed afterwards).

    Raises:
        OSError: the connection failed or timed out.
    """
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Connection": "close", "User-Agent": "hotpatch-health"})
        response = conn.getresponse()
        return ProbeResult(status=response.status, body=response.read(_MAX_BODY_BYTES))
    finally:
        conn.close()


def wsgi_health_check(app: WSGIApp, path: str = "/healthz") -> Callable[[], None]:
    """A health check for the in-process engine: ``GET path`` against ``app``, in-process.

    Register it for the module that serves ``app``; a patch after which the answer is not a 2xx
    is rolled back::

        hotpatch.health_check("myapp.views")(wsgi_health_check(myapp.app, "/healthz"))

    Raises (when called):
        AssertionError: the answer was not a 2xx (its status and body are in the message).
    """

    def check() -> None:
        result = probe_wsgi(app, path)
        if not result.is_success:
            raise AssertionError(f"GET {path} answered {result.status}: {result.body[:200]!r}")

    check.__qualname__ = f"wsgi_health_check({path!r})"
    return check
