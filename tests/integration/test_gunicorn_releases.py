"""What a release is and where it lives, with real gunicorn masters on 127.0.0.1 under client load.

Each test starts gunicorn (4 workers, hotpatch's hooks) serving ``app.py`` from ``<tmp>/app``, with
its releases under ``<tmp>/state`` (``XDG_STATE_HOME``), runs client threads that count every
request, and checks zero failed requests and a live master through odd app directories (a file
name that is not UTF-8, a runaway deep tree, unreadable entries), a release deleted behind the
master's back, static assets in ``dist/``, log churn in the app directory, and a crashed master's
leftovers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from hotpatch.demo.harness import (
    GunicornServer,
    LoadGenerator,
    assert_no_failures,
    wait_until,
)
from hotpatch.demo.harness import Site as BaseSite
from hotpatch.gunicorn._client import read_state, start_rollout, wait_for_rollout
from hotpatch.gunicorn._state import state_dir_for

APPS = Path(__file__).resolve().parents[1] / "apps"
WORKERS = 4
ENV = {
    "HOTPATCH_HEALTH_PATH": "/healthz",
    "HOTPATCH_BOOT_TIMEOUT": "10",
    "HOTPATCH_HEALTH_TIMEOUT": "5",
    "HOTPATCH_SETTLE_TIME": "0.5",
}
ROLLOUT_TIMEOUT_S = 90

FLASK_APP = """
import os
from flask import Flask

VERSION = "__VERSION__"
app = Flask(__name__, static_folder="dist", static_url_path="/static")


@app.get("/")
def index():
    return f"version={VERSION} pid={os.getpid()}\\n"


@app.get("/healthz")
def healthz():
    return "ok"
"""

MESSAGE_APP = """
import os

VERSION = "__VERSION__"
with open(os.path.join(os.path.dirname(__file__), "message.txt"), encoding="utf-8") as fh:
    MESSAGE = fh.read().strip()


def app(environ, start_response):
    body = f"version={VERSION} pid={os.getpid()} message={MESSAGE}\\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def write_source(directory: Path, source: str, version: str) -> None:
    tmp = directory / ".app.py.tmp-save"
    tmp.write_text(source.replace("__VERSION__", version), encoding="utf-8")
    tmp.replace(directory / "app.py")


def write_app(directory: Path, variant: str, version: str) -> None:
    write_source(directory, (APPS / variant).read_text(encoding="utf-8"), version)


def unprivileged_python(tmp_path: Path) -> str:
    """An interpreter that obeys file permissions (root drops its DAC capabilities)."""
    if os.geteuid() != 0:
        return sys.executable
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: an unreadable file cannot be made")
    wrapper = tmp_path / "python-without-dac"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'exec {setpriv} --bounding-set -dac_override,-dac_read_search -- "{sys.executable}" "$@"\n',
        encoding="utf-8",
    )
    wrapper.chmod(0o700)
    return str(wrapper)


class Site(BaseSite):
    """A gunicorn master serving ``<tmp>/app``, releases under ``<tmp>/state``, plus load."""

    def __init__(self, tmp_path: Path) -> None:
        app_dir = tmp_path / "app"
        app_dir.mkdir(parents=True)
        self.state_home = tmp_path / "state"
        super().__init__(
            app_dir, workers=WORKERS, env={**ENV, "XDG_STATE_HOME": str(self.state_home)}
        )
        self.python = sys.executable
        self.extra_loads: list[LoadGenerator] = []

    def start(  # type: ignore[override]
        self,
        *,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        source: str | None = None,
    ) -> GunicornServer:
        if source is None:
            write_app(self.dir, "good.py", "v1")
        else:
            write_source(self.dir, source, "v1")
        args = list(extra_args)
        if self.python != sys.executable:
            args.append("--no-control-socket")
        self.server = GunicornServer(
            "app:app",
            cwd=self.dir,
            workers=self.worker_count,
            extra_args=args,
            env={**self.env, **(env or {})},
            python=self.python,
        )
        self.server.wait_serving(workers=self.worker_count, timeout_s=60)
        wait_until(
            lambda: read_state(self.srv.pid) is not None,
            timeout_s=20,
            what="state.json",
            describe=self.srv.output,
        )
        return self.server

    def rollout(self) -> dict[str, Any]:
        rollout_id = start_rollout(self.srv.pid)
        return wait_for_rollout(self.srv.pid, rollout_id, timeout_s=ROLLOUT_TIMEOUT_S)

    def versions(self, *, requests: int = 40) -> set[str]:
        seen = set()
        for _ in range(requests):
            status, body = self.srv.get("/")
            assert status == 200, body
            seen.add(body.split()[0])
        return seen

    def release_path(self, release: str) -> Path:
        """Where the master keeps ``release`` (the published ``releases_dir``, else the old place)."""
        state = self.state()
        base = state.get("releases_dir") or state_dir_for(self.srv.pid) / "releases"
        return Path(base) / release

    def status(self) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "hotpatch", "status", "--pid", str(self.srv.pid)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def close(self) -> None:
        for load in self.extra_loads:
            load.stop()
        super().close()


