"""In-process patches of FastAPI/Starlette code, each outcome checked by calling the ASGI app.

A FastAPI app with a path operation, a dependency, a Pydantic body model and a Starlette
middleware is written to a temporary file and imported. Each test patches it with
``hotpatch.Engine`` and calls the app the way a server does (a raw ASGI ``http`` call, run to
completion): FastAPI's route table and its middleware stack keep the objects they were built with,
so an applied change must run through them; a change that FastAPI or Pydantic computed from the
old code at start-up (a model's fields, a route's path or parameters, a new route) is refused
with a reason that says a rolling reload carries it, and the app answers exactly as before.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotpatch import Engine, PatchRejected

pytest.importorskip("fastapi", reason="fastapi is not installed (the test extra installs it)")

APP = """
from typing import Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel
from starlette.middleware.base import BaseHTTPMiddleware

app = FastAPI()


class Item(BaseModel):
    name: str


def current_user() -> str:
    return "alice"


class Stamp(BaseHTTPMiddleware):
    async def dispatch(self, request, call_next):
        response = await call_next(request)
        response.headers["x-stamp"] = "v1"
        return response


app.add_middleware(Stamp)


@app.get("/hello")
def hello(user: str = Depends(current_user)) -> dict[str, str]:
    return {"msg": "v1", "user": user}


@app.post("/items")
def create(item: Item) -> dict[str, Any]:
    return item.model_dump()
"""


def call(
    app: Any, method: str, path: str, body: object = None, query: str = ""
) -> tuple[int, dict[str, str], Any]:
    """One ASGI ``http`` request to ``app``: (status, headers, decoded JSON body)."""
    sent: list[dict[str, Any]] = []
    data = json.dumps(body).encode() if body is not None else b""
    incoming = [{"type": "http.request", "body": data, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 40000),
        "server": ("test", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(payload) if payload else None


@pytest.fixture(name="mod")
def _mod(make_module) -> types.ModuleType:
    mod = make_module(APP)
    assert call(mod.app, "GET", "/hello")[2] == {"msg": "v1", "user": "alice"}  # stack built
    return mod


def _patch(mod: types.ModuleType, old: str, new: str) -> Engine:
    engine = Engine()
    engine.track(mod.__name__)
    assert old in APP
    engine.patch(mod.__name__, source=APP.replace(old, new))
    return engine


def _refused(mod: types.ModuleType, old: str, new: str) -> PatchRejected:
    assert old in APP
    with pytest.raises(PatchRejected) as info:
        Engine().patch(mod.__name__, source=APP.replace(old, new))
    assert info.value.stage == "compatibility", info.value
    assert "rolling reload" in str(info.value)
    return info.value


def _unchanged(mod: types.ModuleType) -> None:
    status, headers, body = call(mod.app, "GET", "/hello")
    assert (status, headers["x-stamp"], body) == (200, "v1", {"msg": "v1", "user": "alice"})
    assert call(mod.app, "POST", "/items", {"name": "a", "qty": 3})[2] == {"name": "a"}


def test_a_path_operation_body_change_runs_through_the_route_table(mod) -> None:
    engine = _patch(mod, '"msg": "v1"', '"msg": "v2"')
    assert call(mod.app, "GET", "/hello")[2] == {"msg": "v2", "user": "alice"}
    engine.rollback(mod.__name__)
    _unchanged(mod)


def test_a_dependency_change_runs(mod) -> None:
    engine = _patch(mod, 'return "alice"', 'return "bob"')
    assert call(mod.app, "GET", "/hello")[2] == {"msg": "v1", "user": "bob"}
    engine.rollback(mod.__name__)
    _unchanged(mod)


def test_a_middleware_change_runs_in_the_built_middleware_stack(mod) -> None:
    engine = _patch(mod, '["x-stamp"] = "v1"', '["x-stamp"] = "v2"')
    assert call(mod.app, "GET", "/hello")[1]["x-stamp"] == "v2"
    engine.rollback(mod.__name__)
    _unchanged(mod)


@pytest.mark.parametrize(
    ("new", "field"),
    [("    name: str\n    qty: int = 0\n", "Item.qty"), ("    pass\n", "Item.name")],
    ids=["added", "removed"],
)
def test_a_pydantic_field_change_is_refused(mod, new: str, field: str) -> None:
    """Pydantic's metaclass built the fields, validator and schema from the old class body."""
    refusal = _refused(mod, "    name: str\n", new)
    assert "ModelMetaclass" in str(refusal) and field in str(refusal)
    _unchanged(mod)


