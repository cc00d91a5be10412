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

__all__ = ["RoutingKey", "bucket", "current_routing_key", "routing_key"]

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
