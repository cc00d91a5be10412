"""``hotpatch.health.probe_asgi`` and ``is_asgi_app``: real FastAPI apps and hand-written ASGI apps."""

# No `from __future__ import annotations`: FastAPI reads the endpoint's annotations at runtime.
import asyncio
import functools
from typing import Any

import pytest

from hotpatch.health import ProbeResult, is_asgi_app, probe_asgi, probe_wsgi


def run(app: Any, path: str = "/", **kwargs: Any) -> ProbeResult:
    kwargs.setdefault("timeout_s", 5.0)
    return asyncio.run(probe_asgi(app, path, **kwargs))


def test_a_fastapi_app_answers_with_its_status_body_query_headers_and_lifespan_state() -> None:
    fastapi = pytest.importorskip("fastapi")
    from fastapi.responses import PlainTextResponse

    app = fastapi.FastAPI()

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz(request: fastapi.Request) -> str:
        pool = request.state.pool
        return (
            f"{request.url.path} {request.query_params['deep']} {request.headers['x-probe']} {pool}"
        )

    @app.get("/down")
    async def down() -> PlainTextResponse:
        return PlainTextResponse("db down", status_code=503)

    state = {"pool": "pool-1"}
    result = run(app, "/healthz?deep=1", headers={"X-Probe": "yes"}, state=state, port=8000)
    assert result == ProbeResult(status=200, body=b"/healthz 1 yes pool-1")
    assert result.is_success
    assert run(app, "/down").status == 503
    assert run(app, "/missing").status == 404


def test_the_request_gets_a_copy_of_the_lifespan_state() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["state"]["touched"] = True
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    state: dict[str, Any] = {"pool": 1}
    assert run(app, state=state).status == 204
    assert state == {"pool": 1}


def test_the_path_is_percent_decoded_and_the_raw_path_kept() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.update(path=scope["path"], raw=scope["raw_path"], query=scope["query_string"])
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"ok"})

    run(app, "/a%20b/c?x=%20")
    assert seen == {"path": "/a b/c", "raw": b"/a%20b/c", "query": b"x=%20"}


def test_the_body_is_capped_at_64_kib_over_several_chunks() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        for _ in range(40):
            await send({"type": "http.response.body", "body": b"x" * 4096, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    result = run(app)
    assert result.status == 200
    assert result.body == b"x" * 65536


def test_an_exception_before_the_response_is_raised() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise LookupError("no database")

    with pytest.raises(LookupError, match="no database"):
        run(app)


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        pytest.param([], "never sent http.response.start", id="no-start"),
        pytest.param(
            [{"type": "http.response.start", "status": 200}],
            "returned before the response was complete",
            id="no-body",
        ),
        pytest.param(
            [{"type": "http.response.start", "status": 99}], "with status 99", id="bad-status"
        ),
        pytest.param(
            [{"type": "http.response.start", "status": "200"}],
            "with status '200'",
            id="status-text",
        ),
        pytest.param(
            [{"type": "http.response.body", "body": b"x"}],
            "unexpected ASGI message 'http.response.body'",
            id="body-first",
        ),
        pytest.param(
            [
                {"type": "http.response.start", "status": 200},
                {"type": "http.response.body", "body": "text"},
            ],
            "http.response.body with a str",
            id="body-not-bytes",
        ),
        pytest.param(["not a dict"], "unexpected ASGI message None", id="not-a-mapping"),
    ],
)
def test_a_protocol_error_is_a_clear_runtime_error(messages: list[Any], error: str) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in messages:
            await send(message)

    with pytest.raises(RuntimeError, match=error):
        run(app, "/healthz")


def test_an_app_that_never_answers_times_out_and_is_cancelled() -> None:
    cancelled: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def probe_then_yield() -> None:
        with pytest.raises(TimeoutError, match=r"GET /healthz: no complete response within 0.2 s"):
            await probe_asgi(app, "/healthz", timeout_s=0.2)
        await asyncio.sleep(0)  # let the cancellation reach the app

    asyncio.run(probe_then_yield())
    assert cancelled == [True]


def test_the_probe_returns_when_the_response_is_complete_and_background_work_goes_on() -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        finished: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            assert (await receive())["type"] == "http.request"
            await send({"type": "http.response.start", "status": 200})
            await send({"type": "http.response.body", "body": b"ok"})
            assert (await receive())["type"] == "http.disconnect"  # the client is gone
            await release.wait()  # a background task after the response
            finished.append("background")

        result = await probe_asgi(app, "/", timeout_s=5)
        assert result == ProbeResult(200, b"ok")
        assert finished == []
        release.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert finished == ["background"]

    asyncio.run(scenario())


def test_is_asgi_app_tells_asgi_3_from_wsgi() -> None:
    async def asgi(scope: Any, receive: Any, send: Any) -> None: ...

    class AsgiObject:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None: ...

    class Asgi2:
        def __init__(self, scope: Any) -> None: ...

    def wsgi(environ: Any, start_response: Any) -> list[bytes]:
        return []

    assert is_asgi_app(asgi)
    assert is_asgi_app(AsgiObject())
    assert is_asgi_app(functools.partial(asgi))
    assert not is_asgi_app(AsgiObject)  # the class, not an app instance
    assert not is_asgi_app(Asgi2)
    assert not is_asgi_app(wsgi)
    assert not is_asgi_app(None)
    assert not is_asgi_app("app:app")
    fastapi = pytest.importorskip("fastapi")
    flask = pytest.importorskip("flask")
    assert is_asgi_app(fastapi.FastAPI())
    assert not is_asgi_app(flask.Flask("probe"))


def test_probe_wsgi_is_unchanged_for_a_wsgi_app() -> None:
    def wsgi(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [environ["PATH_INFO"].encode()]

    assert probe_wsgi(wsgi, "/healthz") == ProbeResult(200, b"/healthz")