@pytest.fixture(name="site")
def _site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path)
    try:
        yield site
    finally:
        site.close()


def test_a_file_name_that_is_not_utf8_is_copied_and_the_rollout_completes(site: Site) -> None:
    site.start()
    site.start_load()
    (site.dir / "data").mkdir()
    odd = os.path.join(os.fsencode(site.dir / "data"), b"caf\xe9-\xff.txt")
    with open(odd, "wb") as fh:
        fh.write(b"latin-1 name")
    write_app(site.dir, "good.py", "v2")
    record = site.rollout()
    stats = site.stop_load()
    assert record["outcome"] == "completed", record
    site.assert_master_alive()
    site.wait_settled(record["release"])
    assert site.versions() == {"version=v2"}
    copied = os.path.join(
        os.fsencode(site.release_path(record["release"]) / "data"), b"caf\xe9-\xff.txt"
    )
    with open(copied, "rb") as fh:
        assert fh.read() == b"latin-1 name"
    assert_no_failures(stats)


def test_a_tree_1100_directories_deep_fails_the_rollout_not_the_master(site: Site) -> None:
    site.start()
    known_good = site.state()["known_good"]
    site.start_load()
    deep = os.fsencode(site.dir / "junk")
    os.mkdir(deep)
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1100):  # by descriptor: the path would outgrow what one call accepts
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    try:
        write_app(site.dir, "good.py", "v2")
        record = site.rollout()
        stats = site.stop_load()
    finally:
        for level in range(1100, 0, -1):  # iteratively: rmtree would recurse 1,100 deep
            os.rmdir(deep + b"/d" * level)
    assert record["outcome"] == "failed" and record["stage"] == "snapshot", record
    assert "nested more than 128 directories deep" in record["reason"], record
    assert "junk/d/d" in record["reason"], record
    site.assert_master_alive()
    site.wait_settled(known_good)
    assert site.versions() == {"version=v1"}
    assert_no_failures(stats)


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_an_unreadable_entry_refuses_the_snapshot_naming_it(
    site: Site, tmp_path: Path, kind: str
) -> None:
    site.python = unprivileged_python(tmp_path)
    site.start()
    known_good = site.state()["known_good"]
    site.start_load()
    (site.dir / "pkg").mkdir()
    (site.dir / "pkg" / "__init__.py").write_text("", encoding="utf-8")
    if kind == "directory":
        target = site.dir / "pkg" / "locked"
        target.mkdir()
        (target / "inside.py").write_text("x = 1\n", encoding="utf-8")
        target.chmod(0o100)  # traversable, not listable
    else:
        target = site.dir / "pkg" / "secret.bin"
        target.write_bytes(b"secret")
        target.chmod(0)
    try:
        write_app(site.dir, "good.py", "v2")
        record = site.rollout()
        stats = site.stop_load()
    finally:
        target.chmod(0o700)
    assert record["outcome"] == "failed" and record["stage"] == "snapshot", record
    why = "cannot list or examine it: " if kind == "directory" else ""
    expected = f"{target}: cannot snapshot: {why}Permission denied (stage: snapshot)"
    assert record["reason"] == expected, record
    site.assert_master_alive()
    site.wait_settled(known_good)
    assert site.versions() == {"version=v1"}
    assert_no_failures(stats)
    leftovers = [p.name for p in site.release_path(known_good).parent.iterdir()]
    assert leftovers == [known_good], leftovers  # no partial copy left behind


