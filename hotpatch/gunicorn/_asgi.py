"""Worker side for ASGI apps (FastAPI, Starlette) under uvicorn's gunicorn worker: the health probe.

A sync worker checks its app in ``post_worker_init``: the app is loaded, nothing is listening yet,
and one in-process WSGI request tells whether the new code is healthy. An ASGI app cannot be
checked there. Its requests run in the event loop that ``UvicornWorker.run`` creates only after
that hook, and before that loop serves it runs the app's LIFESPAN startup (database pools, caches,
``app.state``), which health endpoints usually depend on. Probing from a loop of our own before
``run`` would see an app that has not started, or, if we ran the startup there, run it twice and
leave its loop-bound objects (connections, locks, clients) on a loop that is then thrown away.

So the probe runs inside uvicorn's own loop, between the lifespan startup and the first accepted
connection. ``guard_asgi_worker`` (from ``post_worker_init``) wraps the app in a ``_LifespanGate``
that uvicorn serves in its place. uvicorn sends the lifespan scope first and creates its servers on
gunicorn's sockets only when the startup is over; the gate holds the app's
``lifespan.startup.complete`` back, runs the usual health check (the health path through
``hotpatch.health.probe_asgi`` on this loop, with the lifespan state, then the user's checks, in a
thread under ``health_timeout_s``) and only then passes the message on. A failed check on a rollout
candidate becomes ``lifespan.startup.failed``: uvicorn never listens and exits, and the worker's
``run`` (wrapped as well) turns uvicorn's exit code 3, which would make gunicorn halt the master,
into hotpatch's ``EXIT_HEALTH_FAILED``. A startup that fails (``lifespan.startup.failed``, an
exception under ``--lifespan on`` semantics) or does not finish within ``health_timeout_s`` is a
failed load: it is reported with the app's file and line and the worker leaves with
``EXIT_LOAD_FAILED`` (a candidate, or any worker once a known-good release exists). uvicorn runs
the startup exactly once, itself. An app without lifespan support (``lifespan="auto"``, the app
raises or returns on the lifespan scope) is probed at that moment, still before uvicorn listens;
with ``lifespan="off"`` no lifespan scope ever comes, so the probe runs in a loop of its own from
``post_worker_init`` (nothing was started on the serving loop to depend on).

In-place deploys (docs/deploy.md) need the same loop after boot. ``guard_asgi_worker`` notes the
serving loop, its thread and the lifespan state (``_serving``): the deploy's health phase probes
the app on that loop with that state (``serving_probe``), and every commit and rollback of the
process runs on that thread between two coroutine steps (``commit_thread``, handed to the engine's
safe point through the control channel), so the loop stops for the commit and no longer. The
coroutines suspended once the lifespan startup is over (the lifespan itself, which waits for the
shutdown, and the tasks its startup began) live as long as the worker: a change to their code can
never reach a safe point, so phase 1 refuses it and ``auto`` rolls (``lifelong_frames``).

One more thing a sync worker gets and uvicorn does not give: a retired worker that answers every
connection it accepted. uvicorn's shutdown closes connections it accepted but has not read yet;
``_drain_fresh_connections`` gives those ``DRAIN_S`` for their request.
"""

from __future__ import annotations

import gc
import threading
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import compress
from typing import TYPE_CHECKING, Any

from hotpatch._log import get_logger
from hotpatch.health import ASGIMessage, ASGIReceive, ASGISend, ProbeResult, is_asgi_app, probe_asgi

if TYPE_CHECKING:
    import asyncio  # imported where it runs: loading the gunicorn hooks must not pull it in

log = get_logger(__name__)

Probe = Callable[..., ProbeResult]
"""``probe(app, path, port=...)``: what the worker's health check sends its request through."""
Check = Callable[[Probe], None]
"""Runs the worker's health check with a probe; blocks (a deadline of its own); may exit."""
StartupFailed = Callable[[BaseException, float], "int | None"]
"""Reports a failed startup (the error, when it started); returns the exit code to leave with."""


class LifespanStartupFailed(RuntimeError):
    """The app answered ``lifespan.startup.failed`` (or did not finish its startup in time)."""


def serves_asgi(worker: Any) -> bool:
    """Whether ``worker`` is an ASGI worker (uvicorn's) or holds an ASGI 3 app."""
    return _is_uvicorn_worker(worker) or is_asgi_app(getattr(worker, "wsgi", None))


