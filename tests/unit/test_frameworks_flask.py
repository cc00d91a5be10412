"""In-process patches of Flask code, each outcome checked through Flask's test client.

A package is written to a temporary directory: ``app.py`` makes the app and its own
``@app.route`` views, ``bp.py`` a blueprint, ``views.py`` routes registered on the app it
imports (the classic "views import app" layout), and ``__init__`` wires them. The app serves a
request before any patch, as a running server has. A patch re-executes the module's top level
in a candidate; it must not leave Flask's "already registered" or "setup method called after
the first request" errors behind, and the new code must run. What cannot be done in place (a
new route, a route registered again on the live app that now refuses it) is refused with the
reason and "a rolling reload carries this change". A body change of a view registered on the
imported app applies: the live registration holds the function, so it is not made again.
"""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotpatch import Engine, PatchRejected

pytest.importorskip("flask", reason="flask is not installed (the test extra installs it)")

FILES = {
    "__init__.py": """
        from {pkg}.app import app
        from {pkg}.bp import bp
        from {pkg} import views  # noqa: F401  (routes registered on app at import)

        app.register_blueprint(bp)
    """,
    "app.py": """
        from flask import Flask

        app = Flask(__name__)


        @app.route("/own")
        def own():
            return "own v1"
    """,
    "bp.py": """
        from flask import Blueprint

        bp = Blueprint("bp", __name__)


        @bp.route("/bp")
        def in_blueprint():
            return "bp v1"
    """,
    "views.py": """
        from {pkg}.app import app


        @app.route("/view")
        def view():
            return "view v1"
    """,
}


@pytest.fixture(name="site")
def _site(tmp_path: Path) -> Iterator[tuple[str, Any, dict[str, str]]]:
    pkg = f"hp_flask_{uuid.uuid4().hex[:8]}"
    sources = {
        relative: textwrap.dedent(text.format(pkg=pkg)).lstrip("\n")
        for relative, text in FILES.items()
    }
    (tmp_path / pkg).mkdir()
    for relative, text in sources.items():
        (tmp_path / pkg / relative).write_text(text, encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    try:
        package = __import__(pkg)
        client = package.app.test_client()
        assert _answers(client) == ["own v1", "bp v1", "view v1"]  # the app has served
        yield pkg, client, sources
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
            del sys.modules[name]


def _answers(client: Any) -> list[str]:
    return [client.get(path).get_data(as_text=True) for path in ("/own", "/bp", "/view")]


def _patch(site: tuple[str, Any, dict[str, str]], module: str, old: str, new: str) -> Engine:
    pkg, _, sources = site
    engine = Engine()
    engine.track(f"{pkg}.{module}")
    assert old in sources[f"{module}.py"]
    engine.patch(f"{pkg}.{module}", source=sources[f"{module}.py"].replace(old, new))
    return engine


def test_an_app_route_view_change_runs_after_the_first_request(site) -> None:
    pkg, client, _ = site
    engine = _patch(site, "app", "own v1", "own v2")
    assert _answers(client) == ["own v2", "bp v1", "view v1"]
    engine.rollback(f"{pkg}.app")
    assert _answers(client) == ["own v1", "bp v1", "view v1"]


def test_a_blueprint_view_change_runs_after_the_blueprint_was_registered(site) -> None:
    pkg, client, _ = site
    engine = _patch(site, "bp", "bp v1", "bp v2")
    assert _answers(client) == ["own v1", "bp v2", "view v1"]
    engine.rollback(f"{pkg}.bp")
    assert _answers(client) == ["own v1", "bp v1", "view v1"]


def test_a_new_route_on_the_modules_own_app_is_refused(site) -> None:
    _, client, _ = site
    route = '\n\n@app.route("/extra")\ndef extra():\n    return "extra"\n'
    with pytest.raises(PatchRejected) as info:
        _patch(site, "app", 'return "own v1"\n', 'return "own v1"\n' + route)
    assert info.value.stage == "compatibility"
    assert "the decorator of the new extra registers it on app" in str(info.value)
    assert "rolling reload" in str(info.value)
    assert client.get("/extra").status_code == 404
    assert _answers(client) == ["own v1", "bp v1", "view v1"]


def test_a_view_registered_on_an_imported_app_that_served_takes_a_body_change(site) -> None:
    """``views.py`` imports the live app. Re-running its top level would register ``/view`` on
    the live app again, which Flask refuses once the app has served a request ("The setup
    method 'route' can no longer be called"). The live app already holds the live function, and
    the decorator and signature did not change, so the candidate does not register it again: the
    patch applies, the new code runs, and the app's URL map is as it was."""
    pkg, client, _ = site
    app = sys.modules[f"{pkg}.app"].app
    rules_before = sorted(str(r) for r in app.url_map.iter_rules())
    views_before = dict(app.view_functions)
    engine = _patch(site, "views", "view v1", "view v2")
    assert _answers(client) == ["own v1", "bp v1", "view v2"]
    assert sorted(str(r) for r in app.url_map.iter_rules()) == rules_before
    assert app.view_functions == views_before
    engine.rollback(f"{pkg}.views")
    assert _answers(client) == ["own v1", "bp v1", "view v1"]


def test_a_new_route_on_an_imported_app_that_served_is_refused_saying_why(site) -> None:
    """A new route must be registered on the live app, which Flask refuses once it served: the
    refusal says so and that a rolling reload carries the change; nothing of the candidate is
    left in the app."""
    pkg, client, _ = site
    app = sys.modules[f"{pkg}.app"].app
    rules_before = sorted(str(r) for r in app.url_map.iter_rules())
    views_before = dict(app.view_functions)
    route = '\n\n@app.route("/extra")\ndef extra():\n    return "extra"\n'
    with pytest.raises(PatchRejected) as info:
        _patch(site, "views", 'return "view v1"\n', 'return "view v1"\n' + route)
    assert info.value.stage == "execute"
    assert "can no longer be called on the application" in str(info.value)
    assert "raised by the decorator of extra, which registers it on app" in str(info.value)
    assert "rolling reload carries this change" in str(info.value)
    assert _answers(client) == ["own v1", "bp v1", "view v1"]
    assert sorted(str(r) for r in app.url_map.iter_rules()) == rules_before
    assert app.view_functions == views_before
