"""Which version serves a call: the routing key and sticky bucketing of a parallel run.

A canary or an experiment sends a share of the calls to the new version. Which calls? If each
call were drawn at random, one user's requests would flip between old and new code from one click
to the next, and a widening share (1% -> 5% -> 25%) would move users back and forth. So calls are
routed by a *key*, a stable identity of who or what the call serves (a user id, a tenant, a
session): ``with hotpatch.routing_key(user_id): ...``, or the same as a decorator, or set by
middleware from a header or cookie. It is a ``contextvars.ContextVar``, so it follows the call
through threads started with ``contextvars.copy_context()`` and through ``asyncio`` tasks, and
never leaks from one request to the next.

The key goes into a salted hash of (run id, key) that maps it to a point in [0, 1): its bucket.
The call goes to the new version when its bucket is below the current share. Three guarantees
follow from that one rule:

- **Sticky**: the same key always lands in the same bucket for one run, so it always gets the
  same version at a given share.
- **Monotone**: widening the share only adds buckets; a key that was on the new version stays
  on it for the rest of the run (no key ever goes new -> old while the share grows).
- **Independent across runs**: the run id salts the hash, so the 1% of keys that see the first
  canary are not the same 1% that see every canary.

A call without a key is bucketed by itself (a fresh random draw), which is right for work with no
identity (a background job) and still gives the share on average.

Web apps set the key per request with ``RoutingKeyMiddleware`` (WSGI) or
``ASGIRoutingKeyMiddleware`` (ASGI: FastAPI, Starlette, any ASGI 3 app), from a request header or a
cookie. The header and the cookie come from the client: they are read as untrusted text, and one
that cannot be a key (empty, longer than ``MAX_KEY_BYTES``, a malformed cookie header) leaves the
request without a key (bucketed by itself) rather than failing it. The WSGI form runs the app and
every step of its response iterable in one context holding the key, so a streamed body is routed
like the rest of the request; the ASGI form sets it in the request's task (HTTP and WebSocket
scopes; the lifespan passes through), and both restore the previous key when the request ends.

The hash is BLAKE2b keyed with the run id (so a key's bucket cannot be predicted without the run
id) over the key's bytes; ints and strings are encoded unambiguously (a type tag), so the key
``1`` and the key ``"1"`` do not collide by construction. A key's bucket is computed once per run
and kept with the key in its context, so the calls of one request after the first cost a
dictionary lookup.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import random
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any

__all__ = [
    "ASGIRoutingKeyMiddleware",
    "RoutingKey",
    "RoutingKeyMiddleware",
    "bucket",
    "current_routing_key",
    "routing_key",
]

RoutingKey = str | bytes | int

MAX_KEY_BYTES = 1024
"""A longer key (a whole cookie, say) is refused: a key names who, it does not carry data."""


class _Key:
    """A key in a context, with its bucket per run computed once (a call costs a dict lookup)."""

    __slots__ = ("buckets", "encoded")

    def __init__(self, encoded: bytes) -> None:
        self.encoded = encoded
        self.buckets: dict[str, float] = {}

    def bucket(self, run_id: str) -> float:
        found = self.buckets.get(run_id)
        if found is None:
            found = self.buckets[run_id] = _hash_bucket(run_id, self.encoded)
        return found


_KEY: contextvars.ContextVar[_Key | None] = contextvars.ContextVar(
    "hotpatch_routing_key", default=None
)


def _encode(key: RoutingKey) -> bytes:
    """The key as tagged bytes: distinct types never share an encoding."""
    if isinstance(key, bool):
        raise TypeError("a routing key is a str, bytes or int, not a bool")
    if isinstance(key, str):
        data = b"s" + key.encode("utf-8", "surrogatepass")
    elif isinstance(key, bytes):
        data = b"b" + key
    elif isinstance(key, int):
        data = b"i" + str(key).encode("ascii")
    else:
        raise TypeError(f"a routing key is a str, bytes or int, not {type(key).__name__}")
    if len(data) > MAX_KEY_BYTES:
        raise ValueError(f"a routing key is at most {MAX_KEY_BYTES} bytes, not {len(data)}")
    return data


class routing_key(contextlib.ContextDecorator):
    """Route the calls made inside to the version their key's bucket picks.

    ``with routing_key(user.id): handle(request)``; or ``@routing_key(tenant)`` on a function.
    Nested blocks use the innermost key; leaving a block restores the outer one.
    """

    def __init__(self, key: RoutingKey) -> None:
        self._key = _encode(key)
        self._tokens: list[contextvars.Token[_Key | None]] = []

    def __enter__(self) -> routing_key:
        self._tokens.append(_KEY.set(_Key(self._key)))
        return self

    def __exit__(self, *_exc: object) -> None:
        _KEY.reset(self._tokens.pop())


def current_routing_key() -> bytes | None:
    """The encoded key of the current context, or None outside any ``routing_key`` block."""
    current = _KEY.get()
    return current.encoded if current is not None else None


def bucket(run_id: str, key: RoutingKey | None = None) -> float:
    """The point in [0, 1) that ``key`` (default: the current routing key) has in run ``run_id``.

    Without a key (none given, none in the context) the call gets a fresh random point.
    """
    if key is not None:
        return _hash_bucket(run_id, _encode(key))
    current = _KEY.get()
    if current is None:
        return random.random()  # not a secret: any uniform draw will do, and this one is cheap
    return current.bucket(run_id)


def _hash_bucket(run_id: str, encoded: bytes) -> float:
    digest = hashlib.blake2b(encoded, digest_size=8, key=_salt(run_id)).digest()
    return int.from_bytes(digest, "big") / 2**64


@functools.lru_cache(maxsize=64)
def _salt(run_id: str) -> bytes:
    return hashlib.blake2b(run_id.encode("utf-8", "surrogatepass"), digest_size=32).digest()


MAX_COOKIE_HEADER_BYTES = 16 * 1024
"""A longer ``Cookie`` header is not searched for the key (servers refuse far smaller ones)."""

_WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
_Scope = MutableMapping[str, Any]
_ASGIApp = Callable[
    [_Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


class _KeySource:
    """Where a request's key comes from: a header, else a cookie (checked once, at set-up)."""

    def __init__(self, header: str | None, cookie: str | None) -> None:
        if header is None and cookie is None:
            raise ValueError("give the header or the cookie the routing key comes from")
        for what, name in (("header", header), ("cookie", cookie)):
            if name is not None and (
                not isinstance(name, str)
                or not name
                or not name.isascii()
                or any(c in name for c in " \t\r\n;=,:")
            ):
                raise ValueError(f"{what} must be a non-empty ASCII token, not {name!r:.80}")
        self.header = header.lower() if header is not None else None
        self.cookie = cookie

    def key(self, header: str | None, cookies: str | None) -> bytes | None:
        """The encoded key from the header's and the Cookie header's values, if any is usable."""
        value = header if self.header is not None else None
        if not value and self.cookie is not None and cookies:
            value = _cookie_value(cookies, self.cookie)
        if not value:
            return None
        try:
            return _encode(value)
        except ValueError:  # too long: the request goes on without a key
            return None


