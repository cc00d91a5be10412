"""Health probes shared by both engines: an in-process WSGI request, and a plain HTTP GET.

``probe_wsgi`` calls a WSGI application directly (no socket), the way a gunicorn worker checks its
own freshly loaded app before it accepts traffic. ``probe_http`` asks a running server.
"""

from __future__ import annotations

import http.client
import io
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["ProbeResult", "WSGIApp", "probe_http", "probe_wsgi"]

_MAX_BODY_BYTES = 64 * 1024


class WSGIApp(Protocol):
    """Any WSGI application callable."""

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any], /
    ) -> Iterable[bytes]: ...


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
