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
writing side) before a queued request starts cancels it. Pure functions: no sockets, no threads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 4
MAX_NAME_CHARS = 1024
ACTIONS = ("patch", "check", "rollback", "history")
FIELDS = {"v": int, "action": str, "pid": int, "module": str, "to": str}
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
    """

    action: str
    pid: int
    module: str | None = None
    to: str | None = None

    def encode(self) -> bytes:
        """The request as one protocol line."""
        body: dict[str, Any] = {"v": PROTOCOL_VERSION, "action": self.action, "pid": self.pid}
        if self.module is not None:
            body["module"] = self.module
        if self.to is not None:
            body["to"] = self.to
        return encode_line(body)


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
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; known: {', '.join(sorted(FIELDS))}")
    for key, kind in FIELDS.items():
        value = data.get(key)
        if value is None and key in ("module", "to"):
            continue
        if value is None:
            raise BadRequest(f"field {key!r} is required")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BadRequest(f"field {key!r} must be {kind.__name__}, not {type(value).__name__}")
        if isinstance(value, str) and not 0 < len(value) <= MAX_NAME_CHARS:
            raise BadRequest(f"field {key!r} must have 1 to {MAX_NAME_CHARS} characters")
    if data["v"] != PROTOCOL_VERSION:
        raise BadRequest(
            f"protocol version {data['v']} is not supported; this process speaks version "
            f"{PROTOCOL_VERSION} (upgrade hotpatch on the side that is older)"
        )
    if data["action"] not in ACTIONS:
        raise BadRequest(f"unknown action {data['action']!r}; known: {', '.join(ACTIONS)}")
    if data["pid"] <= 0:
        raise BadRequest("field 'pid' must be a positive process id")
    if data["action"] == "rollback" and data.get("module") is None:
        raise BadRequest("rollback needs field 'module'")
    return Request(data["action"], data["pid"], data.get("module"), data.get("to"))


def error_answer(pid: int, message: str, *, kind: str = "error") -> dict[str, Any]:
    """The answer to a request that could not be served."""
    return {
        "v": PROTOCOL_VERSION,
        "pid": pid,
        "outcome": "error",
        "error": kind,
        "message": message,
    }
