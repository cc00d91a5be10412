"""Talking to a running process from outside: ``hotpatch patch/rollback/history --pid``.

Owns the process side (``server``: ``listen()`` and the socket server thread that serves requests
with the engine), the client side (``client``: ``send_request()``, used by the command line) and
the wire format between them (``protocol``: one capped JSON line each way). They meet at one Unix
socket per process in the runtime directory of its user (``hotpatch.rundir``); docs/security.md
is the threat model.

May import: ``hotpatch.engine``, ``hotpatch.errors``, ``hotpatch.rundir``. Never imports watch,
gunicorn, cli or demo.
"""

from hotpatch.control.client import NoAnswer, NotListening, OutcomeUnknown, send_request
from hotpatch.control.server import Listener, listen, socket_name

__all__ = [
    "Listener",
    "NoAnswer",
    "NotListening",
    "OutcomeUnknown",
    "listen",
    "send_request",
    "socket_name",
]
