"""Request recording in every worker: the middleware, the per-release counts, the ``stats`` answer.

A canary can only be judged on what it actually served, and the same numbers must reach an
operator's dashboard; neither may need code in the app. The hook therefore wraps the worker's WSGI
app (where ``_worker.py`` loads it) in ``RecordingMiddleware``. It must not change what the app
does: an exception escaping the app is counted and re-raised unchanged; the response iterable is
passed through, and its ``close()`` is called exactly once however often the server calls ours.
It must also be cheap (a lock, a few additions and one clock read at each end; see
docs/performance.md for the measured cost).

Per request it records, under the release the worker runs at that moment (an in-place deploy
moves a worker to another release): the status class (``2xx`` .. ``5xx``; a request whose app
raised before ``start_response`` counts as ``5xx``, the answer gunicorn sends), whether an
exception escaped (in the call or while iterating), and the latency, measured to the end of the
response iterable (a streaming response counts until its last chunk, at ``close()``). The counts
are cumulative; latencies go into a fixed ring of the last ``RING_SIZE`` requests numbered by a
sequence, so a reader that asks with ``since=<last seq seen>`` gets exactly the latencies it has
not seen (or, after more than ``RING_SIZE`` requests, the newest ones and how many it missed).
The deploy coordinator reads them through the worker's control socket (the read-only ``stats``
request of protocol v2): pulled only while a canary is judged, no cost otherwise, and the answer
is capped. The optional Prometheus export (``_prometheus``) is fed from the same call.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import Any

STATS_VERSION = 1
"""The version of the ``stats`` answer's layout (``"stats_v"``)."""
RING_SIZE = 8192
"""Latencies kept per release (the newest)."""
MAX_ANSWER_SAMPLES = 8192
"""At most this many latencies in one ``stats`` answer."""
MAX_RELEASES = 16
"""Releases kept per worker (the oldest is dropped beyond that)."""
CODE_CLASSES = ("2xx", "3xx", "4xx", "5xx")
_clock = time.perf_counter

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
Sink = Callable[[str, str, bool, float], None]
"""``sink(release, code_class, exception, latency_s)``: another consumer of each request."""


class _Counts:
    __slots__ = ("classes", "errors", "exceptions", "requests", "ring")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.exceptions = 0
        self.classes = dict.fromkeys(CODE_CLASSES, 0)
        self.ring = array("d", bytes(8 * RING_SIZE))


