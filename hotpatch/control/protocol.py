"""The control protocol: one JSON request, one JSON answer, each a single capped line.

A control socket is reachable by the process's own user and root only, but what arrives on it is
still input: a stray tool, a confused script or a compromised account of that user may send
anything. So the format is deliberately tiny and checked before anything acts on it: one
newline-terminated UTF-8 JSON object per direction, at most ``MAX_REQUEST_BYTES`` for a request,
a protocol version (``"v"``), a fixed set of fields with fixed types, flat values only.

The mechanism: ``parse_request`` turns the bytes of one line into a ``Request`` or raises
``BadRequest`` with a message fit to send back; it refuses, in this order, an oversized line,
bytes that are not UTF-8, nesting deeper than ``MAX_DEPTH`` (counted before the JSON parser
runs, so a deep document costs one linear scan, never a ``RecursionError``), invalid JSON, a
duplicated key, a non-object, an unknown field, a wrong type or an unknown action. The server
answers every refusal with an ``error`` answer and keeps serving. Before the final answer, the
server may send one progress line, ``{"v": 1, "event": "started"}``, when the request leaves the
queue and begins to run: the client uses it to say truthfully what it knows when it gives up
waiting. The client keeps its end open until the answer: hanging up (or shutting down its
writing side) before a queued request starts cancels it.

Version 2 (a version-1 request keeps working unchanged) adds ``status``, ``stats`` and ``deploy``.
``stats`` is read-only: a gunicorn worker's request counts and the latencies after request number
``since`` (``hotpatch.gunicorn._metrics``; the answer's own layout version is ``stats_v``). A
``deploy`` request opens a *session* on its connection, the in-place strategy's two-phase commit
in one worker (docs/deploy.md): the process answers the request (phase 1: prepared or refused),
then reads one *step* line at a time (``parse_step``: ``{"v": 2, "step": ..., "deploy_id": ...}``,
capped like a request) and answers each (``commit``, ``health``, ``confirm``, ``rollback``,
``abort``). The client hanging up, or no step before the request's ``expires_ms``, is an abort:
nothing prepared survives it, and anything committed is rolled back. Pure functions: no sockets,
no threads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
MAX_REQUEST_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 4
MAX_NAME_CHARS = 1024
ACTIONS = ("patch", "check", "rollback", "history", "status", "deploy", "stats", "promote", "abort")
V2_ACTIONS = frozenset({"status", "deploy", "stats", "promote", "abort"})  # promote/abort: a trial
FIELDS = {
    "v": int,
    "action": str,
    "pid": int,
    "module": str,
    "to": str,
    "deploy_id": str,
    "release": str,
    "release_dir": str,
    "expires_ms": int,
    "since": int,
}
OPTIONAL = frozenset({"module", "to", "deploy_id", "release", "release_dir", "expires_ms", "since"})
DEPLOY_FIELDS = ("deploy_id", "release", "release_dir", "expires_ms")
MAX_EXPIRES_MS = 3_600_000
MAX_SINCE = 2**62
STEPS = ("commit", "health", "confirm", "rollback", "abort")
STEP_FIELDS = {"v": int, "step": str, "deploy_id": str}
STARTED_EVENT = "started"


class BadRequest(ValueError):
    """A request line that does not follow the protocol; the message goes back to the client."""


@dataclass(frozen=True)
class Request:
    """One request.

    Attributes:
        action: one of ``ACTIONS``.
        pid: the pid the client means to address; the server refuses any other.
        module: for ``rollback`` (required) and ``history`` (optional): the module.
        to: for ``rollback``: the version to restore (default: the previous one).
        deploy_id: for ``deploy``: the deploy this session belongs to.
        release: for ``deploy``: the release to deploy (its id).
        release_dir: for ``deploy``: the release's snapshot directory.
        expires_ms: for ``deploy``: how long the process waits for each next step before it
            discards what it prepared (or rolls back what it committed).
        since: for ``stats``: the last request number the client has seen (latencies after it).
        v: the protocol version the client speaks (answers use the same).
    """

    action: str
    pid: int
    module: str | None = None
    to: str | None = None
    deploy_id: str | None = None
    release: str | None = None
    release_dir: str | None = None
    expires_ms: int | None = None
    since: int | None = None
    v: int = field(default=PROTOCOL_VERSION, compare=False)

    def encode(self) -> bytes:
        """The request as one protocol line (version 1 when it needs nothing newer)."""
        v = PROTOCOL_VERSION if self.action in V2_ACTIONS else 1
        body: dict[str, Any] = {"v": v, "action": self.action, "pid": self.pid}
        for key in OPTIONAL:
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        return encode_line(body)


@dataclass(frozen=True)
class Step:
    """One step of a ``deploy`` session (after the process answered the request)."""

    step: str
    deploy_id: str

    def encode(self) -> bytes:
        """The step as one protocol line."""
        return encode_line({"v": PROTOCOL_VERSION, "step": self.step, "deploy_id": self.deploy_id})


def encode_line(message: dict[str, Any]) -> bytes:
    """One message as a line: compact JSON (ASCII only), then ``\\n``."""
    return json.dumps(message, separators=(",", ":"), default=str).encode("ascii") + b"\n"


def nesting_depth(text: str, *, stop_above: int | None = None) -> int:
    """How deeply ``[`` and ``{`` nest in ``text``, outside JSON strings (a linear scan).

    With ``stop_above``, the scan ends as soon as the depth exceeds it (the result is then
    ``stop_above + 1``); text with no more brackets than that is not scanned at all.
    """
    if stop_above is not None and text.count("[") + text.count("{") <= stop_above:
        return min(text.count("[") + text.count("{"), stop_above)
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if stop_above is not None and deepest > stop_above:
                return deepest
        elif char in "]}":
            depth -= 1
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BadRequest(f"field {key!r} appears twice")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a valid value")


def decode_json_line(line: bytes, *, max_bytes: int) -> dict[str, Any]:
    """Decode one line (without its ``\\n``) into a JSON object, refusing anything else.

    Raises:
        BadRequest: too long, not UTF-8, nested too deeply, not JSON, or not an object.
    """
    if len(line) > max_bytes:
        raise BadRequest(f"message longer than {max_bytes} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"message is not UTF-8 text (byte {exc.start})") from None
    if nesting_depth(text, stop_above=MAX_DEPTH) > MAX_DEPTH:
        raise BadRequest(f"message nested deeper than {MAX_DEPTH} levels")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except BadRequest:
        raise
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"message must be a JSON object, not {type(data).__name__}")
    return data


def parse_request(line: bytes) -> Request:
    """The ``Request`` in one line (without its ``\\n``).

    Raises:
        BadRequest: the line breaks the protocol; the message says how.
    """
    data = decode_json_line(line, max_bytes=MAX_REQUEST_BYTES)
    _check_fields(data, FIELDS, optional=OPTIONAL)
    version = data["v"]
    if version not in SUPPORTED_VERSIONS:
        raise BadRequest(
            f"protocol version {version} is not supported; this process speaks versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))} (upgrade hotpatch on the side that is older)"
        )
    action = data["action"]
    if action not in ACTIONS:
        raise BadRequest(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
    if action in V2_ACTIONS and version < 2:
        raise BadRequest(f"action {action!r} needs protocol version 2")
    if data["pid"] <= 0:
        raise BadRequest("field 'pid' must be a positive process id")
    if action in ("rollback", "promote", "abort") and data.get("module") is None:
        raise BadRequest(f"{action} needs field 'module'")
    given = [key for key in DEPLOY_FIELDS if key in data]
    if action == "deploy":
        missing = [key for key in DEPLOY_FIELDS if key not in data]
        if missing:
            raise BadRequest(f"deploy needs field {missing[0]!r}")
        if not 0 < data["expires_ms"] <= MAX_EXPIRES_MS:
            raise BadRequest(f"field 'expires_ms' must be 1 to {MAX_EXPIRES_MS}")
    elif given:
        raise BadRequest(f"field {given[0]!r} belongs to action 'deploy' only")
    since = data.get("since")
    if since is not None and action != "stats":
        raise BadRequest("field 'since' belongs to action 'stats' only")
    if since is not None and not 0 <= since <= MAX_SINCE:
        raise BadRequest(f"field 'since' must be 0 to {MAX_SINCE}")
    return Request(
        action,
        data["pid"],
        data.get("module"),
        data.get("to"),
        deploy_id=data.get("deploy_id"),
        release=data.get("release"),
        release_dir=data.get("release_dir"),
        expires_ms=data.get("expires_ms"),
        since=since,
        v=version,
    )


def parse_step(line: bytes) -> Step:
    """The ``Step`` in one line of a ``deploy`` session (without its ``\\n``).

    Raises:
        BadRequest: the line breaks the protocol; the message says how.
    """
    data = decode_json_line(line, max_bytes=MAX_REQUEST_BYTES)
    _check_fields(data, STEP_FIELDS, optional=frozenset())
    if data["v"] != PROTOCOL_VERSION:
        raise BadRequest(f"a deploy step needs protocol version {PROTOCOL_VERSION}")
    if data["step"] not in STEPS:
        raise BadRequest(f"unknown step {data['step']!r}; known: {', '.join(STEPS)}")
    return Step(data["step"], data["deploy_id"])


def _check_fields(
    data: dict[str, Any], fields: dict[str, type], *, optional: frozenset[str]
) -> None:
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; known: {', '.join(sorted(fields))}")
    for key, kind in fields.items():
        value = data.get(key)
        if value is None and key in optional:
            continue
        if value is None:
            raise BadRequest(f"field {key!r} is required")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BadRequest(f"field {key!r} must be {kind.__name__}, not {type(value).__name__}")
        if isinstance(value, str) and not 0 < len(value) <= MAX_NAME_CHARS:
            raise BadRequest(f"field {key!r} must have 1 to {MAX_NAME_CHARS} characters")


def error_answer(pid: int, message: str, *, kind: str = "error") -> dict[str, Any]:
    """The answer to a request that could not be served."""
    return {
        "v": PROTOCOL_VERSION,
        "pid": pid,
        "outcome": "error",
        "error": kind,
        "message": message,
    }