def guard_asgi_worker(
    worker: Any,
    *,
    check: Check,
    on_startup_failed: StartupFailed,
    timeout_s: float,
) -> None:
    """Arrange the health check of an ASGI worker (``post_worker_init``).

    Args:
        worker: the gunicorn worker, its app loaded, before ``run``.
        check: runs the health check with the probe it is given.
        on_startup_failed: reports a failed lifespan startup.
        timeout_s: the deadline of the lifespan startup and of each probe.
    """
    app = worker.wsgi
    kind = type(worker).__qualname__
    if not _is_uvicorn_worker(worker):
        check(
            _refuse(
                f"the app is an ASGI application but the worker class {kind} serves WSGI: "
                "run it with -k uvicorn_worker.UvicornWorker"
            )
        )
        return
    if not is_asgi_app(app):
        check(
            _refuse(
                f"the worker class {kind} serves ASGI, but the app is not an ASGI 3 application "
                "(async def app(scope, receive, send), or an object with an async __call__)"
            )
        )
        return
    _drain_fresh_connections(worker)
    _note_serving_loop_of(worker)
    mode = str(getattr(getattr(worker, "config", None), "lifespan", "auto"))
    if mode == "off":  # no lifespan scope will come: nothing to wait for on the serving loop
        check(_probe_in_own_loop(timeout_s))
        return
    gate = _LifespanGate(
        app, worker=worker, mode=mode, check=check, timeout_s=timeout_s, started=time.monotonic()
    )
    worker.wsgi = gate
    run = worker.run

    def run_then_exit_as_reported() -> None:
        try:
            run()
        except SystemExit:
            gate.leave_as_reported(on_startup_failed)
            raise
        gate.leave_as_reported(on_startup_failed)

    worker.run = run_then_exit_as_reported


class _LifespanGate:
    """The app as uvicorn serves it: the lifespan startup is held until the health check passed."""

    def __init__(
        self,
        app: Any,
        *,
        worker: Any,
        mode: str,
        check: Check,
        timeout_s: float,
        started: float,
    ) -> None:
        self.app = app
        self.worker = worker
        self.mode = mode
        self.check = check
        self.timeout_s = timeout_s
        self.started = started
        self.startup_error: BaseException | None = None
        self.exit_code: int | None = None
        self._lifespan_seen = False

    async def __call__(self, scope: Any, receive: ASGIReceive, send: ASGISend) -> None:
        if scope.get("type") != "lifespan" or self._lifespan_seen:
            await self.app(scope, receive, send)
            return
        self._lifespan_seen = True
        import asyncio

        _note_serving_loop(state=scope.get("state"))
        self.worker.wsgi = self.app  # the user's checks see their own app, not this gate
        self.started = time.monotonic()
        loop = asyncio.get_running_loop()
        startup_over = False
        timer: asyncio.TimerHandle | None = None

        def startup_timed_out() -> None:
            nonlocal startup_over
            if startup_over:
                return
            startup_over = True
            message = f"lifespan startup did not finish within {self.timeout_s:g} s"
            self.startup_error = LifespanStartupFailed(message)
            _keep(
                asyncio.ensure_future(send({"type": "lifespan.startup.failed", "message": message}))
            )

        async def gated_receive() -> ASGIMessage:
            nonlocal timer
            message = await receive()
            if message.get("type") == "lifespan.startup" and timer is None:
                timer = loop.call_later(self.timeout_s, startup_timed_out)
            return message

        async def gated_send(message: ASGIMessage) -> None:
            nonlocal startup_over
            kind = message.get("type")
            if kind not in ("lifespan.startup.complete", "lifespan.startup.failed"):
                await send(message)
                return
            if startup_over:  # after our own timeout: uvicorn has its answer already
                return
            startup_over = True
            if timer is not None:
                timer.cancel()
            if kind == "lifespan.startup.failed":
                text = str(message.get("message") or "").strip()  # often a whole traceback
                last = text.splitlines()[-1][:500] if text else ""
                self.startup_error = LifespanStartupFailed(
                    f"the app answered lifespan.startup.failed: {last}"
                    if last
                    else "the app answered lifespan.startup.failed"
                )
                await send(message)
                return
            await self._check_then(send, message, scope.get("state"))

        try:
            await self.app(scope, gated_receive, gated_send)
        except Exception as exc:
            if timer is not None:
                timer.cancel()
            if startup_over:
                if self.startup_error is not None:
                    self.startup_error = exc  # the app's own exception: its file and line
                raise
            startup_over = True
            if self.mode == "on":  # uvicorn: an exception in the lifespan is a failed startup
                self.startup_error = exc
                raise
            # "auto": uvicorn takes the exception for "lifespan unsupported" and serves: probe now.
            if await self._run_check(None):
                raise
            await send({"type": "lifespan.startup.failed", "message": _REFUSED})
            return
        if timer is not None:
            timer.cancel()
        if not startup_over:  # returned without a word about startup: uvicorn serves it as is
            startup_over = True
            if not await self._run_check(None):
                await send({"type": "lifespan.startup.failed", "message": _REFUSED})

    async def _check_then(self, send: ASGISend, complete: ASGIMessage, state: Any) -> None:
        if await self._run_check(state if isinstance(state, dict) else None):
            import asyncio

            # once this step is over the lifespan (and any task its startup began) is suspended
            asyncio.get_running_loop().call_soon(_note_lifelong)
            await send(complete)
        else:
            await send({"type": "lifespan.startup.failed", "message": _REFUSED})

    async def _run_check(self, state: dict[str, Any] | None) -> bool:
        """Run the health check against this loop; False: this worker must not serve."""
        import asyncio

        loop = asyncio.get_running_loop()
        timeout_s = self.timeout_s

        def probe(app: Any, path: str, *, port: int) -> ProbeResult:
            coro = probe_asgi(app, path, port=port, state=state, timeout_s=timeout_s)
            return asyncio.run_coroutine_threadsafe(coro, loop).result()

        try:
            await loop.run_in_executor(None, self.check, probe)
        except SystemExit as exc:  # the check decided this worker leaves (a rollout candidate)
            self.exit_code = exc.code if isinstance(exc.code, int) else 1
            return False
        return True

    def leave_as_reported(self, on_startup_failed: StartupFailed) -> None:
        """After uvicorn's ``run``: leave with hotpatch's exit code for what went wrong."""
        if self.exit_code is not None:
            raise SystemExit(self.exit_code)
        if self.startup_error is not None:
            code = on_startup_failed(self.startup_error, self.started)
            if code is not None:
                raise SystemExit(code)


