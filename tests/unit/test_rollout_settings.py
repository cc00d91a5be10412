"""Rollout settings, release snapshots and sys.path pinning, error descriptions: pure parts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import hotpatch.gunicorn
from hotpatch.errors import ConfigError
from hotpatch.gunicorn._diagnose import describe_exception
from hotpatch.gunicorn._fileset import SnapshotRule
from hotpatch.gunicorn._releases import (
    app_roots,
    pin_sys_path,
    prune_releases,
    purge_app_modules,
    take_snapshot,
)
from hotpatch.gunicorn._settings import configure, load_settings, reset_configuration


@pytest.fixture(autouse=True)
def _forget_configuration() -> Iterator[None]:
    reset_configuration()
    yield
    reset_configuration()


def test_defaults() -> None:
    s = load_settings({})
    assert s.health_path is None and s.boot_timeout_s == 30.0 and s.health_timeout_s == 10.0


def test_environment_overrides_configure() -> None:
    configure(health_path="/ready", boot_timeout_s=12)
    s = load_settings({"HOTPATCH_HEALTH_PATH": "/healthz", "HOTPATCH_HEALTH_TIMEOUT": "2.5"})
    assert (s.health_path, s.boot_timeout_s, s.health_timeout_s) == ("/healthz", 12.0, 2.5)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HOTPATCH_BOOT_TIMEOUT": "soon"}, "HOTPATCH_BOOT_TIMEOUT: expected a number of seconds"),
        ({"HOTPATCH_HEALTH_TIMEOUT": "-1"}, "expected a positive number of seconds, got '-1'"),
        ({"HOTPATCH_HEALTH_TIMEOUT": "nan"}, "HOTPATCH_HEALTH_TIMEOUT"),
        ({"HOTPATCH_HEALTH_PATH": "healthz"}, "the health path must start with '/'"),
        ({"HOTPATCH_APP_DIR": "/no/such/dir"}, "is not a directory"),
    ],
)
def test_bad_environment_values_raise_config_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(env)


def test_configure_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match=r"configure\(boot_timeout_s=...\)"):
        configure(boot_timeout_s=0)
    with pytest.raises(ConfigError, match="not callable"):
        configure(checks=["nope"])  # type: ignore[list-item]
    assert isinstance(ConfigError("x"), ValueError)


def test_settle_may_be_zero() -> None:
    assert load_settings({"HOTPATCH_SETTLE_TIME": "0"}).settle_s == 0.0


def test_install_chains_existing_hooks() -> None:
    calls: list[str] = []
    namespace: dict[str, object] = {"post_fork": lambda server, worker: calls.append("user")}
    hotpatch.gunicorn.install(namespace, health_path="/healthz")
    assert load_settings({}).health_path == "/healthz"
    for name in hotpatch.gunicorn.HOOK_NAMES:
        assert callable(namespace[name])
    assert namespace["when_ready"] is hotpatch.gunicorn.when_ready
    namespace["post_fork"](object(), type("W", (), {"pid": 1})())  # type: ignore[operator]
    assert calls == ["user"]  # hotpatch's part is a no-op without a controller


def test_hooks_have_gunicorn_arity() -> None:
    from gunicorn.config import Config  # type: ignore[import-untyped]

    cfg = Config()
    for name in hotpatch.gunicorn.HOOK_NAMES:
        cfg.set(name, getattr(hotpatch.gunicorn, name))  # validate_callable checks the arity


def test_module_exposes_no_other_gunicorn_setting() -> None:
    from gunicorn.config import Config

    settings = set(Config().settings)
    exposed = {n for n in vars(hotpatch.gunicorn) if n in settings}
    assert exposed == set(hotpatch.gunicorn.HOOK_NAMES)


def test_snapshot_copies_sources_and_skips_caches(tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "pkg" / "__pycache__").mkdir(parents=True)
    (app / ".venv" / "lib").mkdir(parents=True)
    (app / "app.py").write_text("VERSION = 1\n")
    (app / "pkg" / "__init__.py").write_text("")
    (app / "pkg" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    (app / "templates").mkdir()
    (app / "templates" / "index.html").write_text("<p>hi</p>")
    state = app / ".state"
    state.mkdir()
    (tmp_path / "releases").mkdir()
    rule = SnapshotRule.build(exclude_paths=[state])
    first = take_snapshot(app, tmp_path / "releases", number=0, rule=rule)
    assert (first.path / "app.py").read_text() == "VERSION = 1\n"
    assert (first.path / "templates" / "index.html").exists()
    assert not (first.path / "pkg" / "__pycache__").exists()
    assert not (first.path / ".venv").exists()
    assert first.id.startswith("r0-") and first.files == 3
    (app / "app.py").write_text("VERSION = 2\n")
    second = take_snapshot(app, tmp_path / "releases", number=1, rule=rule)
    assert second.sha256 != first.sha256
    assert (first.path / "app.py").read_text() == "VERSION = 1\n"  # pinned copy unchanged
    assert prune_releases(tmp_path / "releases", keep={second.id}) == [first.id]


def test_snapshot_follows_a_current_symlink_at_each_call(tmp_path: Path) -> None:
    for name in ("v1", "v2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "app.py").write_text(f"VERSION = {name!r}\n")
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "v1")
    (tmp_path / "releases").mkdir()
    r1 = take_snapshot(current, tmp_path / "releases", number=0)
    current.unlink()
    current.symlink_to(tmp_path / "v2")
    r2 = take_snapshot(current, tmp_path / "releases", number=1)
    assert "v1" in (r1.path / "app.py").read_text() and "v2" in (r2.path / "app.py").read_text()


def test_pin_sys_path_moves_entries_inside_the_app(tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "src").mkdir(parents=True)
    release = tmp_path / "rel"
    (release / "src").mkdir(parents=True)
    entries = [str(app), str(app / "src"), str(app / ".venv" / "site-packages"), "/usr/lib"]
    pinned = pin_sys_path(entries, app_roots(app), release)
    assert pinned == [str(release), str(release / "src"), entries[2], "/usr/lib"]
    assert pin_sys_path(["/usr/lib"], app_roots(app), release) == [str(release), "/usr/lib"]


def test_purge_app_modules(tmp_path: Path) -> None:
    mod = ModuleType("someapp")
    mod.__file__ = str(tmp_path / "someapp.py")
    other = ModuleType("json2")
    other.__file__ = "/usr/lib/json2.py"
    modules = {"someapp": mod, "json2": other}
    assert purge_app_modules(modules, app_roots(tmp_path)) == ["someapp"]
    assert list(modules) == ["json2"]


def test_describe_syntax_error_names_the_app_file(tmp_path: Path) -> None:
    release = tmp_path / "releases" / "r1"
    release.mkdir(parents=True)
    try:
        compile("def f(:\n", str(release / "app.py"), "exec")
    except SyntaxError as exc:
        reason, text = describe_exception(
            exc, stage="load", release_dir=release, app_dir=tmp_path / "app"
        )
    assert reason.startswith(f"{tmp_path / 'app' / 'app.py'}:1: SyntaxError")
    assert reason.endswith("(stage: load)")
    assert str(release) not in text


def test_describe_runtime_error_points_at_the_innermost_app_frame(tmp_path: Path) -> None:
    release = tmp_path / "rel"
    release.mkdir()
    (release / "boomapp.py").write_text("x = 1\nraise RuntimeError('no db')\n")
    sys.path.insert(0, str(release))
    try:
        with pytest.raises(RuntimeError) as info:
            __import__("boomapp")
    finally:
        sys.path.remove(str(release))
        sys.modules.pop("boomapp", None)
    reason, _ = describe_exception(info.value, stage="load", release_dir=release, app_dir=tmp_path)
    assert reason == f"{tmp_path / 'boomapp.py'}:2: RuntimeError: no db (stage: load)"
