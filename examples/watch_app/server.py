"""A small threaded HTTP server whose handler lives in ``handlers.py``.

Run it with watch mode on (from the repository root)::

    hotpatch run examples/watch_app/server.py 8000

then open http://127.0.0.1:8000/ (or ``curl``), edit ``handlers.py`` (change the greeting, add
a field to ``render``) and save: the next request shows the new code, and the visit counter in
``state.py`` keeps counting, because nothing restarted. Save a syntax error and watch the terminal:
the change is refused, the server keeps serving the previous version; fix it and save again.
"""

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import handlers


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = handlers.respond(self.path)
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the terminal for hotpatch's messages


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"serving on http://127.0.0.1:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