class Recorder:
    """The counts of one worker, per release; safe to record from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._releases: dict[str, _Counts] = {}

    def record(self, release: str, code_class: str, *, exception: bool, latency_s: float) -> None:
        """Count one finished request."""
        self.add(release, code_class, exception, latency_s)

    def add(self, release: str, code_class: str, exception: bool, latency_s: float) -> None:
        """``record``, positional (the middleware's per-request path)."""
        with self._lock:
            counts = self._releases.get(release)
            if counts is None:
                counts = self._new(release)
            counts.ring[counts.requests % RING_SIZE] = latency_s
            counts.requests += 1
            counts.classes[code_class] = counts.classes.get(code_class, 0) + 1
            if exception:
                counts.exceptions += 1
            if exception or code_class == "5xx":
                counts.errors += 1

    def _new(self, release: str) -> _Counts:
        while len(self._releases) >= MAX_RELEASES:
            self._releases.pop(next(iter(self._releases)))
        counts = self._releases[release] = _Counts()
        return counts

    def snapshot(self, *, since: int = 0, max_samples: int = MAX_ANSWER_SAMPLES) -> dict[str, Any]:
        """The counts, and per release the latencies of the requests numbered above ``since``.

        Returns:
            ``{"stats_v": 1, "releases": {release: {"requests", "errors", "exceptions",
            "classes", "seq", "latencies_from", "latencies_s", "missed"}}}``: ``seq`` is the
            number of the last request counted (a reader passes it as the next ``since``);
            ``latencies_s`` are the latencies of requests ``latencies_from + 1`` to ``seq``;
            ``missed`` counts requests after ``since`` whose latency is no longer kept.
        """
        since = max(int(since), 0)
        out: dict[str, Any] = {}
        with self._lock:
            for release, counts in self._releases.items():
                n = counts.requests
                first = max(since, n - RING_SIZE, n - max_samples)
                first = min(first, n)
                samples = [round(counts.ring[i % RING_SIZE], 7) for i in range(first, n)]
                out[release] = {
                    "requests": n,
                    "errors": counts.errors,
                    "exceptions": counts.exceptions,
                    "classes": dict(counts.classes),
                    "seq": n,
                    "latencies_from": first,
                    "latencies_s": samples,
                    "missed": max(first - since, 0),
                }
        return {"stats_v": STATS_VERSION, "releases": out}


_CLASS_OF = {"2": "2xx", "3": "3xx", "4": "4xx", "5": "5xx"}


def code_class(status: str | None) -> str:
    """``"200 OK"`` -> ``"2xx"``; no status (the app raised first) or a bad one -> ``"5xx"``."""
    if status and status[1:3].isdigit():
        return _CLASS_OF.get(status[0], "5xx")
    return "5xx"


class _Recording:
    """What both middlewares hold (the app, where the counts go, the metrics path)."""

    __slots__ = ("app", "metrics_path", "recorder", "release_of", "serve_metrics", "sink")

    def __init__(
        self,
        app: Any,
        *,
        recorder: Recorder,
        release_of: Callable[[], str],
        sink: Sink | None = None,
        metrics_path: str | None = None,
        serve_metrics: WSGIApp | None = None,
    ) -> None:
        self.app = app
        self.recorder = recorder
        self.release_of = release_of
        self.sink = sink
        self.metrics_path = metrics_path if serve_metrics is not None else None
        self.serve_metrics = serve_metrics


class RecordingMiddleware(_Recording):
    """A WSGI app around ``app`` that records each request (see the module docstring).

    Args:
        app: the worker's app.
        recorder: where the counts go.
        release_of: the release the worker runs now (read at each request's end).
        sink: another consumer of each request (the Prometheus export), or ``None``.
        metrics_path: a path the middleware answers itself with ``serve_metrics`` (the app never
            sees it), or ``None``.
        serve_metrics: ``(environ, start_response) -> body`` for ``metrics_path``.
    """

    __slots__ = ()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if self.metrics_path is not None and environ.get("PATH_INFO") == self.metrics_path:
            assert self.serve_metrics is not None
            return self.serve_metrics(environ, start_response)
        body = _Body(self, start_response)
        try:
            result = self.app(environ, body.start_response)
        except BaseException:
            body.failed = True
            body.finish()
            raise
        file_wrapper = environ.get("wsgi.file_wrapper")
        if file_wrapper is not None and isinstance(result, file_wrapper):
            return _keep_file_wrapper(result, body)
        body.inner = result
        return body

    def record(self, status: str | None, *, exception: bool, latency_s: float) -> None:
        """Count one finished request."""
        release = self.release_of()
        cls = code_class(status)
        self.recorder.add(release, cls, exception, latency_s)
        sink = self.sink
        if sink is not None:
            sink(release, cls, exception, latency_s)


def _keep_file_wrapper(result: Any, body: _Body) -> Iterable[bytes]:
    """Return the server's own file wrapper (so it still uses ``sendfile``), recording at its
    ``close()``; a wrapper whose ``close`` cannot be replaced is wrapped like any body."""
    inner_close = getattr(result, "close", None)

    def close() -> None:
        try:
            if inner_close is not None:
                inner_close()
        except BaseException:
            body.failed = True
            raise
        finally:
            body.finish()

    try:
        result.close = close
    except (AttributeError, TypeError):
        body.inner = result
        return body
    return result  # type: ignore[no-any-return]


class _Body:
    """The response iterable handed to the server: the app's, measured until ``close()``."""

    __slots__ = ("failed", "finished", "inner", "owner", "respond", "started", "status")

    def __init__(self, owner: RecordingMiddleware, respond: StartResponse) -> None:
        self.owner = owner
        self.respond = respond
        self.started = _clock()
        self.status: str | None = None
        self.inner: Iterable[bytes] | None = None
        self.failed = False
        self.finished = False

    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        """The ``start_response`` the app gets: notes the status, passes everything on."""
        self.status = status
        if exc_info is None:
            return self.respond(status, headers)
        return self.respond(status, headers, exc_info)

    def __iter__(self) -> Iterator[bytes]:
        inner = self.inner
        if type(inner) is list:  # the usual body: iterating a list cannot fail
            return iter(inner)
        return self._stream(inner if inner is not None else ())

    def _stream(self, inner: Iterable[bytes]) -> Iterator[bytes]:
        # A plain loop, not ``yield from``: closing this generator must not close ``inner``
        # (``close()`` does that, once).
        try:
            for chunk in inner:  # noqa: UP028 (see above)
                yield chunk
        except GeneratorExit:
            raise
        except BaseException:
            self.failed = True
            raise

    def close(self) -> None:
        """Close the app's iterable (once) and record the request (once)."""
        if self.finished:
            return
        try:
            inner = self.inner
            close = None if type(inner) is list else getattr(inner, "close", None)
            if close is not None:
                close()
        except BaseException:
            self.failed = True
            raise
        finally:
            self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        latency = _clock() - self.started
        owner = self.owner
        status = self.status
        cls = _CLASS_OF.get(status[0], "5xx") if status and status[1:3].isdigit() else "5xx"
        try:  # inline: this runs for every request
            release = owner.release_of()
            owner.recorder.add(release, cls, self.failed, latency)
            if owner.sink is not None:
                owner.sink(release, cls, self.failed, latency)
        except Exception:  # recording must never break a response
            return


class ASGIRecordingMiddleware(_Recording):
    """The ASGI form of ``RecordingMiddleware`` (uvicorn workers): the same counts.

    Only ``http`` scopes are recorded (``lifespan`` and ``websocket`` pass through untouched). The
    status is the ``http.response.start`` message's; the latency runs until the app returns (after
    its last ``http.response.body`` was sent: streaming included); an exception escaping the app
    is counted and re-raised unchanged (a cancellation, the client going away, is not an app
    error). An app that returns without a response counts as ``5xx`` (uvicorn answers 500).

    Args: as ``RecordingMiddleware``; ``serve_metrics`` is called as a WSGI app and its answer
    sent as the response at ``metrics_path``.
    """

    __slots__ = ()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        if self.metrics_path is not None and scope.get("path") == self.metrics_path:
            await self._metrics(send)
            return
        started = _clock()
        status: list[int] = []

        async def recording_send(message: Any) -> None:
            if message.get("type") == "http.response.start":
                status.append(message.get("status"))
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, recording_send)
        except Exception:
            failed = True
            raise
        finally:
            latency = _clock() - started
            code = status[-1] if status else None
            cls = f"{code // 100}xx" if isinstance(code, int) and 200 <= code < 600 else "5xx"
            try:
                release = self.release_of()
                self.recorder.add(release, cls, failed, latency)
                if self.sink is not None:
                    self.sink(release, cls, failed, latency)
            except Exception:  # recording must never break a response
                pass

    async def _metrics(self, send: Any) -> None:
        assert self.serve_metrics is not None
        answer: list[Any] = []
        body = b"".join(self.serve_metrics({}, lambda s, h, e=None: answer.append((s, h))))
        status, headers = answer[-1]
        await send(
            {
                "type": "http.response.start",
                "status": int(status.split(" ", 1)[0]),
                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            }
        )
        await send({"type": "http.response.body", "body": body})


def unwrap(app: Any) -> Any:
    """The app inside a recording middleware (health probes bypass the recording)."""
    if isinstance(app, (RecordingMiddleware, ASGIRecordingMiddleware)):
        return app.app
    return app