@dataclass
class _ServingLoop:
    """The loop this worker serves on (set on it), its thread, and the app's lifespan state."""

    loop: asyncio.AbstractEventLoop | None = None
    ident: int = 0
    state: dict[str, Any] | None = None
    lifelong: list[weakref.ref[Any]] = field(default_factory=list)
    """The coroutines and generators suspended when the lifespan startup completed."""


_serving = _ServingLoop()


def _note_serving_loop(*, state: Any = None) -> None:
    """Called on the serving loop: remember it (and the lifespan state, when there is one)."""
    import asyncio

    _serving.loop = asyncio.get_running_loop()
    _serving.ident = threading.get_ident()
    if isinstance(state, dict):
        _serving.state = state


_FRAME_OF = {types.CoroutineType: "cr", types.GeneratorType: "gi", types.AsyncGeneratorType: "ag"}


def _note_lifelong() -> None:
    """Remember every coroutine and generator suspended right after the lifespan startup: the
    lifespan itself (suspended until shutdown) and the tasks its startup began. They live as long
    as the worker, so a change to their code can never reach a safe point (``lifelong_frames``).

    ``gc.get_objects()`` also returns tuples another thread is still building (``tuple(gen)``
    grows its tuple in place, which fails with ``SystemError: bad argument to internal
    function`` once anything else refers to it): while the list is held, another thread that
    gets the GIL can fail so (seen: the control socket's thread, opening at the same moment).
    The coroutines and generators are therefore picked out in C (the types cannot be
    subclassed), and the list dropped, before any other Python code runs here.
    """
    objects = gc.get_objects()
    picked = list(compress(objects, map(_FRAME_OF.__contains__, map(type, objects))))
    del objects
    found = []
    for obj in picked:
        if _frame_of(obj) is not None:
            try:
                found.append(weakref.ref(obj))
            except TypeError:  # pragma: no cover - every suspendable type takes weak references
                continue
    _serving.lifelong = found


def _frame_of(obj: Any) -> types.FrameType | None:
    prefix = _FRAME_OF.get(type(obj))
    if prefix is None or getattr(obj, f"{prefix}_running", False):
        return None
    frame = getattr(obj, f"{prefix}_frame", None)
    return frame if isinstance(frame, types.FrameType) else None


def lifelong_frames() -> list[tuple[str, str, str, int]]:
    """``(module, qualname, file, line)`` of the frames suspended since the lifespan startup that
    are still suspended now (the lifespan, its tasks): a deploy must not change their code."""
    frames = []
    for ref in _serving.lifelong:
        obj = ref()
        frame = _frame_of(obj) if obj is not None else None
        if frame is None:
            continue
        code = frame.f_code
        module = frame.f_globals.get("__name__")
        frames.append(
            (
                module if isinstance(module, str) else "",
                getattr(code, "co_qualname", code.co_name),
                code.co_filename,
                frame.f_lineno or code.co_firstlineno,
            )
        )
    return frames


def _note_serving_loop_of(worker: Any) -> None:
    """Note the loop uvicorn's worker creates in ``run`` as soon as it runs (any lifespan mode)."""
    serve = getattr(worker, "_serve", None)
    if serve is None or not callable(serve):
        return  # another uvicorn worker: the lifespan gate notes the loop

    async def serve_noting_the_loop() -> None:
        _note_serving_loop()
        await serve()

    worker._serve = serve_noting_the_loop