def _cookie_value(header: str, name: str) -> str | None:
    """``name``'s value in a Cookie header (RFC 6265 pairs; quotes removed), or None."""
    if len(header) > MAX_COOKIE_HEADER_BYTES:
        return None
    for pair in header.split(";"):
        found, sep, value = pair.strip().partition("=")
        if sep and found.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


class RoutingKeyMiddleware:
    """WSGI middleware: each request's routing key from a header or a cookie.

    ``app = RoutingKeyMiddleware(app, header="X-User-Id")``; with ``cookie="session"`` as the
    fallback (or alone). The app and its response iterable run with the key set.

    Args:
        app: the WSGI application.
        header: the request header that holds the key (any case).
        cookie: the cookie that holds it, read when the header is absent or empty.

    Raises:
        ValueError: neither given, or a name that is not a header or cookie token.
    """

    def __init__(self, app: _WSGIApp, *, header: str | None = None, cookie: str | None = None):
        self.app = app
        self._source = _KeySource(header, cookie)
        name = self._source.header
        self._environ_key = "HTTP_" + name.upper().replace("-", "_") if name else None

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        header = environ.get(self._environ_key) if self._environ_key else None
        key = self._source.key(
            header if isinstance(header, str) else None,
            environ.get("HTTP_COOKIE") if isinstance(environ.get("HTTP_COOKIE"), str) else None,
        )
        if key is None:
            return self.app(environ, start_response)
        context = contextvars.copy_context()
        context.run(_KEY.set, _Key(key))
        return _InContext(context, context.run(self.app, environ, start_response))


class _InContext:
    """A WSGI response iterable whose every step (and ``close``) runs in ``context``."""

    def __init__(self, context: contextvars.Context, body: Iterable[bytes]) -> None:
        self._context = context
        self._body = body
        self._iterator: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = self._context.run(iter, self._body)
        return self._context.run(next, self._iterator)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            self._context.run(close)


class ASGIRoutingKeyMiddleware:
    """ASGI middleware: each HTTP or WebSocket request's routing key from a header or a cookie.

    ``app = ASGIRoutingKeyMiddleware(app, header="x-user-id")`` (FastAPI and Starlette:
    ``app.add_middleware(ASGIRoutingKeyMiddleware, header="x-user-id")``). Everything the
    request runs in its task, and the tasks it starts, see the key; other scopes pass through.

    Args:
        app: the ASGI 3 application.
        header: the request header that holds the key (any case).
        cookie: the cookie that holds it, read when the header is absent or empty.

    Raises:
        ValueError: neither given, or a name that is not a header or cookie token.
    """

    def __init__(self, app: _ASGIApp, *, header: str | None = None, cookie: str | None = None):
        self.app = app
        self._source = _KeySource(header, cookie)
        self._header = self._source.header.encode("ascii") if self._source.header else None

    async def __call__(
        self,
        scope: _Scope,
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        key = self._key(scope) if scope.get("type") in ("http", "websocket") else None
        if key is None:
            await self.app(scope, receive, send)
            return
        token = _KEY.set(_Key(key))
        try:
            await self.app(scope, receive, send)
        finally:
            _KEY.reset(token)

    def _key(self, scope: _Scope) -> bytes | None:
        header: str | None = None
        cookies: list[str] = []
        headers = scope.get("headers")
        for item in headers if isinstance(headers, (list, tuple)) else ():
            try:
                name, value = item
            except (TypeError, ValueError):
                continue
            if not isinstance(name, bytes) or not isinstance(value, bytes):
                continue
            name = name.lower()
            if header is None and self._header is not None and name == self._header:
                header = value.decode("latin-1")  # header bytes as WSGI servers decode them
            elif name == b"cookie" and self._source.cookie is not None:
                cookies.append(value.decode("latin-1"))
        return self._source.key(header, "; ".join(cookies) or None)