def test_a_new_route_is_refused_as_it_would_be_registered_on_a_discarded_app(mod) -> None:
    route = '\n\n@app.get("/extra")\ndef extra() -> dict[str, str]:\n    return {"extra": "yes"}\n'
    refusal = _refused(mod, "return item.model_dump()\n", "return item.model_dump()\n" + route)
    assert "the decorator of the new extra registers it on app" in str(refusal)
    assert call(mod.app, "GET", "/extra")[0] == 404
    _unchanged(mod)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('@app.get("/hello")', '@app.get("/hi")'),
        ("def hello(user", "def hello(q: int = 0, user"),
    ],
    ids=["path", "parameters"],
)
def test_a_route_whose_path_or_parameters_changed_is_refused(mod, old: str, new: str) -> None:
    """FastAPI reads the path and the parameters once, when the decorator registers the route."""
    refusal = _refused(mod, old, new)
    assert "hello, whose decorator or signature changed" in str(refusal)
    assert call(mod.app, "GET", "/hi")[0] == 404
    _unchanged(mod)


MAIN = """
from fastapi import APIRouter, FastAPI

router = APIRouter()
app = FastAPI()
"""

ROUTES = """
from {pkg}.main import router


@router.get("/r")
def read() -> dict[str, str]:
    return {{"v": "1"}}
"""


@pytest.fixture(name="routed")
def _routed(tmp_path: Path) -> Iterator[tuple[types.ModuleType, types.ModuleType, str]]:
    """``main`` makes the router and the app; ``routes`` imports the router and registers on it
    (FastAPI's usual layout), then ``main.app.include_router`` serves it."""
    pkg = f"hp_fastapi_{uuid.uuid4().hex[:8]}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("", encoding="utf-8")
    (tmp_path / pkg / "main.py").write_text(MAIN, encoding="utf-8")
    routes_source = ROUTES.format(pkg=pkg)
    (tmp_path / pkg / "routes.py").write_text(routes_source, encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    try:
        main = importlib.import_module(f"{pkg}.main")
        routes = importlib.import_module(f"{pkg}.routes")
        main.app.include_router(main.router)
        assert call(main.app, "GET", "/r")[2] == {"v": "1"}
        yield main, routes, routes_source
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
            del sys.modules[name]


def test_a_route_on_an_imported_router_takes_a_body_change_without_a_second_route(
    routed,
) -> None:
    """The candidate runs ``@router.get`` on the live router: its route (an APIRoute holding the
    candidate's function) is taken out again, so the router keeps exactly its live route."""
    main, routes, source = routed
    engine = Engine()
    engine.track(routes.__name__)
    engine.patch(routes.__name__, source=source.replace('"1"', '"2"'))
    assert call(main.app, "GET", "/r")[2] == {"v": "2"}
    assert [r.endpoint for r in main.router.routes] == [routes.read]
    engine.rollback(routes.__name__)
    assert call(main.app, "GET", "/r")[2] == {"v": "1"}
    assert [r.endpoint for r in main.router.routes] == [routes.read]


def test_a_path_change_on_an_imported_router_is_refused(routed) -> None:
    main, routes, source = routed
    with pytest.raises(PatchRejected) as info:
        Engine().patch(routes.__name__, source=source.replace('"/r"', '"/r2"'))
    assert "registers it on router, a live object this module imports" in str(info.value)
    assert "rolling reload" in str(info.value)
    assert call(main.app, "GET", "/r2")[0] == 404
    assert call(main.app, "GET", "/r")[2] == {"v": "1"}
    assert [r.path for r in main.router.routes] == ["/r"]