def commit_thread() -> tuple[int, Callable[[Callable[[], None]], object]] | None:
    """The serving loop's thread and scheduler, while it runs (every commit goes there).

    Each step the loop runs for the safe point (the last look at the stacks and the assignments)
    is timed: ``event_loop.paused`` says how long the loop served nothing for it.
    """
    loop = _serving.loop
    if loop is None or loop.is_closed() or not loop.is_running():
        return None

    def timed(step: Callable[[], None]) -> None:
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            step()
        finally:
            log.info(
                "event_loop.paused",
                reason="commit at the safe point",
                paused_s=round(time.perf_counter() - started, 6),
                cpu_s=round(time.thread_time() - cpu_started, 6),
            )

    def schedule(step: Callable[[], None]) -> object:
        return loop.call_soon_threadsafe(timed, step)

    return _serving.ident, schedule


def serving_probe(timeout_s: float) -> Probe:
    """The deploy health phase's probe: the app on its serving loop, with the lifespan state.

    Before the loop runs (or after it stopped) the probe runs in a loop of its own.
    """
    loop = _serving.loop
    if loop is None or loop.is_closed() or not loop.is_running():
        return _probe_in_own_loop(timeout_s)
    state = _serving.state

    def probe(app: Any, path: str, *, port: int) -> ProbeResult:
        import asyncio

        coro = probe_asgi(app, path, port=port, state=state, timeout_s=timeout_s)
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    return probe


DRAIN_S = 2.0
"""How long a retiring uvicorn worker waits for the request of a connection it has just accepted."""


def _drain_fresh_connections(worker: Any) -> None:
    """Let a retiring uvicorn worker answer the connections it accepted but has not read yet.

    When uvicorn shuts down (a retired worker's SIGTERM), it stops accepting, then closes every
    connection without a request in progress, including one it accepted a moment ago whose
    request is in the socket buffer, unread: that client sees a reset (here: 2 of 3 runs of the
    FastAPI example's test had one, 1 request in about 4,000; uvicorn issue 2757). Connections that have
    not received a byte yet get ``DRAIN_S`` for their request to arrive; it is then answered with
    ``Connection: close``, as in-flight requests are. Best effort: with an HTTP protocol class
    this does not recognise, uvicorn's own shutdown stands.
    """
    config = getattr(worker, "config", None)
    try:
        from uvicorn.config import HTTP_PROTOCOLS
        from uvicorn.importer import import_from_string

        base = config.http  # type: ignore[union-attr]
        if isinstance(base, str):
            base = import_from_string(HTTP_PROTOCOLS.get(base, base))
    except Exception as exc:  # an older or newer uvicorn: keep its own behaviour
        log.warning("asgi_drain.unavailable", worker_pid=worker.pid, error=repr(exc))
        return
    if getattr(config, "http2", False) or not isinstance(base, type):
        return
    if not all(callable(getattr(base, name, None)) for name in ("shutdown", "data_received")):
        return
    config.http = _draining(base)  # type: ignore[union-attr]


def _draining(base: type[Any]) -> type[Any]:
    class DrainingProtocol(base):  # type: ignore[misc]
        _hotpatch_seen_data = False

        def data_received(self, data: bytes) -> None:
            self._hotpatch_seen_data = True
            super().data_received(data)

        def shutdown(self) -> None:
            if getattr(self, "cycle", None) is not None or self._hotpatch_seen_data:
                super().shutdown()
                return
            import asyncio

            asyncio.get_running_loop().call_later(DRAIN_S, self._hotpatch_shutdown)

        def _hotpatch_shutdown(self) -> None:
            transport = getattr(self, "transport", None)
            if transport is not None and not transport.is_closing():
                super().shutdown()

    DrainingProtocol.__qualname__ = DrainingProtocol.__name__ = f"Draining{base.__name__}"
    return DrainingProtocol


_REFUSED = "hotpatch: the health check failed; this worker does not serve (see the rollout)"
_BACKGROUND: set[asyncio.Future[None]] = set()


def _keep(task: asyncio.Future[None]) -> None:
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def _is_uvicorn_worker(worker: Any) -> bool:
    return any(
        cls.__module__.split(".", 1)[0] in ("uvicorn", "uvicorn_worker")
        and cls.__name__.startswith("Uvicorn")
        for cls in type(worker).__mro__
    )


def _refuse(reason: str) -> Probe:
    def probe(app: Any, path: str, *, port: int) -> ProbeResult:
        raise RuntimeError(reason)

    return probe


def _probe_in_own_loop(timeout_s: float) -> Probe:
    def probe(app: Any, path: str, *, port: int) -> ProbeResult:
        import asyncio

        return asyncio.run(probe_asgi(app, path, port=port, timeout_s=timeout_s))

    return probe
