"""Talking to a running process from outside: ``hotpatch patch/rollback --pid``.

Owns the process side (``listen()``: a thread that serves requests with the engine) and the client
side (``send_request()``, used by the command line), and the private per-process directory they
meet in (``channel``).

May import: ``hotpatch.engine``, ``hotpatch.errors``. Never imports watch, gunicorn, cli or demo.
"""

from hotpatch.control.channel import Listener, control_dir, listen, send_request

__all__ = ["Listener", "control_dir", "listen", "send_request"]