def test_a_deleted_known_good_release_is_detected_and_never_replaced_by_the_app_dir(
    site: Site,
) -> None:
    site.start()
    known_good = site.state()["known_good"]
    site.start_load()
    write_app(site.dir, "import_error.py", "v2")
    assert site.rollout()["outcome"] == "rolled_back"
    site.wait_settled(known_good)
    shutil.rmtree(site.release_path(known_good))  # a temp cleaner, or anyone
    assert_no_failures(site.stop_load())  # a SIGKILL loses the victim's own in-flight request
    victim = site.workers()[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: known_good in (site.state().get("damaged_releases") or {}),
        timeout_s=30,
        what="the damaged known-good release reported in state.json",
        describe=lambda: site.srv.output()[-4000:],
    )
    # The server keeps answering with the workers that run; none runs anything else.
    wait_until(
        lambda: (
            sorted(w["pid"] for w in site.workers()) == site.srv.worker_pids()
            and victim not in site.srv.worker_pids()
        ),
        timeout_s=20,
        what="the killed worker reaped",
    )
    site.start_load()
    assert len(site.srv.worker_pids()) == WORKERS - 1
    assert all(w["release"] == known_good for w in site.workers()), site.workers()
    assert site.versions() == {"version=v1"}
    status = site.status()
    assert f"known-good release {known_good} is DAMAGED" in status, status
    assert "new workers cannot start until a rollout succeeds" in status, status
    assert "release.damaged" in site.srv.output()
    # A rollout of fixed code brings the server back to full strength.
    write_app(site.dir, "good.py", "v3")
    record = site.rollout()
    stats = site.stop_load()
    assert record["outcome"] == "completed", record
    site.wait_settled(record["release"], timeout_s=60)
    assert site.versions() == {"version=v3"}
    assert_no_failures(stats)
    site.assert_master_alive()


def test_flask_static_assets_in_dist_are_part_of_the_release(site: Site) -> None:
    pytest.importorskip("flask")
    (site.dir / "dist").mkdir()
    (site.dir / "dist" / "app.js").write_text("console.log('v1');\n", encoding="utf-8")
    site.start(source=FLASK_APP)
    site.start_load()
    static_load = LoadGenerator(site.srv.port, clients=2, path="/static/app.js").start()
    site.extra_loads.append(static_load)
    wait_until(lambda: static_load.completed() > 10, timeout_s=20, what="static assets served")
    write_source(site.dir, FLASK_APP, "v2")
    (site.dir / "dist" / "app.js").write_text("console.log('v2');\n", encoding="utf-8")
    record = site.rollout()
    stats = site.stop_load()
    static_stats = static_load.stop()
    site.extra_loads.clear()
    assert record["outcome"] == "completed", record
    site.wait_settled(record["release"])
    assert site.versions() == {"version=v2"}
    assert site.srv.get("/static/app.js") == (200, "console.log('v2');\n")
    assert_no_failures(stats)
    assert_no_failures(static_stats)


