"""Talking to a running process from outside: ``hotpatch patch/rollback/history --pid``.

Owns the process side (``server``: ``listen()`` and the socket server thread that serves requests
with the engine; ``session``: one worker's part of an in-place deploy), the client side
(``client``: ``send_request()`` and ``DeploySession``, used by the command line) and the wire
format between them (``protocol``: one capped JSON line each way). They meet at one Unix
socket per process in the runtime directory of its user (``hotpatch.rundir``); docs/security.md
is the threat model.

May import: ``hotpatch.engine``, ``hotpatch.errors``, ``hotpatch.rundir``. Never imports watch,
gunicorn, cli or demo.
"""

from hotpatch.control.client import (
    DeploySession,
    NoAnswer,
    NotListening,
    OutcomeUnknown,
    send_request,
)
from hotpatch.control.server import Listener, listen, listen_release, socket_name
from hotpatch.control.session import ReleaseHooks

__all__ = [
    "DeploySession",
    "Listener",
    "NoAnswer",
    "NotListening",
    "OutcomeUnknown",
    "ReleaseHooks",
    "listen",
    "listen_release",
    "send_request",
    "socket_name",
]