def test_log_churn_in_the_app_dir_changes_no_release_and_triggers_no_watch_rollout(
    site: Site,
) -> None:
    (site.dir / "message.txt").write_text("hello\n", encoding="utf-8")
    site.start(
        source=MESSAGE_APP,
        extra_args=("--access-logfile", "gunicorn.log", "--pid", "gunicorn.pid"),
        env={"HOTPATCH_WATCH": "1"},
    )
    known_good = site.state()["known_good"]
    site.start_load()
    log = site.dir / "gunicorn.log"
    wait_until(lambda: log.stat().st_size > 20_000, timeout_s=30, what="the access log growing")
    # SIGHUP with nothing changed but the log: the same content, so the same content hash.
    record = site.rollout()
    assert record["outcome"] == "completed", record
    assert record["release"].split("-")[1] == known_good.split("-")[1], (record, known_good)
    # A data file the app reads is part of the release: saving it rolls out, alone.
    rollout_id = int(site.state()["next_rollout_id"])
    (site.dir / "message.txt").write_text("goodbye\n", encoding="utf-8")
    changed = wait_for_rollout(site.srv.pid, rollout_id, timeout_s=ROLLOUT_TIMEOUT_S)
    stats = site.stop_load()
    assert changed["outcome"] == "completed", changed
    watch = site.state()["watch"]
    assert watch["rollouts_requested"] == 1 and watch["last_changed"] == ["message.txt"], watch
    site.wait_settled(changed["release"])
    status, body = site.srv.get("/")
    assert status == 200 and "message=goodbye" in body, body
    assert_no_failures(stats)


def test_a_crashed_masters_releases_are_removed_by_the_next_master(
    site: Site, tmp_path: Path
) -> None:
    first = site.start()
    crashed = first.pid

    def copies_left() -> list[Path]:
        """Release copies of the crashed master, wherever hotpatch keeps them."""
        found = list(site.state_home.glob(f"hotpatch/releases/gunicorn-{crashed}-*"))
        legacy = state_dir_for(crashed) / "releases"
        if legacy.is_dir():
            found += list(legacy.iterdir())
        return found

    assert copies_left(), "the first master made no copy"
    os.killpg(crashed, signal.SIGKILL)  # the master and its workers: no exit hook runs
    first.proc.wait(timeout=30)
    assert copies_left(), "a killed master cannot clean up"
    assert state_dir_for(crashed).is_dir(), "a killed master leaves its state directory"
    second = Site(tmp_path / "second")
    second.state_home = site.state_home
    second.env = site.env
    try:
        second.start()
        second.start_load()
        write_app(second.dir, "good.py", "v2")
        record = second.rollout()
        stats = second.stop_load()
        assert record["outcome"] == "completed", record
        assert copies_left() == []
        assert not state_dir_for(crashed).exists(), "the crashed master's state is left behind"
        own = list(site.state_home.glob(f"hotpatch/releases/gunicorn-{second.srv.pid}-*"))
        assert len(own) == 1, own
        assert_no_failures(stats)
    finally:
        second.close()


def test_an_altered_release_is_refused_by_the_worker_that_would_load_it(site: Site) -> None:
    site.start()
    known_good = site.state()["known_good"]
    site.wait_settled(known_good)  # every worker has imported its code: alter it only now
    site.start_load()
    # Same size, same inode, same mtime: only reading the bytes can tell.
    copy = site.release_path(known_good) / "app.py"
    st = copy.stat()
    text = copy.read_text(encoding="utf-8")
    copy.chmod(0o600)
    with copy.open("r+", encoding="utf-8") as fh:
        fh.write(text.replace('VERSION = "v1"', 'VERSION = "v9"'))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert copy.stat().st_ino == st.st_ino and copy.stat().st_size == st.st_size
    assert_no_failures(site.stop_load())  # a SIGKILL loses the victim's own in-flight request
    victim = site.workers()[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: known_good in (site.state().get("damaged_releases") or {}),
        timeout_s=30,
        what="the altered known-good release reported in state.json",
        describe=lambda: site.srv.output()[-4000:],
    )
    reason = site.state()["damaged_releases"][known_good]
    assert "app.py has changed content (stage: release)" in reason, reason
    site.start_load()
    wait_until(
        lambda: (
            len(site.srv.worker_pids()) == WORKERS - 1
            and sorted(w["pid"] for w in site.workers()) == site.srv.worker_pids()
        ),
        timeout_s=20,
        what="three workers left, none booting",
    )
    assert site.versions() == {"version=v1"}  # the altered code never answers
    assert "is DAMAGED" in site.status()
    stats = site.stop_load()
    assert stats.bodies.get("version=v9", 0) == 0
    assert_no_failures(stats)
    site.assert_master_alive()
